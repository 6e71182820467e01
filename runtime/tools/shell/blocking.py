"""Blocked forms: the simple commands that destroy the system and never run.

`blocked_reason` recognises `rm -rf /`, `mkfs` on a disk, `dd of=/dev/sda`,
`chmod -R` of a system directory, overwriting `/etc/passwd`, shutdowns and
the like, resolving relative operands against a directory the command `cd`-ed
into. Everything here is `critical` and refused, even with approval.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from runtime.tools.shell.options import _long_hit, _opts, has_flag
from runtime.tools.shell.paths import (
    canonical_path,
    is_critical_file,
    is_disk,
    is_protected,
    is_watchdog,
)
from runtime.tools.shell.programs import (
    _PYTHON_RE,
    INTERPRETERS,
    POWER_PROGRAMS,
    SYSTEMCTL_POWER,
)


def _positionals(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    after_dd = False
    for arg in argv[1:]:
        if after_dd or not arg.startswith("-") or arg == "-":
            out.append(arg)
        elif arg == "--":
            after_dd = True
    return out


def _recursive(argv: Sequence[str]) -> bool:
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--"):
            if _long_hit(arg, {"--recursive"}):
                return True
        elif arg.startswith("-") and ("r" in arg or "R" in arg):
            return True
    return False


# Programs whose operands are files: relative operands are resolved against a
# directory the command `cd`-ed into (`cd / && rm -rf *`).
_FILE_OPERAND_PROGRAMS = frozenset(
    _opts("rm shred chmod chown chgrp mv cp install ln tee truncate sed find dd")
)


def resolve_operand(word: str, cwd: str | None) -> str:
    """`word` as seen from `cwd` (None: the workspace, left relative)."""
    if cwd is None or cwd == "?" or word.startswith("-"):
        return word
    if word.startswith("of="):
        return "of=" + resolve_operand(word[3:], cwd)
    if "=" in word or canonical_path(word) is not None:
        return word
    return ("/" if cwd == "/" else cwd.rstrip("/") + "/") + word


def blocked_reason(name: str, argv: Sequence[str], cwd: str | None = None) -> str | None:
    """Why this simple command (program `name`) destroys the system, or None."""
    if any("{" in a for a in argv[1:]):
        argv = [argv[0], *(w for a in argv[1:] for w in brace_expand(a))]
    if cwd is not None and name in _FILE_OPERAND_PROGRAMS:
        argv = [argv[0], *(resolve_operand(a, cwd) for a in argv[1:])]
    if name in POWER_PROGRAMS:
        return f"`{name}` shuts down or restarts the machine"
    for word in argv[1:]:
        word = resolve_operand(word.removeprefix("of=").removeprefix("if="), cwd)
        if is_watchdog(word):
            return f"opening the watchdog device `{word}` reboots the machine when not fed"
    pos = _positionals(argv)
    if name == "systemctl":
        reason = _systemctl_power(argv, pos)
        if reason:
            return reason
    if name == "loginctl" and any(p in _SLEEP_VERBS for p in pos):
        return "`loginctl` would shut down, restart or suspend the machine"
    if name in ("init", "telinit") and any(p in ("0", "6", "1", "s", "S") for p in pos):
        return f"`{name} {pos[0]}` shuts down, restarts or isolates the machine"
    if name == "killall5":
        return "`killall5` signals every process on the machine"
    if name == "kill":
        reason = _kill_everything(argv)
        if reason:
            return reason
    if name in ("pkill", "killall", "skill", "snice"):
        reason = _pkill_everything(name, argv)
        if reason:
            return reason
    if name == "rsync":
        reason = _rsync_delete_root(argv)
        if reason:
            return reason
    if name == "fuser":
        reason = _fuser_kill_root(argv)
        if reason:
            return reason
    reason = _disk_erase(name, argv)
    if reason:
        return reason
    if name in _DBUS_CLIENTS:
        reason = _dbus_power(name, argv)
        if reason:
            return reason
    if name in INTERPRETERS or _PYTHON_RE.match(name):
        reason = _interpreter_fork_bomb(name, argv)
        if reason:
            return reason
    if name == "rm":
        if "--no-preserve-root" in argv and _recursive(argv):
            return "`rm --no-preserve-root` deletes the whole system"
        for target in pos:
            if _recursive(argv) and is_protected(target):
                return f"`rm` would recursively delete `{target}`"
            if is_critical_file(target) or is_disk(target):
                return f"`rm` would delete `{target}`"
    if name in ("mkfs", "mke2fs", "mkswap", "wipefs", "blkdiscard") or name.startswith("mkfs."):
        if any(is_disk(p) for p in argv[1:]):
            return f"`{name}` would erase a disk"
    if name in ("fdisk", "sfdisk", "parted", "gdisk", "sgdisk", "cfdisk"):
        listing = any(a in ("-l", "--list", "print", "-p", "--print") for a in argv[1:])
        if not listing and any(is_disk(p) for p in argv[1:]):
            return f"`{name}` would rewrite a disk's partition table"
    if name == "dd":
        for arg in argv[1:]:
            if arg.startswith("of="):
                target = arg[3:]
                if is_disk(target) or is_critical_file(target):
                    return f"`dd` would overwrite `{target}`"
    if name == "shred":
        for target in pos:
            if is_disk(target) or is_critical_file(target) or is_protected(target):
                return f"`shred` would destroy `{target}`"
    if name in ("chmod", "chown", "chgrp"):
        operands = pos[1:] if pos else []
        for target in operands:
            if (canonical_path(target) == "/") or (_recursive(argv) and is_protected(target)):
                return f"`{name}` would change ownership or permissions of the whole `{target}`"
            if is_critical_file(target):
                return f"`{name}` would change `{target}`"
    if name in ("mv",):
        for target in pos:
            if is_protected(target) or is_critical_file(target) or is_disk(target):
                return f"`mv` would move away or overwrite `{target}`"
    if name in ("cp", "install", "ln") and pos:
        dest = pos[-1]
        if is_critical_file(dest) or is_disk(dest):
            return f"`{name}` would overwrite `{dest}`"
    if name in ("tee", "truncate"):
        for target in pos:
            if is_critical_file(target) or is_disk(target):
                return f"`{name}` would overwrite `{target}`"
    if name == "sed" and has_flag(argv, "i", {"--in-place"}):
        for target in pos:
            if is_critical_file(target):
                return f"`sed -i` would rewrite `{target}`"
    if name == "find" and "-delete" in argv:
        starts = [a for a in argv[1:] if not a.startswith("-") and a not in ("(", ")", "!")]
        if starts and is_protected(starts[0]):
            return f"`find {starts[0]} -delete` would delete the system"
    if name == "find":
        reason = _find_exec_blocked(argv)
        if reason:
            return reason
    for target in _output_options(name, argv):
        if is_critical_file(target) or is_disk(target):
            return f"`{name}` would overwrite `{target}`"
    return None


_BRACE = re.compile(r"\{([^{}]*,[^{}]*)\}")
_MAX_EXPANSIONS = 256


def brace_expand(word: str) -> list[str]:
    """The words bash's brace expansion makes of `word` (`/{bin,etc}` → `/bin`, `/etc`).

    Comma lists only, nested ones from the inside out; `{a..z}` sequences and
    anything beyond `_MAX_EXPANSIONS` words are left as they are. Used so a
    blocked form written with braces (`rm -rf /{bin,etc,usr}`) stays blocked.
    """
    words = [word]
    for _ in range(16):
        out: list[str] = []
        changed = False
        for w in words:
            m = _BRACE.search(w)
            if m is None:
                out.append(w)
                continue
            changed = True
            out.extend(w[: m.start()] + part + w[m.end() :] for part in m.group(1).split(","))
        if not changed or len(out) > _MAX_EXPANSIONS:
            return words if len(out) > _MAX_EXPANSIONS else out
        words = out
    return words


_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})


def _find_exec_blocked(argv: Sequence[str]) -> str | None:
    """`find / -exec rm -rf {} +`: the command find runs, with `{}` as each start point."""
    words = list(argv[1:])
    starts = []
    for w in words:
        if w.startswith("-") or w in ("(", ")", "!", ","):
            break
        starts.append(w)
    starts = starts or ["."]
    i = 0
    while i < len(words):
        if words[i] in _FIND_EXEC:
            j = i + 1
            while j < len(words) and words[j] not in (";", "+"):
                j += 1
            inner = words[i + 1 : j]
            if inner:
                for start in starts:
                    filled = [w.replace("{}", start) for w in inner]
                    reason = blocked_reason(posixpath.basename(filled[0]), filled)
                    if reason:
                        return f"`find {start} {words[i]}` runs a command that {reason}"
            i = j
        i += 1
    return None


# systemd targets (and `systemctl` verbs) that stop the machine or drop it to
# a rescue shell, which takes every service down at once.
_POWER_TARGETS = frozenset(
    {"poweroff", "reboot", "halt", "kexec", "rescue", "emergency", "suspend", "hibernate",
     "hybrid-sleep", "suspend-then-hibernate", "sleep", "soft-reboot", "ctrl-alt-del", "exit",
     "shutdown", "final", "umount", "runlevel0", "runlevel1", "runlevel6", "factory-reset"}
)  # fmt: skip
_SLEEP_VERBS = frozenset(
    {"poweroff", "reboot", "halt", "kexec", "suspend", "hibernate", "hybrid-sleep",
     "suspend-then-hibernate", "sleep", "soft-reboot"}
)  # fmt: skip
# Verbs after which systemctl's operands are units it starts (and so the
# target's machine-wide effect happens).
_SYSTEMCTL_STARTS = frozenset(
    {"start", "restart", "try-restart", "reload-or-restart", "try-reload-or-restart",
     "force-reload", "isolate", "enable", "reenable", "set-default", "link", "add-wants",
     "add-requires"}
)  # fmt: skip


# The services behind the power targets: starting one is the same as the target.
_POWER_SERVICES = frozenset(
    f"systemd-{v}" for v in ("reboot", "poweroff", "halt", "kexec", "suspend", "hibernate",
                             "hybrid-sleep", "suspend-then-hibernate", "soft-reboot")
)  # fmt: skip


def _target_name(unit: str, verb: str) -> str | None:
    """The power or rescue target a unit operand names, or None.

    A bare `rescue`/`emergency` means the service of that name, which puts a
    root shell on the console and stops what conflicts with it: blocked too.
    """
    base = unit.removesuffix(".target")
    if unit.endswith(".target") or verb == "isolate":  # isolate assumes `.target`
        return base if base in _POWER_TARGETS else None
    service = unit.removesuffix(".service")
    if service in _POWER_SERVICES or service in ("rescue", "emergency"):
        return service
    return None


# Units whose every process is the machine: init itself, the root slice.
_WHOLE_MACHINE_UNITS = frozenset({"init.scope", "-.slice", "system.slice"})


def _systemctl_power(argv: Sequence[str], pos: list[str]) -> str | None:
    if any(p in SYSTEMCTL_POWER or p in _SLEEP_VERBS for p in pos[:1]):
        return "`systemctl` would shut down, restart or suspend the machine"
    if pos[:1] in (["rescue"], ["emergency"], ["default"]):
        return f"`systemctl {pos[0]}` stops every service not in that target"
    if any(p in SYSTEMCTL_POWER for p in pos):
        return "`systemctl` would shut down or restart the machine"
    verb = pos[0] if pos else ""
    if verb in ("kill", "stop", "freeze", "clean") and any(
        u in _WHOLE_MACHINE_UNITS for u in pos[1:]
    ):
        return f"`systemctl {verb}` of init or the root slice takes every service down"
    if verb in _SYSTEMCTL_STARTS:
        for unit in pos[1:]:
            target = _target_name(unit, verb)
            if target:
                return f"`systemctl {verb} {unit}` shuts the machine down or isolates it"
    return None


_SIGNAL_WORD = re.compile(r"-(SIG)?[A-Za-z]+[0-9+-]*|-[0-9]+")
# PID 1 and -1 ("every process I may signal"), in the spellings kill accepts.
_EVERYONE = re.compile(r"\+?0*1|-0*1")


def _kill_everything(argv: Sequence[str]) -> str | None:
    """`kill … 1` or `kill … -1` in every spelling: a signal to init or to every process."""
    words = list(argv[1:])
    i = 0
    pids: list[str] = []
    signal_seen = False
    while i < len(words):
        w = words[i]
        if w == "--":
            pids.extend(words[i + 1 :])
            break
        if w in ("-l", "-L", "--list", "--table"):
            return None
        if w in ("-s", "-n", "--signal", "-q", "--queue", "--timeout"):
            i += 2 if w != "--timeout" else 3
            signal_seen = True
            continue
        if w.startswith("--signal=") or w.startswith("--queue="):
            signal_seen = True
            i += 1
            continue
        if not signal_seen and not pids and _SIGNAL_WORD.fullmatch(w):
            signal_seen = True  # `-9`, `-KILL`, `-SIGKILL`: the signal, first word only
            i += 1
            continue
        if w in ("-a", "--all", "-p", "--pid", "--verbose", "-r", "--require-handler"):
            i += 1
            continue
        pids.append(w)
        i += 1
    for pid in pids:
        if _EVERYONE.fullmatch(pid):
            which = (
                "init (PID 1)"
                if not pid.lstrip("+0").startswith("-") and "-" not in pid
                else "every process"
            )
            return f"`kill {pid}` signals {which}, which takes the machine down"
    return None


def _pkill_everything(name: str, argv: Sequence[str]) -> str | None:
    words = list(argv[1:])
    for i, w in enumerate(words):
        value = None
        if w in ("-P", "--parent", "-s", "--session", "-g", "--pgroup") and i + 1 < len(words):
            value = words[i + 1]
        elif w.startswith(("-P", "--parent=")) and len(w) > 2:
            value = w.split("=", 1)[1] if "=" in w else w[2:]
        if value is not None and any(v.strip() in ("0", "1") for v in value.split(",")):
            return f"`{name} {w} {value}` signals init and the whole system"
    value_options = {"-u", "-U", "--euid", "--uid", "-g", "-G", "--group", "-t", "--terminal",
                     "-s", "--session", "-P", "--parent", "-n", "--ns", "-o", "--older",
                     "-y", "--younger", "--signal", "-c", "--context"}  # fmt: skip
    operands = []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w in value_options:
            skip = True
        elif not w.startswith("-") or w == "-":
            operands.append(w)
    if any(o.strip("^$") in ("init", "systemd", "1") for o in operands):
        return f"`{name}` would signal init, which takes the machine down"
    if any(_MATCHES_ALL.fullmatch(o) for o in operands):
        return f"`{name}` with a pattern that matches every process takes the machine down"
    users = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-u", "-U", "--euid",
                                                                   "--uid", "--user")]  # fmt: skip
    users += [w.split("=", 1)[1] for w in words if w.startswith(("--euid=", "--uid=", "--user="))]
    if any(u in ("root", "0") for u in users) and not [o for o in operands if o != "-"]:
        return f"`{name}` for every process of root takes the machine down"
    return None


# Patterns that match every process name (pkill's regex, killall -r).
_MATCHES_ALL = re.compile(r"\^?(\.\*?|\.\+|)\$?|\^|\$|\[[^]]*\]\*")


def _fuser_kill_root(argv: Sequence[str]) -> str | None:
    """`fuser -k /`, `fuser -km /`: kills every process using the root filesystem."""
    kills = (
        any(w.startswith("-") and not w.startswith("--") and "k" in w for w in argv[1:])
        or "--kill" in argv
    )
    if kills and any(is_protected(p) for p in _positionals(argv)):
        return "`fuser -k` on a system directory kills every process using it"
    return None


# Disk tools' subcommands and options that erase a device or its metadata.
_DISK_ERASE = {
    "hdparm": re.compile(r"--security-erase(-enhanced)?|--trim-sector-ranges(-stdin)?|"
                         r"--write-sector|--dco-restore|--fwdownload\S*|--make-bad-sector"),
    "nvme": re.compile(r"format|sanitize|write-zeroes|delete-ns|fw-download|fw-commit"),
    "cryptsetup": re.compile(r"luksErase|erase|luksKillSlot|luksFormat|reencrypt"),
    "mdadm": re.compile(r"--zero-superblock"),
    "sg_format": re.compile(r".*"),
    "sg_sanitize": re.compile(r".*"),
}  # fmt: skip


_ERASE_LONG: dict[str, dict[str, str]] = {}
_ERASE_OPTIONS = {
    "hdparm": ("--security-erase", "--security-erase-enhanced", "--trim-sector-ranges",
               "--trim-sector-ranges-stdin", "--write-sector", "--dco-restore",
               "--make-bad-sector"),
    "mdadm": ("--zero-superblock",),
}  # fmt: skip


def _long_prefix(name: str, word: str) -> str:
    """The erase option `word` abbreviates (getopt_long style), or `word` itself."""
    base = word.split("=", 1)[0]
    if not base.startswith("--") or len(base) < 4:
        return word
    hits = [o for o in _ERASE_OPTIONS.get(name, ()) if o.startswith(base)]
    return hits[0] if hits else word


def _disk_erase(name: str, argv: Sequence[str]) -> str | None:
    pattern = _DISK_ERASE.get(name)
    if pattern is None:
        return None
    # getopt_long takes any unambiguous prefix: `--zero-superbloc` is `--zero-superblock`
    words = [_ERASE_LONG.get(name, {}).get(w.split("=", 1)[0], w) for w in argv[1:]]
    words = [_long_prefix(name, w) for w in words]
    if any(pattern.fullmatch(w) for w in words) and (
        name.startswith("sg_") or any(is_disk(w) for w in argv[1:])
    ):
        return f"`{name}` would erase a disk or its metadata"
    return None


_RSYNC_DELETE = frozenset(
    _opts("--delete --del --delete-before --delete-during --delete-delay --delete-after "
          "--delete-excluded --delete-missing-args --remove-source-files")
)  # fmt: skip


def _rsync_delete_root(argv: Sequence[str]) -> str | None:
    if not any(a.split("=", 1)[0] in _RSYNC_DELETE for a in argv[1:]):
        return None
    pos = _positionals(argv)
    if not pos:
        return None
    dest = pos[-1]
    remote = re.match(r"(?:[^/:@]+@)?[^/:]+::?(.*)", dest)
    if remote and not dest.startswith("/"):
        dest = remote.group(1) or "~"  # `host:` is the remote home, `host:/` its root
    if is_protected(dest):
        return f"`rsync --delete` into `{pos[-1]}` would delete the system"
    return None


_DBUS_CLIENTS = frozenset({"busctl", "dbus-send", "gdbus", "qdbus", "dbus", "qdbus6"})
_DBUS_POWER = re.compile(
    r"(^|[.\s/])(Reboot|PowerOff|Halt|KExec|Suspend|Hibernate|HybridSleep|"
    r"SuspendThenHibernate|SoftReboot|Sleep)(WithFlags)?$"
)


def _dbus_power(name: str, argv: Sequence[str]) -> str | None:
    words = list(argv[1:])
    if any(_DBUS_POWER.search(w) for w in words):
        return f"`{name}` asks systemd over D-Bus to shut down, restart or suspend the machine"
    if any(w in ("StartUnit", "RestartUnit", "StartUnitReplace") or w.endswith(
        (".StartUnit", ".RestartUnit")) for w in words):  # fmt: skip
        for w in words:
            unit = w.rsplit(":", 1)[-1]  # dbus-send's `string:reboot.target`
            if unit.endswith(".target") and unit.removesuffix(".target") in _POWER_TARGETS:
                return f"`{name}` starts `{w}` over D-Bus"
    return None


# In an interpreter's code: a fork inside a loop (or a loop made of forks).
_FORK = re.compile(r"fork|\bspawn\b|child_process|\bexec[lv]p?e?\b")
_LOOP = re.compile(r"\bwhile\b|\bloop\b|\bfor\b|\buntil\b|\bredo\b|\bgoto\b|\.times\b")


def _interpreter_fork_bomb(name: str, argv: Sequence[str]) -> str | None:
    code = " ".join(argv[1:])
    if _FORK.search(code) and _LOOP.search(code):
        return f"the `{name}` code forks in a loop: a fork bomb"
    return None


# Options that name an output file, per program.
_OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "sort": ("-o", "--output"),
    "shuf": ("-o", "--output"),
    "base64": ("-o", "--output"),
    "tree": ("-o",),
    "curl": ("-o", "--output"),
    "wget": ("-O", "--output-document", "-o", "--output-file", "-a", "--append-output"),
    "time": ("-o", "--output"),
    "journalctl": ("--cursor-file",),
}


def _output_options(name: str, argv: Sequence[str]) -> list[str]:
    """Files a command writes through an option (`sort -o F`) or a second operand (`uniq A B`)."""
    out: list[str] = []
    opts = _OUTPUT_OPTIONS.get(name, ())
    for i, arg in enumerate(argv[1:], 1):
        for opt in opts:
            if arg == opt and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif opt.startswith("--") and arg.startswith(opt + "="):
                out.append(arg.split("=", 1)[1])
            elif not opt.startswith("--") and arg.startswith(opt) and len(arg) > len(opt):
                out.append(arg[len(opt) :])
    if name in ("uniq", "xxd"):
        out.extend(_positionals(argv)[1:])
    return out
