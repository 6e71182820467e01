"""Blocked forms: the simple commands that destroy the system and never run.

`blocked_reason` recognises `rm -rf /`, `mkfs` on a disk, `dd of=/dev/sda`,
`chmod -R` of a system directory, overwriting `/etc/passwd`, shutdowns and
the like, resolving relative operands against a directory the command `cd`-ed
into. Everything here is `critical` and refused, even with approval.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.tools.shell.options import _long_hit, _opts, has_flag
from runtime.tools.shell.paths import canonical_path, is_critical_file, is_disk, is_protected
from runtime.tools.shell.programs import POWER_PROGRAMS, SYSTEMCTL_POWER


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
    if cwd is not None and name in _FILE_OPERAND_PROGRAMS:
        argv = [argv[0], *(resolve_operand(a, cwd) for a in argv[1:])]
    if name in POWER_PROGRAMS:
        return f"`{name}` shuts down or restarts the machine"
    pos = _positionals(argv)
    if name == "systemctl" and any(p in SYSTEMCTL_POWER for p in pos):
        return "`systemctl` would shut down or restart the machine"
    if name == "loginctl" and any(p in ("poweroff", "reboot", "halt") for p in pos):
        return "`loginctl` would shut down or restart the machine"
    if name in ("init", "telinit") and any(p in ("0", "6") for p in pos):
        return f"`{name} {pos[0]}` shuts down or restarts the machine"
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
    for target in _output_options(name, argv):
        if is_critical_file(target) or is_disk(target):
            return f"`{name}` would overwrite `{target}`"
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
