"""Paths: which ones are protected, critical, disks or secrets, and where writes land.

`canonical_path` normalizes a word lexically (`$HOME`, `~user`, `..`); the
predicates built on it decide whether deleting a path wipes the system,
whether writing it breaks boot or logins, whether reading it exposes a
credential, and whether a write leaves the workspace. Globs are matched
against the protected and secret names they could reach.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import re

from runtime.tools.secrets import (
    CREDENTIAL_ENV_VARS,
    SECRET_DIR_PAIRS,
    SECRET_DIRS,
    SECRET_PATH_SAMPLES,
    SECRET_ROOTS,
    SECRET_SAMPLES,
    SYSTEM_SECRETS,
    credential_env_paths,
    secret_name_matches,
)

# Deleting, moving or recursively re-permissioning any of these wipes the system.
PROTECTED_PATHS = frozenset(
    {
        "/", "~", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64",
        "/libx32", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
        "/sys", "/usr", "/var", "/snap", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64",
        "/usr/local", "/usr/share", "/usr/include", "/usr/libexec", "/var/lib", "/var/log",
        "/etc/systemd", "/etc/ssh", "/etc/pam.d",
    }
)  # fmt: skip
# Overwriting, deleting or re-permissioning one of these breaks logins or boot.
CRITICAL_FILES = frozenset(
    {"/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/sudoers", "/etc/fstab",
     "/etc/hosts", "/etc/resolv.conf", "/etc/pam.conf", "/etc/crontab", "/etc/inittab",
     "/proc/sysrq-trigger", "/dev/mem", "/dev/kmem", "/dev/port"}
)  # fmt: skip
_DISK_RE = re.compile(
    r"^/dev/(sd[a-z]|hd[a-z]|vd[a-z]|xvd[a-z]|nvme\d|mmcblk\d|disk|dm-\d|md\d|mapper/|loop\d|"
    r"root$|sr\d|nbd\d|rbd\d|zram\d|bcache|block/|ram\d|sg\d|st\d|nst\d|ubd|mtd|"
    r"watchdog)"
)
# Character devices under /dev that are not storage. Any other /dev path may be
# a block device under a name nobody can predict (`/dev/vg0/root`, a udev
# symlink), so writing it is treated as writing a disk.
_NOT_A_DISK = re.compile(
    r"^/dev/(null|zero|full|random|urandom|tty\d*|console|ptmx|stdin|stdout|stderr|kmsg|"
    r"fd|fd/\d+|pts|pts/\d+|shm(/.*)?|mqueue(/.*)?|hugepages(/.*)?|tcp/.*|udp/.*)$"
)
# Writing under these changes the running kernel's devices or power state at once:
# `echo mem > /sys/power/state`, `echo 1 > /sys/block/sda/device/delete`.
_CRITICAL_PREFIXES = (
    "/sys/power/", "/sys/block/", "/sys/class/block/", "/sys/class/watchdog/",
    "/proc/sysrq-trigger", "/dev/watchdog",
)  # fmt: skip
_WATCHDOG_RE = re.compile(r"^/dev/watchdog\d*$|^/dev/watchdog")
HARMLESS_DEVICES = frozenset(
    {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/fd/1", "/dev/fd/2"}
)

# Under /proc only these leaves are plain system information; the rest
# (environ, mem, fd/, whole directories read recursively) may hold secrets.
PROC_SAFE_LEAVES = frozenset(
    {"cpuinfo", "meminfo", "loadavg", "uptime", "version", "stat", "vmstat", "diskstats",
     "partitions", "swaps", "filesystems", "interrupts", "modules", "mounts", "mountinfo",
     "status", "statm", "cmdline", "comm", "limits", "cgroup", "io", "sched", "schedstat",
     "oom_score", "oom_adj", "oom_score_adj", "wchan", "stack", "devices", "buddyinfo",
     "zoneinfo", "slabinfo", "softirqs", "cgroups", "crypto", "misc", "locks", "consoles",
     "execdomains", "kallsyms", "key-users", "net", "sys", "pressure", "cpu", "memory",
     "psi", "tty", "driver", "fs", "kernel", "vm", "mdstat", "ioports", "dma", "pagetypeinfo",
     "scsi", "drbd", "irq", "bus", "sysvipc"}
)  # fmt: skip


# Parts of /proc/<pid> that open another process's memory, files or environment.
_PROC_DOORS = frozenset(
    {"environ", "fd", "fdinfo", "mem", "root", "cwd", "map_files", "exe", "kcore", "pagemap",
     "maps", "smaps", "auxv", "syscall", "personality"}
)  # fmt: skip
_GLOB_CHARS = frozenset("*?[")
_HOME = os.path.expanduser("~")


def _has_glob(s: str) -> bool:
    return any(c in _GLOB_CHARS for c in s)


def _escapes(relative: str) -> bool:
    """Whether a relative path climbs above its starting directory (`x/../..`)."""
    depth = 0
    for part in relative.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def canonical_path(word: str) -> str | None:
    """An absolute or home-relative path, lexically normalized; None for relative paths.

    `$HOME`, `${HOME}` and `~` all become `~`; `~user` becomes `/home/user`
    (`~root` → `/root`); `//`, `/./` and `..` are resolved lexically.
    """
    p = word.strip()
    for spelling in ("${HOME}", "$HOME"):
        if p == spelling or p.startswith(spelling + "/"):
            p = "~" + p[len(spelling) :]
    if p.startswith("~"):
        head, _, rest = p.partition("/")
        user = head[1:]
        if user == "":
            base = "~"
        elif user == "root":
            base = "/root"
        elif re.fullmatch(r"[A-Za-z0-9._-]+", user):
            base = "/home/" + user
        else:
            return None
        if _escapes(rest):
            # leaves the home directory: resolve against the real one
            real = _HOME if base == "~" else base
            return posixpath.normpath(real + "/" + rest)
        norm = posixpath.normpath("/" + rest) if rest else "/"
        if base == "~":
            return "~" if norm == "/" else "~" + norm
        return posixpath.normpath(base + norm)
    if not p.startswith("/"):
        return None
    norm = posixpath.normpath(p)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def _is_home(path: str) -> bool:
    if path in ("~", _HOME):
        return True
    # /home/<user> itself (depth 2) is somebody's home directory.
    return bool(re.fullmatch(r"/home/[^/]+", path))


def is_protected(word: str) -> bool:
    """Whether deleting (recursively) or moving `word` would wipe the system or a home."""
    path = canonical_path(word)
    if path is None:
        return False
    if path in PROTECTED_PATHS or _is_home(path):
        return True
    if _has_glob(path):
        candidates = [*PROTECTED_PATHS, "/home/user", _HOME]
        if any(fnmatch.fnmatchcase(c, path) for c in candidates):
            return True
        # `/etc/*`, `~/.*`, `/usr/*`: every entry of a protected directory.
        head, tail = posixpath.split(path)
        if re.fullmatch(r"[*?.\[\]!^]+", tail) and (
            head in PROTECTED_PATHS or _is_home(head) or head == ""
        ):
            return True
    return False


def is_disk(word: str) -> bool:
    path = canonical_path(word) or word
    if path in HARMLESS_DEVICES:
        return False
    if _DISK_RE.match(path):
        return True
    if path.startswith("/dev/") and not _has_glob(path) and not _NOT_A_DISK.match(path):
        return True
    # a glob over block devices: /dev/sd*
    return path.startswith("/dev/") and _has_glob(path) and fnmatch.fnmatchcase("/dev/sda", path)


def is_watchdog(word: str) -> bool:
    """Whether `word` names a watchdog device: opening one and not feeding it reboots."""
    path = canonical_path(word) or ""
    if _has_glob(path):
        return path.startswith("/dev/") and fnmatch.fnmatchcase("/dev/watchdog", path)
    return bool(_WATCHDOG_RE.match(path))


def is_critical_file(word: str) -> bool:
    path = canonical_path(word)
    if path is None:
        return False
    if path in CRITICAL_FILES or path == "/boot" or path.startswith("/boot/"):
        return True
    if path.startswith(_CRITICAL_PREFIXES) or path in ("/sys/power", "/sys/block"):
        return True
    if path.startswith("/sys/devices/") and "/block/" in path:
        return True
    if _has_glob(path):
        return any(fnmatch.fnmatchcase(c, path) for c in CRITICAL_FILES)
    return False


def glob_component_matches(name: str, pattern: str) -> bool:
    """Whether bash would match one path component `name` with `pattern`.

    Unlike fnmatch, a leading `.` must be matched literally (bash's default,
    no dotglob): `*` does not reach `.env`, `.*` does.
    """
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _could_match_secret(component: str) -> bool:
    """A literal component that is a secret name, or a glob that could reach one."""
    if _has_glob(component):
        if not component.strip("*"):
            # `*` alone: every file, so no particular secret; whole paths are
            # matched against the known secret paths instead (`/etc/*`), and the
            # sandbox hides the rest (a known limit: see docs).
            return False
        if not component.strip("*?[]!^"):
            return True  # `????`, `?*`: only the length is known, any short name fits
        return any(glob_component_matches(s, component) for s in SECRET_SAMPLES) or any(
            glob_component_matches(s, component) for s in SECRET_DIRS
        )
    return secret_name_matches(component)


def _glob_reaches_secret_path(path: str) -> bool:
    """Whether an absolute (or `~`) path glob could match a known secret path."""
    parts = path.split("/")
    for sample in SECRET_PATH_SAMPLES:
        sample_parts = sample.split("/")
        if len(sample_parts) != len(parts):
            continue  # recursive reads below a glob are the sandbox's to stop
        if all(
            glob_component_matches(name, pat) if _has_glob(pat) else name == pat
            for name, pat in zip(sample_parts, parts, strict=False)
        ):
            return True
    return False


def _env_secret_reason(word: str, path: str) -> str | None:
    """A path to (or a glob that could reach) a file the bot's environment names."""
    named = env_secret_paths()
    if not named:
        return None
    if path.startswith("~"):
        path = _HOME + path[1:]
    if _under(path, named):
        return f"`{word}` is a credential file the bot's environment names"
    if _has_glob(path):
        parts = path.split("/")
        for sample in named:
            sample_parts = sample.split("/")
            if len(sample_parts) != len(parts):
                continue  # a recursive read above it is `holds_secrets`' to judge
            if all(
                glob_component_matches(n, p) if _has_glob(p) else n == p
                for n, p in zip(sample_parts, parts, strict=False)
            ):
                return f"`{word}` could match a credential file the bot's environment names"
    return None


# Where secrets live, as directories a recursive read may start above.
_SECRET_HOLDERS = (
    *SECRET_PATH_SAMPLES, *SECRET_ROOTS, "/proc/1/environ", "/home/user/.ssh/id_rsa",
    "/root/.ssh/id_rsa",
)  # fmt: skip


def holds_secrets(word: str) -> bool:
    """Whether a recursive read starting at directory `word` reaches a secret location.

    The workspace itself (`.`, or a climb out of it with `..`) counts: a `.env`
    usually sits at a project's root. A named subdirectory (`src`) does not; a
    secret file inside one is left to the sandbox (a known limit).
    """
    path = canonical_path(word)
    if path is None:
        # `notes/..` and `./src/../` are the workspace root again
        return posixpath.normpath(word or ".") == "." or _escapes(word)
    if path in ("/", "~") or _is_home(path):
        return True
    prefix = path.rstrip("/") + "/"
    holders = (*_SECRET_HOLDERS, *env_secret_paths())
    return any(h.startswith(prefix) or h == path for h in holders)


@functools.lru_cache(maxsize=8)
def _env_secrets_for(values: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(credential_env_paths(dict(values)))


def env_secret_paths() -> tuple[str, ...]:
    """The credential paths the bot's own environment names ($KUBECONFIG, ...).

    Read on every call (tests and operators change the environment), cached
    on the values: the sandbox hides the same paths (`credential_env_paths`).
    """
    values = tuple((n, os.environ[n]) for n in CREDENTIAL_ENV_VARS if n in os.environ)
    return _env_secrets_for(values) if values else ()


def _under(path: str, roots: tuple[str, ...] | frozenset[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


# A second net for paths embedded in larger arguments (`load("/etc/shadow")`,
# `--config=x,~/.aws/credentials`): these substrings anywhere need approval.
_SECRET_SUBSTRING = re.compile(
    r"\.ssh(/|$)|/etc/(g?shadow|sudoers)|\.aws/|\.kube/|\.docker/config|\.gnupg|"
    r"\.git-credentials|\.netrc|\.pgpass|/environ\b|\bid_(rsa|dsa|ecdsa|ed25519)|"
    r"(^|[^\w.])\.env(\b|$)|\.config/(gcloud|gh)/"
)


def secret_reason(word: str) -> str | None:
    """Why reading `word` could expose a credential, or None."""
    if _SECRET_SUBSTRING.search(word):
        return f"`{word}` names a secret location"
    candidates = [word]
    if word.startswith("-") and "=" in word:
        candidates.append(word.split("=", 1)[1])
    elif word.startswith("-") and not word.startswith("--") and len(word) > 2:
        candidates.append(word[2:])  # -f/etc/shadow
    for cand in candidates:
        reason = _secret_path_reason(cand)
        if reason:
            return reason
    return None


def _secret_path_reason(word: str) -> str | None:
    if not word or word == "-":
        return None
    path = canonical_path(word) or word
    if not path.startswith(("/", "~")) and _escapes(path):
        # `../../proc/1/mem` from the workspace: how far up the climb ends is not
        # known, so judge the rest as if it reached `/`.
        rest = [p for p in path.split("/") if p not in ("", ".", "..")]
        climbed = "/" + "/".join(rest)
        if climbed != "/" and _secret_path_reason(climbed):
            return f"`{word}` climbs out of the workspace to a secret location"
    if path.startswith(("/", "~")):
        if _under(path, SECRET_ROOTS) or _under(
            path, tuple(p for p in SYSTEM_SECRETS if not _has_glob(p))
        ):
            return f"`{word}` is a secret location"
        if _has_glob(path) and _glob_reaches_secret_path(path):
            return f"`{word}` could match a secret location"
        if env_reason := _env_secret_reason(word, path):
            return env_reason
    if is_disk(path) and path.startswith("/dev/"):
        return f"`{word}` is a raw disk device"
    if path in ("/dev/mem", "/dev/kmem", "/dev/port"):
        return f"`{word}` exposes memory"
    if path == "/proc" or path.startswith("/proc/"):
        parts = [p for p in path.split("/") if p][1:]
        if not parts or _has_glob(path):
            return f"`{word}` may reach other processes' environments"
        leaf_ok = parts[-1] in PROC_SAFE_LEAVES or parts[0] in ("net", "sys", "pressure")
        if parts[-1] == "cmdline" and parts[0] not in ("self", "thread-self", "cmdline"):
            # another process's command line: in a container PID 1 may be the bot,
            # started with its tokens as arguments
            leaf_ok = False
        if not leaf_ok or _PROC_DOORS.intersection(parts):
            return f"`{word}` may expose a process's secrets"
    if _is_public_certificate(path):
        return None
    components = [c for c in re.split(r"[/:,]", path) if c]
    for i, comp in enumerate(components):
        if comp in SECRET_DIRS or (
            _has_glob(comp)
            and comp.strip("*?[]!^.-")
            and any(fnmatch.fnmatchcase(d, comp) for d in SECRET_DIRS)
        ):
            return f"`{word}` is in a credentials directory"
        if i + 1 < len(components) and (comp, components[i + 1]) in SECRET_DIR_PAIRS:
            return f"`{word}` is in a credentials directory"
        if _could_match_secret(comp):
            return f"`{word}` looks like a secret (keys, tokens or passwords)"
    return None


# Directories of the system's trusted CA certificates: public by design (the
# private keys live in /etc/ssl/private), so `openssl x509 -in
# /etc/ssl/certs/x.pem` is not a secret read although `*.pem` usually is.
PUBLIC_CERT_DIRS = (
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/usr/local/share/ca-certificates",
    "/etc/ca-certificates",
    "/etc/pki/ca-trust/extracted",
    "/etc/pki/tls/certs",
)


def _is_public_certificate(path: str) -> bool:
    """A literal certificate file (`*.pem`, `*.crt`) under a CA certificate directory."""
    return (
        not _has_glob(path)
        and ".." not in path.split("/")
        and path.endswith((".pem", ".crt", ".cer"))
        and _under(path, PUBLIC_CERT_DIRS)
    )


def _outside_workspace(word: str) -> bool:
    """A write target that may be outside the workspace."""
    if "$" in word or "`" in word:
        return True
    path = canonical_path(word)
    if path is None:
        return ".." in word.split("/")
    return not (path.startswith("/tmp/") or path.startswith("/var/tmp/") or path == "/tmp")
