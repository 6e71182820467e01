"""`shell_exec_safe`: classify a shell command, then run it hardened.

Classification parses the command with a real shell parser (bashlex) and
judges every simple command it finds, through wrappers (`sudo`, `env`,
`timeout`, …), command strings (`bash -c`, `eval`) and substitutions. The
rule is "prove it read-only or ask": only a known read-only program with flags
known to be harmless runs without approval. Anything the classifier does not
understand needs approval; destroying the machine is blocked outright.

Execution runs a simple command as argv (no shell), anything else with
`bash -c`, always in the workspace, with stdin closed, a scrubbed environment,
resource limits, capped output and a timeout that kills the whole process
group.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import posixpath
import re
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import bashlex
from pydantic import BaseModel, Field

from runtime.tools.base import (
    RISK_ORDER,
    Assessment,
    RiskLevel,
    Tool,
    ToolArgumentError,
    ToolResult,
)

MAX_COMMAND_CHARS = 10_000
# Beyond this we do not even hand the text to the parser (it is not linear).
MAX_PARSE_CHARS = 20_000
MAX_NESTING = 6  # bash -c "bash -c '…'" and substitutions, before we give up


# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


class Classification(BaseModel):
    action_type: str
    risk_level: RiskLevel
    requires_approval: bool
    blocked: bool
    reason: str
    # argv of every simple command found (including inside `bash -c`, substitutions)
    commands: list[list[str]] = Field(default_factory=list)
    # One simple command with literal words only: runnable as argv without a shell.
    simple: bool = False

    def assessment(self) -> Assessment:
        return Assessment(
            action_type=self.action_type,
            risk_level=self.risk_level,
            requires_approval=self.requires_approval,
            blocked=self.blocked,
            reason=self.reason,
        )


@dataclass(frozen=True)
class Verdict:
    """The judgement of one part of a command."""

    action: str
    risk: str
    reason: str
    blocked: bool = False

    @property
    def rank(self) -> tuple[int, int]:
        return (1 if self.blocked else 0, RISK_ORDER[self.risk])


def _opts(text: str) -> tuple[str, ...]:
    """Option tables written as one string: "-a --all -b"."""
    return tuple(text.split())


def _read(reason: str) -> Verdict:
    return Verdict("read", "low", reason)


def _block(reason: str) -> Verdict:
    return Verdict("destructive", "critical", reason, blocked=True)


def worst(verdicts: Sequence[Verdict]) -> Verdict | None:
    """The verdict that decides a compound command: blocked beats risk; ties keep the first."""
    best: Verdict | None = None
    for v in verdicts:
        if best is None or v.rank > best.rank:
            best = v
    return best


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

SYSTEM_BIN_DIRS = frozenset(
    {"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"}
)

# Read-only programs whose every flag is harmless (none writes, executes or
# never ends). Their arguments are still checked for secret locations.
PLAIN_READ_ONLY = frozenset(
    {
        "ls", "cat", "head", "wc", "cut", "tr", "nl", "column", "paste", "join", "comm",
        "fold", "expand", "unexpand", "rev", "tac", "df", "du", "free", "uptime", "uname",
        "whoami", "id", "groups", "logname", "tty", "users", "w", "who", "last", "lastlog",
        "stat", "which", "whereis", "realpath", "readlink", "basename", "dirname", "pwd",
        "echo", "true", "false", "test", "[", "seq", "sleep", "expr",
        "md5sum", "sha1sum", "sha224sum", "sha256sum", "sha384sum", "sha512sum", "b2sum",
        "cksum", "sum", "diff", "cmp", "nproc", "lscpu", "lsblk", "arch", "lsmod", "lspci",
        "lsusb", "getconf", "locale", "vmstat", "grep", "egrep", "fgrep", "pgrep", "pidof",
        "lsof", "netstat", "dig", "nslookup", "host", "traceroute", "tracepath", "printenv",
        "jq", "od", "hexdump", "strings", "numfmt", "fmt", "pr", "tsort", "cd", "type",
    }
)  # fmt: skip

# Programs known to be read-only except for some flags: (short letters, long
# options, why those need approval). Long options match GNU-style abbreviations
# (`--outp` is `--output`), so a given option that is a prefix of a forbidden one
# counts. Short letters match anywhere in a bundle (`-ro`), conservatively.
FLAG_POLICIES: dict[str, tuple[str, frozenset[str], str]] = {
    "sort": ("o", frozenset({"--output", "--compress-program"}), "`sort -o` writes a file"),
    "shuf": ("o", frozenset({"--output"}), "`shuf -o` writes a file"),
    "tail": ("fF", frozenset({"--follow", "--retry"}), "`tail -f` follows forever"),
    "rg": (
        "",
        frozenset({"--pre", "--pre-glob", "--hostname-bin"}),
        "`rg --pre` runs a program on every file",
    ),
    "printf": ("v", frozenset(), "`printf -v` assigns a shell variable"),
    "yq": (
        "is",
        frozenset({"--inplace", "--in-place", "--split-exp"}),
        "`yq -i` edits files in place",
    ),
    "base64": ("o", frozenset({"--output"}), "`base64 -o` writes a file"),
    "tree": ("oR", frozenset({"--output"}), "`tree -o` writes a file"),
    "file": ("C", frozenset({"--compile"}), "`file -C` writes a compiled magic file"),
    "journalctl": (
        "f",
        frozenset(
            _opts(
                "--follow --vacuum-size --vacuum-time --vacuum-files --rotate --flush --sync "
                "--relinquish-var --smart-relinquish-var --setup-keys --update-catalog "
                "--cursor-file"
            )
        ),
        "that `journalctl` option changes the journal, writes a file or follows forever",
    ),
    "dmesg": (
        "cCDEnwW",
        frozenset(
            _opts(
                "--clear --read-clear --console-off --console-on --console-level --follow "
                "--follow-new"
            )
        ),
        "that `dmesg` option clears the kernel log, changes the console or follows forever",
    ),
    "ss": ("KE", frozenset({"--kill", "--events"}), "`ss -K` kills sockets; `ss -E` never ends"),
    "lsof": ("r", frozenset(), "`lsof -r` repeats forever"),
    "free": ("sc", frozenset({"--seconds", "--count"}), "`free -s` repeats forever"),
    "netstat": ("c", frozenset({"--continuous"}), "`netstat -c` never ends"),
}

# Programs whose flags matter: a glob or variable that could expand to a flag
# (`find . *` with a file named `-delete`) needs approval.
FLAG_SENSITIVE = frozenset(
    set(FLAG_POLICIES)
    | {"find", "fd", "fdfind", "sed", "awk", "gawk", "mawk", "nawk", "git", "uniq", "xxd",
       "date", "hostname", "ps", "ip", "ping", "ping6", "top", "mount", "systemctl",
       "kubectl", "docker", "podman", "sysctl", "crontab", "kill", "dpkg", "rpm"}
)  # fmt: skip

# Safe to name in a read-only command's arguments: set by the login, never a flag.
SAFE_VARIABLES = frozenset({"HOME", "USER", "LOGNAME", "PWD", "TMPDIR", "HOSTNAME", "SHELL"})

# Arguments that do not read the named path (so secrets do not matter).
NON_READING = frozenset(
    {"echo", "printf", "basename", "dirname", "true", "false", "test", "[", "realpath",
     "readlink", "which", "whereis", "type", "stat", "pwd", "sleep", "seq", "expr"}
)  # fmt: skip

SHELLS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "rbash", "yash"}
)
INTERPRETERS = frozenset(
    {
        "python", "python2", "python3", "pypy", "pypy3", "perl", "ruby", "irb", "node",
        "nodejs", "deno", "bun", "php", "lua", "luajit", "Rscript", "R", "julia", "tclsh",
        "wish", "java", "jshell", "groovy", "scala", "kotlin", "osascript", "pwsh",
        "powershell", "erl", "escript", "ghci", "runghc", "racket", "guile", "sbcl",
        "ocaml", "swift", "expect", "gdb", "make", "cmake", "ninja", "terraform",
        "ansible", "ansible-playbook", "helm", "go", "cargo", "rustc", "gcc", "cc", "clang",
        "g++", "c++", "tsc", "ts-node", "pytest", "tox", "nox", "invoke", "rake", "gradle",
        "mvn", "ant", "vim", "vi", "nvim", "emacs", "nano", "ed", "ex",
    }
)  # fmt: skip
_PYTHON_RE = re.compile(r"^python[0-9.]*$")
PAGERS = frozenset({"less", "more", "most", "pg", "man", "info", "view", "w3m", "lynx"})
# curl/wget options that send data somewhere (exfiltration needs a closer look).
_UPLOAD_OPTIONS = frozenset(
    _opts(
        "--upload-file --data --data-binary --data-raw --data-urlencode --form --request "
        "--post-data --post-file --method --body-data --body-file --json"
    )
)
DOWNLOADERS = frozenset(
    {"curl", "wget", "fetch", "aria2c", "http", "https", "httpie", "lwp-request", "GET", "axel"}
)

WRITE_PROGRAMS: dict[str, str] = {
    "touch": "`touch` creates or changes files",
    "mkdir": "`mkdir` creates directories",
    "cp": "`cp` copies files",
    "mv": "`mv` moves or renames files",
    "rm": "`rm` deletes files",
    "rmdir": "`rmdir` deletes directories",
    "unlink": "`unlink` deletes a file",
    "shred": "`shred` destroys file contents",
    "ln": "`ln` creates links",
    "tee": "`tee` writes its input to files",
    "truncate": "`truncate` changes file sizes",
    "install": "`install` copies files into place",
    "patch": "`patch` edits files",
    "unzip": "`unzip` extracts files",
    "zip": "`zip` writes an archive",
    "tar": "`tar` writes or extracts archives",
    "gzip": "`gzip` replaces files with compressed ones",
    "gunzip": "`gunzip` replaces files with decompressed ones",
    "bzip2": "`bzip2` replaces files with compressed ones",
    "bunzip2": "`bunzip2` replaces files with decompressed ones",
    "xz": "`xz` replaces files with compressed ones",
    "unxz": "`unxz` replaces files with decompressed ones",
    "zstd": "`zstd` writes compressed files",
    "7z": "`7z` writes or extracts archives",
    "split": "`split` writes files",
    "csplit": "`csplit` writes files",
    "dd": "`dd` copies raw data and can overwrite anything",
    "mktemp": "`mktemp` creates files",
    "chmod": "`chmod` changes permissions",
    "mkfifo": "`mkfifo` creates files",
    "rename": "`rename` renames files",
    "rsync": "`rsync` copies files",
    "ssh-keygen": "`ssh-keygen` writes keys",
    "sdiff": "`sdiff` can write a merged file",
    "uniq": "`uniq` with a second operand writes its output to that file",
    "xxd": "`xxd` with a second operand writes its output to that file",
    "sed": "`sed -i` edits files in place",
}
PROCESS_PROGRAMS: dict[str, str] = {
    "kill": "`kill` signals processes",
    "pkill": "`pkill` signals processes",
    "killall": "`killall` signals processes",
    "skill": "`skill` signals processes",
    "renice": "`renice` changes process priorities",
    "service": "`service` controls system services",
    "supervisorctl": "`supervisorctl` controls services",
    "pm2": "`pm2` controls processes",
    "launchctl": "`launchctl` controls services",
    "initctl": "`initctl` controls services",
    "start-stop-daemon": "`start-stop-daemon` controls services",
    "crontab": "`crontab` changes scheduled jobs",
    "at": "`at` schedules commands",
    "batch": "`batch` schedules commands",
    "systemctl": "that `systemctl` verb changes services",
    "kubectl": "that `kubectl` command changes the cluster or runs something in it",
    "docker": "that `docker` command changes containers or images",
    "podman": "that `podman` command changes containers or images",
    "docker-compose": "`docker-compose` changes containers",
    "tmux": "`tmux` starts or controls sessions",
    "screen": "`screen` starts sessions",
    "loginctl": "`loginctl` controls sessions",
    "journalctl": "that `journalctl` option changes the journal or follows it forever",
}
PACKAGE_PROGRAMS = frozenset(
    {
        "apt", "apt-get", "aptitude", "dpkg", "yum", "dnf", "rpm", "zypper", "pacman", "apk",
        "brew", "snap", "flatpak", "pip", "pip3", "pipx", "uv", "poetry", "conda", "mamba",
        "npm", "npx", "yarn", "pnpm", "gem", "bundle", "composer", "nix-env", "nix", "port",
        "emerge", "opkg", "pkg", "easy_install", "cpan", "cpanm", "dpkg-reconfigure",
        "update-alternatives",
    }
)  # fmt: skip
NETWORK_PROGRAMS: dict[str, str] = {
    "ssh": "`ssh` runs commands on another machine",
    "scp": "`scp` copies files over the network",
    "sftp": "`sftp` transfers files over the network",
    "nc": "`nc` opens network connections",
    "ncat": "`ncat` opens network connections",
    "netcat": "`netcat` opens network connections",
    "socat": "`socat` opens network connections",
    "telnet": "`telnet` opens network connections",
    "ftp": "`ftp` transfers files over the network",
    "tftp": "`tftp` transfers files over the network",
    "iptables": "`iptables` changes the firewall",
    "ip6tables": "`ip6tables` changes the firewall",
    "nft": "`nft` changes the firewall",
    "ufw": "`ufw` changes the firewall",
    "firewall-cmd": "`firewall-cmd` changes the firewall",
    "route": "`route` changes routing",
    "ifconfig": "`ifconfig` changes network interfaces",
    "ifup": "`ifup` changes network interfaces",
    "ifdown": "`ifdown` changes network interfaces",
    "nmcli": "`nmcli` changes network settings",
    "tc": "`tc` changes traffic control",
    "ethtool": "`ethtool` changes network interfaces",
    "iw": "`iw` changes wireless settings",
    "ip": "that `ip` command changes network configuration",
    "ssh-copy-id": "`ssh-copy-id` installs keys on another machine",
    "sshpass": "`sshpass` runs ssh with a password",
    "mosh": "`mosh` runs commands on another machine",
}
PRIVILEGED_PROGRAMS = frozenset(
    {
        "chown", "chgrp", "mount", "umount", "useradd", "userdel", "usermod", "groupadd",
        "groupdel", "groupmod", "passwd", "chpasswd", "chsh", "visudo", "sysctl", "modprobe",
        "insmod", "rmmod", "setenforce", "swapon", "swapoff", "setcap", "chattr", "mknod",
        "losetup", "cryptsetup", "pvcreate", "vgcreate", "lvcreate", "lvremove", "vgremove",
        "mdadm", "zpool", "zfs", "hwclock", "timedatectl", "hostnamectl", "localectl",
        "hostname", "setfacl", "update-grub", "grub-install", "efibootmgr", "fdisk", "sfdisk",
        "parted", "gdisk", "sgdisk", "cfdisk", "mkfs", "mke2fs", "mkswap", "wipefs", "tune2fs",
        "resize2fs", "e2fsck", "fsck", "blkdiscard", "date", "pkexec",
    }
)  # fmt: skip

POWER_PROGRAMS = frozenset({"shutdown", "reboot", "halt", "poweroff"})
SYSTEMCTL_POWER = frozenset(
    {"poweroff", "reboot", "halt", "kexec", "soft-reboot", "suspend-then-hibernate"}
)
# Programs whose blocked forms we also look for after an unknown prefix
# (`strace -f rm -rf /`, `taskset 1 dd of=/dev/sda`).
SUFFIX_BLOCK_PROGRAMS = frozenset(
    {"rm", "dd", "shred", "wipefs", "mkfs", "mke2fs", "mkswap", "chmod", "chown", "chgrp",
     "fdisk", "sfdisk", "parted", "gdisk", "sgdisk", "cfdisk", "blkdiscard"}
)  # fmt: skip

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
    r"root$|sr\d|nbd\d|rbd\d|zram\d|bcache)"
)
HARMLESS_DEVICES = frozenset(
    {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/fd/1", "/dev/fd/2"}
)

# Secret locations. Directory components that hold credentials:
SECRET_DIRS = frozenset(
    {".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store", "sudoers.d",
     ".vault", ".gcloud", "keyrings"}
)  # fmt: skip
SECRET_DIR_PAIRS = frozenset({(".config", "gcloud"), (".config", "gh"), (".config", "hub")})
# File names (fnmatch patterns) that hold credentials:
SECRET_NAMES = _opts(
    "id_rsa* id_dsa* id_ecdsa* id_ed25519* *.pem *.key *.p12 *.pfx *.kdbx *.jks *.keystore .env "
    ".env.* *.env .envrc .netrc _netrc .pgpass .git-credentials .npmrc .pypirc credentials "
    "credentials.json *credentials*.json .vault-token shadow shadow- gshadow gshadow- sudoers "
    "environ ssh_host_*_key .htpasswd master.key *.tfstate *.tfstate.backup kubeconfig .dockercfg "
    "service-account*.json .my.cnf secrets.yml secrets.yaml secrets.json *.ovpn authorized_keys "
    "known_hosts"
)
# Concrete samples, to test whether a glob (`~/.ss*/*`, `*.pe?`) could reach a secret.
SECRET_SAMPLES = _opts(
    "id_rsa id_dsa id_ecdsa id_ed25519 x.pem x.key x.p12 x.pfx .env .env.local prod.env .netrc "
    ".pgpass .git-credentials .npmrc .pypirc credentials credentials.json .vault-token shadow "
    "gshadow sudoers environ x.tfstate .ssh .aws .gnupg .kube .docker"
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
     "psi", "tty", "driver", "fs", "kernel", "vm"}
)  # fmt: skip


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------

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
    # a glob over block devices: /dev/sd*
    return path.startswith("/dev/") and _has_glob(path) and fnmatch.fnmatchcase("/dev/sda", path)


def is_critical_file(word: str) -> bool:
    path = canonical_path(word)
    if path is None:
        return False
    if path in CRITICAL_FILES or path == "/boot" or path.startswith("/boot/"):
        return True
    if _has_glob(path):
        return any(fnmatch.fnmatchcase(c, path) for c in CRITICAL_FILES)
    return False


def _could_match_secret(component: str) -> bool:
    """A literal component that is a secret name, or a glob that could reach one."""
    if _has_glob(component):
        if not component.strip("*?[]!^.-"):
            # `*`, `*.*`, `.*`: too broad to name a secret (a known limit: see docs).
            return False
        return any(fnmatch.fnmatchcase(s, component) for s in SECRET_SAMPLES)
    return any(fnmatch.fnmatchcase(component, pat) for pat in SECRET_NAMES)


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
    if is_disk(path) and path.startswith("/dev/"):
        return f"`{word}` is a raw disk device"
    if path in ("/dev/mem", "/dev/kmem", "/dev/port"):
        return f"`{word}` exposes memory"
    if path == "/proc" or path.startswith("/proc/"):
        parts = [p for p in path.split("/") if p][1:]
        if not parts or _has_glob(path):
            return f"`{word}` may reach other processes' environments"
        leaf_ok = parts[-1] in PROC_SAFE_LEAVES or parts[0] in ("net", "sys", "pressure")
        if not leaf_ok or "environ" in parts or "fd" in parts or "mem" in parts:
            return f"`{word}` may expose a process's secrets"
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


def _outside_workspace(word: str) -> bool:
    """A write target that may be outside the workspace."""
    if "$" in word or "`" in word:
        return True
    path = canonical_path(word)
    if path is None:
        return ".." in word.split("/")
    return not (path.startswith("/tmp/") or path.startswith("/var/tmp/") or path == "/tmp")


# --------------------------------------------------------------------------
# Option parsing (GNU style, conservative)
# --------------------------------------------------------------------------


@dataclass
class Opts:
    options: list[tuple[str, str | None]] = field(default_factory=list)
    positionals: list[int] = field(default_factory=list)  # indices into argv
    error: str | None = None

    def has(self, *names: str) -> bool:
        return any(name in names for name, _ in self.options)

    def values(self, *names: str) -> list[str]:
        return [v for n, v in self.options if n in names and v is not None]


def getopt(
    argv: Sequence[str],
    start: int = 1,
    *,
    flags: Sequence[str] = (),
    values: Sequence[str] = (),
    optional: Sequence[str] = (),
    stop_at_positional: bool = False,
    long_abbrev: bool = True,
) -> Opts:
    """Parse options the way getopt_long does, refusing what it does not know.

    `flags` take no value, `values` take one (`-n5`, `-n 5`, `--lines=5`,
    `--lines 5`), `optional` long options take a value only as `--x=v`. Any
    unknown option sets `error`: the caller then asks for approval.
    """
    known_long = [o for o in (*flags, *values, *optional) if o.startswith("--")]
    flag_set, value_set, optional_set = set(flags), set(values), set(optional)
    out = Opts()
    i = start
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.positionals.extend(range(i + 1, len(argv)))
            break
        if arg.startswith("--"):
            name, eq, val = arg.partition("=")
            if name not in known_long and long_abbrev:
                matches = [o for o in known_long if o.startswith(name)]
                if len(matches) == 1:
                    name = matches[0]
            if name in value_set:
                if eq:
                    out.options.append((name, val))
                elif i + 1 < len(argv):
                    out.options.append((name, argv[i + 1]))
                    i += 1
                else:
                    out.error = f"option {name} needs a value"
                    return out
            elif name in optional_set:
                out.options.append((name, val if eq else None))
            elif name in flag_set and not eq:
                out.options.append((name, None))
            else:
                out.error = f"unknown option `{arg}`"
                return out
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                opt = "-" + arg[j]
                if opt in value_set:
                    rest = arg[j + 1 :]
                    if rest:
                        out.options.append((opt, rest))
                    elif i + 1 < len(argv):
                        out.options.append((opt, argv[i + 1]))
                        i += 1
                    else:
                        out.error = f"option {opt} needs a value"
                        return out
                    break
                if opt in flag_set:
                    out.options.append((opt, None))
                    j += 1
                    continue
                out.error = f"unknown option `{opt}`"
                return out
        else:
            if stop_at_positional:
                out.positionals.extend(range(i, len(argv)))
                break
            out.positionals.append(i)
        i += 1
    return out


def _long_hit(arg: str, longs: frozenset[str] | set[str]) -> bool:
    name = arg.split("=", 1)[0]
    return len(name) > 2 and any(f.startswith(name) for f in longs)


def has_flag(argv: Sequence[str], shorts: str, longs: frozenset[str] | set[str]) -> bool:
    """Conservative: any argument that is, or may be an abbreviation of, a listed option."""
    for arg in argv[1:]:
        if arg.startswith("--"):
            if _long_hit(arg, longs):
                return True
        elif arg.startswith("-") and len(arg) > 1 and any(c in shorts for c in arg[1:]):
            return True
    return False


# --------------------------------------------------------------------------
# Blocked forms
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Per-program read-only policies
# --------------------------------------------------------------------------

# A policy gets argv and returns None when the call is read-only, or a Verdict.
Policy = Callable[[list[str]], Verdict | None]


def _approval(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


def _policy_find(argv: list[str]) -> Verdict | None:
    bad = {"-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0",
           "-fprintf", "-fls"}  # fmt: skip
    for arg in argv[1:]:
        if arg in bad:
            risk = (
                "medium"
                if arg in ("-delete", "-fprint", "-fprint0", "-fprintf", "-fls")
                else "high"
            )
            action = "write" if risk == "medium" else "process"
            what = "deletes or writes files" if risk == "medium" else "runs other commands"
            return _approval(action, risk, f"`find {arg}` {what}")
    return None


def _policy_fd(argv: list[str]) -> Verdict | None:
    for arg in argv[1:]:
        if arg.startswith("--exec") or (
            arg.startswith("-") and not arg.startswith("--") and ("x" in arg or "X" in arg)
        ):
            return _approval("process", "high", "`fd --exec` runs other commands")
    return None


_SED_FLAGS = _opts(
    "-n --quiet --silent -E -r --regexp-extended -s --separate -u --unbuffered -z --null-data "
    "--posix --debug --sandbox -b --binary --follow-symlinks"
)
_SED_VALUES = ("-e", "--expression", "-l", "--line-length", "-f", "--file", "-i", "--in-place")


def _policy_sed(argv: list[str]) -> Verdict | None:
    if has_flag(argv, "i", {"--in-place"}):
        return _approval("write", "medium", "`sed -i` edits files in place")
    opts = getopt(argv, flags=_SED_FLAGS, values=_SED_VALUES)
    if opts.error:
        return _approval("unknown", "medium", f"`sed` with an {opts.error} needs approval")
    if opts.has("-f", "--file"):
        return _approval(
            "unknown", "medium", "`sed -f` runs a script file the classifier cannot see"
        )
    scripts = opts.values("-e", "--expression")
    files = [argv[i] for i in opts.positionals]
    if not scripts:
        if not files:
            return None
        scripts, files = [files[0]], files[1:]
    for script in scripts:
        problem = sed_script_problem(script)
        if problem:
            return _approval("write", "high", f"`sed` script {problem}")
    return None


_SED_SIMPLE = set("=dDgGhHnNpPxzlLqQF")


def sed_script_problem(script: str) -> str | None:
    """Why a sed script is not read-only (`w`, `W`, `e`, `s///w`, `s///e`), or None.

    A small parser for GNU sed's grammar; anything it does not recognise is a
    problem, so a trick it misses needs approval instead of running.
    """
    s, n, i = script, len(script), 0

    def read_delimited(j: int, delim: str) -> int:
        # returns the index just past the closing delimiter, or -1
        while j < n:
            c = s[j]
            if c == "\\":
                j += 2
                continue
            if c == "\n" and delim != "\n":
                return -1
            if c == delim:
                return j + 1
            j += 1
        return -1

    def skip_to_eol(j: int) -> int:
        while j < n and s[j] != "\n":
            j += 1
        return j

    while i < n:
        c = s[i]
        if c in " \t\n;}":
            i += 1
            continue
        if c == "#":
            i = skip_to_eol(i)
            continue
        # addresses
        for _ in range(2):
            if i < n and (s[i].isdigit() or s[i] == "$"):
                i += 1
                while i < n and (s[i].isdigit() or s[i] == "~"):
                    i += 1
            elif i < n and (s[i] == "/" or s[i] == "\\"):
                delim = "/"
                if s[i] == "\\":
                    if i + 1 >= n:
                        return "has an address the classifier does not understand"
                    delim = s[i + 1]
                    i += 1
                i = read_delimited(i + 1, delim)
                if i < 0:
                    return "has an unterminated address"
                while i < n and s[i] in "IM":
                    i += 1
            while i < n and s[i] in " \t":
                i += 1
            if i < n and s[i] == ",":
                i += 1
                while i < n and s[i] in " \t":
                    i += 1
                if i < n and s[i] in "+~":
                    i += 1
                continue
            break
        while i < n and s[i] in " \t!":
            i += 1
        if i >= n:
            return None
        c = s[i]
        if c in "{};\n":
            i += 1
            continue
        if c in _SED_SIMPLE:
            i += 1
            while i < n and s[i].isdigit():  # q5, l40
                i += 1
            continue
        if c in "wWe":
            return f"uses the `{c}` command (writes files or runs commands)"
        if c in "rR":
            end = skip_to_eol(i + 1)
            target = s[i + 1 : end].strip()
            if secret_reason(target):
                return f"reads a secret file `{target}`"
            i = end
            continue
        if c in "aic":
            i = skip_to_eol(i + 1)
            continue
        if c in ":btTv":
            i += 1
            while i < n and s[i] not in ";\n}":
                i += 1
            continue
        if c == "y":
            if i + 1 >= n:
                return "has an incomplete `y` command"
            delim = s[i + 1]
            j = read_delimited(i + 2, delim)
            j = read_delimited(j, delim) if j >= 0 else -1
            if j < 0:
                return "has an incomplete `y` command"
            i = j
            continue
        if c == "s":
            if i + 1 >= n or s[i + 1] in "\\\n":
                return "has an incomplete `s` command"
            delim = s[i + 1]
            j = read_delimited(i + 2, delim)
            j = read_delimited(j, delim) if j >= 0 else -1
            if j < 0:
                return "has an incomplete `s` command"
            i = j
            while i < n and s[i] not in ";\n}":
                f = s[i]
                if f in "we":
                    return f"uses the `s///{f}` flag (writes files or runs commands)"
                if f.isdigit() or f in "gpiImM ":
                    i += 1
                    continue
                return f"has an `s` flag `{f}` the classifier does not understand"
            continue
        return f"uses `{c}`, which the classifier does not understand"
    return None


_AWK_FLAGS = _opts(
    "-S --sandbox -b --characters-as-bytes -c --traditional -P --posix -r --re-interval -N "
    "--use-lc-numeric -n --non-decimal-data -O --optimize -s --no-optimize -M --bignum"
)
_AWK_VALUES = ("-F", "--field-separator", "-v", "--assign", "-e", "--source")
# Substrings that let an awk program write, run commands or load code.
AWK_DANGEROUS = ("system", "|", ">", "getline", "fflush", "close", "@", "print >", "printf >")


def _policy_awk(argv: list[str]) -> Verdict | None:
    opts = getopt(argv, flags=_AWK_FLAGS, values=_AWK_VALUES)
    if opts.error:
        return _approval(
            "unknown", "medium", f"`{argv[0]}` with an {opts.error} may load or write files"
        )
    programs = opts.values("-e", "--source")
    if not programs:
        if not opts.positionals:
            return None
        programs = [argv[opts.positionals[0]]]
    for prog in programs:
        for bad in AWK_DANGEROUS:
            if bad in prog:
                return _approval(
                    "process",
                    "high",
                    f"the `{argv[0]}` program uses `{bad}`, which can write files or run commands",
                )
    return None


def _max_operands(limit: int, flags: Sequence[str], values: Sequence[str]) -> Policy:
    def policy(argv: list[str]) -> Verdict | None:
        opts = getopt(argv, flags=flags, values=values)
        if opts.error:
            return _approval("unknown", "medium", f"`{argv[0]}` with an {opts.error}")
        if len(opts.positionals) > limit:
            return _approval("write", "medium", WRITE_PROGRAMS[argv[0]])
        return None

    return policy


_policy_uniq = _max_operands(
    1,
    ("-c", "--count", "-d", "--repeated", "-D", "-i", "--ignore-case", "-u", "--unique", "-z",
     "--zero-terminated", "--all-repeated", "--group"),
    ("-f", "--skip-fields", "-s", "--skip-chars", "-w", "--check-chars"),
)  # fmt: skip
_policy_xxd = _max_operands(
    1,
    ("-a", "-autoskip", "-b", "-bits", "-C", "-capitalize", "-E", "-e", "-h", "-help", "-i",
     "-include", "-p", "-ps", "-postscript", "-plain", "-r", "-revert", "-u", "-v", "-d", "-R"),
    ("-c", "-cols", "-g", "-groupsize", "-l", "-len", "-o", "-s", "-seek", "-n", "-name"),
)  # fmt: skip


def _policy_date(argv: list[str]) -> Verdict | None:
    if has_flag(argv, "s", {"--set"}):
        return _approval("privileged", "high", "`date -s` sets the system clock")
    opts = getopt(
        argv,
        flags=("-u", "--utc", "--universal", "-R", "--rfc-email", "--debug"),
        values=("-d", "--date", "-f", "--file", "-r", "--reference", "-I", "--rfc-3339"),
        optional=("--iso-8601",),
    )
    if opts.error:
        return _approval("privileged", "high", f"`date` with an {opts.error} may set the clock")
    if any(not argv[i].startswith("+") for i in opts.positionals):
        return _approval("privileged", "high", "`date` with an operand sets the system clock")
    return None


def _policy_hostname(argv: list[str]) -> Verdict | None:
    ok = {"-f", "--fqdn", "--long", "-s", "--short", "-i", "--ip-address", "-I",
          "--all-ip-addresses", "-d", "--domain", "-A", "--all-fqdns", "-a", "--alias", "-y",
          "--yp", "--nis", "-v", "--verbose", "-V", "--version", "-h", "--help"}  # fmt: skip
    if all(a in ok for a in argv[1:]):
        return None
    return _approval("privileged", "high", "`hostname` with an operand changes the hostname")


def _policy_ps(argv: list[str]) -> Verdict | None:
    value_opts = {"-o", "-O", "-p", "-u", "-U", "-g", "-G", "-C", "-t", "-s", "--sort",
                  "--format", "--pid", "--ppid", "--user", "--group", "-q", "--cols",
                  "--columns", "--rows", "--lines", "--width", "-N"}  # fmt: skip
    prev = ""
    for arg in argv[1:]:
        bsd = not arg.startswith("-") and arg.isalpha()
        if bsd and prev not in value_opts and "e" in arg:
            return _approval("read", "high", "`ps e` shows other processes' environments")
        prev = arg
    return None


def _policy_top(argv: list[str]) -> Verdict | None:
    joined = " ".join(argv[1:])
    if re.search(r"(^|\s)-\w*b", joined) and re.search(r"(^|\s)-\w*n", joined):
        return None
    return _approval("process", "medium", "`top` without `-b -n N` never ends")


def _policy_ping(argv: list[str]) -> Verdict | None:
    if has_flag(argv, "f", set()):
        return _approval("network", "high", "`ping -f` floods the network")
    if has_flag(argv, "cw", set()):
        return None
    return _approval("network", "medium", "`ping` without `-c N` never ends")


def _policy_mount(argv: list[str]) -> Verdict | None:
    if all(a in ("-l", "--show-labels") for a in argv[1:]):
        return None
    return _approval("privileged", "high", "`mount` with arguments mounts or changes filesystems")


def _policy_sysctl(argv: list[str]) -> Verdict | None:
    if any("=" in a for a in argv[1:]) or has_flag(argv, "wpf", {"--write", "--load", "--system"}):
        return _approval("privileged", "high", "`sysctl` with a value changes kernel settings")
    return None


def _policy_crontab(argv: list[str]) -> Verdict | None:
    opts = getopt(argv, flags=("-l",), values=("-u",))
    if not opts.error and opts.has("-l") and not opts.positionals:
        return None
    return _approval("process", "high", "`crontab` changes scheduled jobs")


def _policy_kill(argv: list[str]) -> Verdict | None:
    if argv[1:] in (["-l"], ["-L"], ["--list"], ["--table"]):
        return None
    return _approval("process", "high", "`kill` signals processes")


def _policy_tail(argv: list[str]) -> Verdict | None:
    return None  # flags handled by FLAG_POLICIES


# `ip` objects (exact spellings ip resolves to a read-only object) and verbs.
_IP_OBJECTS = frozenset(
    {"a", "ad", "addr", "address", "r", "ro", "rou", "rout", "route", "l", "li", "lin", "link",
     "n", "ne", "nei", "neig", "neigh", "neighbor", "neighbour", "ru", "rul", "rule", "ma",
     "maddr", "maddress", "netconf"}
)  # fmt: skip
_IP_VERBS = frozenset({"show", "list", "lst", "ls"})


def _policy_ip(argv: list[str]) -> Verdict | None:
    i = 1
    ok_opts = {"-s", "-stats", "-statistics", "-d", "-details", "-br", "-brief", "-4", "-6",
               "-c", "-color", "-j", "-json", "-p", "-pretty", "-o", "-oneline", "-h", "-human",
               "-human-readable", "-N", "-numeric", "-a", "-all", "-t", "-timestamp",
               "-ts", "-tshort"}  # fmt: skip
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i].split("=")[0] not in ok_opts:
            return _approval("network", "high", f"`ip {argv[i]}` needs approval")
        i += 1
    if i >= len(argv):
        return None
    obj = argv[i]
    if obj not in _IP_OBJECTS:
        return _approval("network", "high", NETWORK_PROGRAMS["ip"])
    if i + 1 >= len(argv):
        return None
    verb = argv[i + 1]
    if verb in _IP_VERBS or (verb == "get" and obj in ("r", "ro", "rou", "rout", "route")):
        return None
    if verb in ("dev",) and obj not in ("r", "ro", "rou", "rout", "route"):
        return None  # `ip addr dev eth0` = show
    return _approval("network", "high", NETWORK_PROGRAMS["ip"])


def _first_positional(
    argv: list[str], flags: Sequence[str], values: Sequence[str]
) -> tuple[int | None, str | None]:
    """Index of the first positional (the verb); options before it must be known."""
    opts = getopt(argv, flags=flags, values=values, stop_at_positional=True, long_abbrev=False)
    if opts.error:
        return None, opts.error
    return (opts.positionals[0] if opts.positionals else None), None


_SYSTEMCTL_READ = frozenset(
    {"status", "show", "list-units", "list-unit-files", "list-timers", "list-sockets",
     "list-dependencies", "list-jobs", "list-machines", "list-automounts", "list-paths",
     "is-active", "is-enabled", "is-failed", "is-system-running", "cat", "help",
     "get-default", "--version"}
)  # fmt: skip
_SYSTEMCTL_FLAGS = _opts(
    "-a --all -l --full --no-pager --no-legend -q --quiet --user --system --failed -r --recursive "
    "--plain --value --no-ask-password --reverse --after --before --show-types -i "
    "--ignore-inhibitors --global --version -h --help"
)
_SYSTEMCTL_VALUES = _opts(
    "-t --type -p --property -P -H --host -M --machine -n --lines -o --output --state --root"
)


def _policy_systemctl(argv: list[str]) -> Verdict | None:
    idx, err = _first_positional(argv, _SYSTEMCTL_FLAGS, _SYSTEMCTL_VALUES)
    if err:
        return _approval("process", "high", f"`systemctl` with an {err} needs approval")
    if idx is None:
        return None  # bare `systemctl` lists units
    if argv[idx] in _SYSTEMCTL_READ:
        if has_flag(argv, "", {"--now"}) or (argv[idx] == "help" and len(argv) > idx + 2):
            return _approval("process", "high", PROCESS_PROGRAMS["systemctl"])
        return None
    return _approval("process", "high", f"`systemctl {argv[idx]}` changes services")


_KUBECTL_GLOBAL_VALUES = _opts(
    "-n --namespace --context --cluster --user --kubeconfig -s --server --as --as-group "
    "--as-uid --request-timeout --cache-dir --tls-server-name -v --v --certificate-authority "
    "--client-certificate --client-key --token -o --output -l --selector"
)
_KUBECTL_GLOBAL_FLAGS = _opts(
    "-A --all-namespaces --insecure-skip-tls-verify -h --help --warnings-as-errors "
    "--match-server-version"
)
_KUBECTL_READ = frozenset(
    {"get", "describe", "logs", "top", "version", "explain", "api-resources", "api-versions",
     "cluster-info", "events"}
)  # fmt: skip
_KUBECTL_SUB_READ = {
    "config": frozenset({"view", "get-contexts", "current-context", "get-clusters", "get-users"}),
    "auth": frozenset({"can-i", "whoami"}),
    "rollout": frozenset({"status", "history"}),
}


def _policy_kubectl(argv: list[str]) -> Verdict | None:
    if any(a.split("=")[0] == "--kubeconfig" for a in argv[1:]):
        # a kubeconfig can name an exec credential plugin: a program kubectl runs
        return _approval("process", "high", "`kubectl --kubeconfig` can make kubectl run a program")
    idx, err = _first_positional(argv, _KUBECTL_GLOBAL_FLAGS, _KUBECTL_GLOBAL_VALUES)
    mutate = _approval("process", "high", PROCESS_PROGRAMS["kubectl"])
    if err:
        return _approval("process", "high", f"`kubectl` with an {err} needs approval")
    if idx is None:
        return None
    verb = argv[idx]
    rest = argv[idx + 1 :]
    if verb in _KUBECTL_SUB_READ:
        sub = next((a for a in rest if not a.startswith("-")), None)
        if sub not in _KUBECTL_SUB_READ[verb]:
            return mutate
        if verb == "config" and any(a.split("=")[0] in ("--raw", "--flatten") for a in rest):
            return _approval("read", "high", "`kubectl config view --raw` prints credentials")
        if verb == "rollout" and has_flag(["x", *rest], "w", {"--watch"}):
            return _approval("process", "medium", "`kubectl rollout status -w` may never end")
        return None
    if verb not in _KUBECTL_READ:
        return _approval(
            "process", "high", f"`kubectl {verb}` changes the cluster or runs something in it"
        )
    if verb == "cluster-info" and any(a.startswith("--output-directory") for a in rest):
        return _approval(
            "write", "medium", "`kubectl cluster-info dump --output-directory` writes files"
        )
    if verb in ("logs", "events") and has_flag(["x", *rest], "fw", {"--follow", "--watch"}):
        return _approval("process", "medium", f"`kubectl {verb} -f` follows forever")
    if verb == "get" and has_flag(["x", *rest], "w", {"--watch", "--watch-only"}):
        return _approval("process", "medium", "`kubectl get -w` watches forever")
    if verb in ("get", "describe") and any("secret" in a.lower() for a in rest):
        return _approval("read", "high", "reading Kubernetes secrets exposes credentials")
    return None


_DOCKER_GLOBAL_VALUES = _opts(
    "-H --host --context -c --config -l --log-level --tlscacert --tlscert --tlskey"
)
_DOCKER_GLOBAL_FLAGS = ("-D", "--debug", "--tls", "--tlsverify", "-v", "--version")
_DOCKER_READ = frozenset(
    {"ps", "images", "logs", "inspect", "stats", "version", "info", "top", "port", "diff",
     "history", "search"}
)  # fmt: skip
_DOCKER_SUB_READ = {
    "container": frozenset({"ls", "list", "ps", "inspect", "logs", "top", "port", "diff", "stats"}),
    "image": frozenset({"ls", "list", "inspect", "history"}),
    "network": frozenset({"ls", "list", "inspect"}),
    "volume": frozenset({"ls", "list", "inspect"}),
    "system": frozenset({"df", "info"}),
    "context": frozenset({"ls", "list", "inspect", "show"}),
    "compose": frozenset({"ps", "ls", "images", "top", "version", "logs"}),
}


def _policy_docker(argv: list[str]) -> Verdict | None:
    name = argv[0]
    idx, err = _first_positional(argv, _DOCKER_GLOBAL_FLAGS, _DOCKER_GLOBAL_VALUES)
    if err:
        return _approval("process", "high", f"`{name}` with an {err} needs approval")
    if idx is None:
        return None
    verb = argv[idx]
    rest = argv[idx + 1 :]
    if verb in _DOCKER_SUB_READ:
        sub = next((a for a in rest if not a.startswith("-")), None)
        if sub not in _DOCKER_SUB_READ[verb]:
            return _approval(
                "process",
                "high",
                f"`{name} {verb} {sub or ''}`".strip() + " changes containers or images",
            )
        verb = sub
    elif verb not in _DOCKER_READ:
        return _approval("process", "high", f"`{name} {verb}` changes containers or images")
    if verb == "logs" and has_flag(["x", *rest], "f", {"--follow"}):
        return _approval("process", "medium", f"`{name} logs -f` follows forever")
    if verb == "stats" and "--no-stream" not in rest:
        return _approval("process", "medium", f"`{name} stats` without `--no-stream` never ends")
    return None


_GIT_GLOBAL_FLAGS = _opts(
    "--no-pager -P --bare --no-replace-objects --literal-pathspecs --glob-pathspecs "
    "--noglob-pathspecs --icase-pathspecs --no-optional-locks --version"
)
_GIT_GLOBAL_VALUES = ("-C", "--git-dir", "--work-tree", "--namespace")
GIT_READ = frozenset(
    {"status", "log", "diff", "show", "rev-parse", "blame", "annotate", "ls-files", "ls-tree",
     "grep", "describe", "shortlog", "cat-file", "rev-list", "show-ref", "show-branch",
     "name-rev", "merge-base", "for-each-ref", "whatchanged", "count-objects", "check-ignore",
     "check-attr", "cherry", "range-diff", "version", "var", "diff-tree", "diff-files",
     "diff-index", "verify-commit", "verify-tag"}
)  # fmt: skip
# Options that write files, run programs or reach other repositories, on any git subcommand.
GIT_FORBIDDEN_LONG = frozenset(
    {"--output", "--ext-diff", "--upload-pack", "--receive-pack", "--exec",
     "--open-files-in-pager", "--config-env", "--exec-path", "--paginate"}
)  # fmt: skip
_GIT_BRANCH_FLAGS = _opts(
    "-a --all -r --remotes -l --list -v -vv --verbose --show-current --color --no-color --column "
    "--no-column -i --ignore-case --omit-empty"
)
_GIT_BRANCH_VALUES = _opts(
    "--contains --no-contains --merged --no-merged --points-at --sort --format --abbrev"
)
_GIT_TAG_FLAGS = _opts("-l --list --column --no-column -i --ignore-case --color --omit-empty")
_GIT_TAG_VALUES = _opts("--contains --no-contains --merged --no-merged --points-at --sort --format")
_GIT_CONFIG_READ = _opts(
    "--get --get-all --get-regexp --list -l --get-urlmatch --get-color --get-colorbool"
)
_GIT_CONFIG_FLAGS = (*_GIT_CONFIG_READ, "--show-origin", "--show-scope", "--global", "--local",
                     "--system", "--worktree", "--name-only", "-z", "--null", "--includes",
                     "--no-includes", "--bool", "--int", "--path")  # fmt: skip
_GIT_CONFIG_VALUES = ("-f", "--file", "--blob", "--type", "--default")
# Local repository changes: ordinary workspace writes (medium).
GIT_LOCAL_WRITES = frozenset(
    _opts(
        "add rm mv commit reset checkout switch restore clean merge cherry-pick revert stash "
        "tag branch init am apply notes gc prune pull fetch clone remote config worktree reflog"
    )
)
_GIT_WRITE_REASONS = {
    "push": ("network", "high", "`git push` publishes commits to a remote"),
    "commit": ("write", "medium", "`git commit` records changes"),
    "reset": ("write", "medium", "`git reset` moves the branch and can discard changes"),
    "clean": ("write", "medium", "`git clean` deletes untracked files"),
    "checkout": ("write", "medium", "`git checkout` changes the working tree"),
    "switch": ("write", "medium", "`git switch` changes the working tree"),
    "restore": ("write", "medium", "`git restore` discards changes"),
    "pull": ("network", "medium", "`git pull` fetches and changes the working tree"),
    "fetch": ("network", "medium", "`git fetch` downloads from a remote"),
    "clone": ("network", "medium", "`git clone` downloads a repository"),
    "config": ("write", "high", "`git config` changes settings that can make git run programs"),
    "rebase": ("write", "medium", "`git rebase` rewrites commits"),
}


def _policy_git(argv: list[str]) -> Verdict | None:
    for arg in argv[1:]:
        if arg.startswith("--") and _long_hit(arg, GIT_FORBIDDEN_LONG):
            return _approval(
                "process", "high", f"`git {arg.split('=')[0]}` can write files or run programs"
            )
    # -c / --config-env: any config can name a program (core.pager, diff.external, …)
    opts = getopt(
        argv,
        flags=_GIT_GLOBAL_FLAGS,
        values=_GIT_GLOBAL_VALUES,
        stop_at_positional=True,
        long_abbrev=False,
    )
    if opts.error or not opts.positionals:
        if not opts.error and opts.has("--version"):
            return None
        why = (
            "`git -c` sets config that can run programs"
            if any(a.startswith("-c") for a in argv[1:])
            else f"`git` with an {opts.error or 'no subcommand'} needs approval"
        )
        return _approval("process", "high", why)
    idx = opts.positionals[0]
    sub, rest = argv[idx], argv[idx + 1 :]
    sub_argv = [f"git {sub}", *rest]
    if sub in GIT_READ:
        if sub == "grep" and has_flag(sub_argv, "O", {"--open-files-in-pager"}):
            return _approval("process", "high", "`git grep -O` runs a pager program")
        return None
    mutate = Verdict(
        *_GIT_WRITE_REASONS.get(sub, ("write", "medium", f"`git {sub}` changes the repository"))
    )
    if sub == "rebase" and has_flag(sub_argv, "x", {"--exec"}):
        return Verdict("process", "high", "`git rebase --exec` runs commands")
    elsewhere = [v for v in opts.values("-C", "--git-dir", "--work-tree") if _outside_workspace(v)]
    if elsewhere and mutate.risk == "medium":
        mutate = Verdict(mutate.action, "high", f"{_cap(mutate.reason)} in `{elsewhere[0]}`")
    if sub == "branch":
        o = getopt(sub_argv, flags=_GIT_BRANCH_FLAGS, values=_GIT_BRANCH_VALUES)
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git branch` with those arguments changes branches")
        return None
    if sub == "tag":
        ok_n = [a for a in rest if re.fullmatch(r"-n\d*", a)]
        o = getopt(
            [sub_argv[0], *[a for a in rest if a not in ok_n]],
            flags=_GIT_TAG_FLAGS,
            values=_GIT_TAG_VALUES,
        )
        if o.error or (o.positionals and not o.has("-l", "--list")):
            return Verdict("write", "medium", "`git tag` with those arguments changes tags")
        return None
    if sub == "remote":
        if all(a in ("-v", "--verbose") for a in rest):
            return None
        pos = [a for a in rest if a not in ("-v", "--verbose")]
        if (
            pos
            and pos[0] in ("show", "get-url")
            and all(not a.startswith("-") or a in ("-n", "--push", "--all") for a in pos[1:])
        ):
            return None
        return Verdict("write", "medium", "`git remote` with those arguments changes remotes")
    if sub == "config":
        o = getopt(sub_argv, flags=_GIT_CONFIG_FLAGS, values=_GIT_CONFIG_VALUES)
        if not o.error and o.has(*_GIT_CONFIG_READ):
            return None
        if (
            rest
            and rest[0] in ("get", "list")
            and not any(a.split("=")[0] in ("--edit", "-e") for a in rest)
        ):
            return None
        return mutate
    if sub == "stash":
        if rest[:1] in (["list"], ["show"]):
            return None
        return Verdict("write", "medium", "`git stash` changes the working tree")
    if sub == "reflog":
        pos = [a for a in rest if not a.startswith("-")]
        if not pos or pos[0] not in ("expire", "delete", "drop"):
            return None
        return Verdict("write", "medium", "`git reflog expire/delete` removes history")
    if sub == "worktree":
        if rest[:1] == ["list"]:
            return None
        return Verdict("write", "medium", "`git worktree` changes worktrees")
    if sub in _GIT_WRITE_REASONS or sub in GIT_LOCAL_WRITES:
        return mutate
    # daemon, submodule foreach, bisect run, credential, aliases …: can run anything
    return Verdict("unknown", "high", f"`git {sub}` is not a git command known to be safe")


_PACKAGE_READ: dict[str, frozenset[str]] = {
    "apt": frozenset({"list", "show", "search", "policy", "depends", "rdepends"}),
    "apt-cache": frozenset(
        {
            "policy",
            "show",
            "search",
            "depends",
            "rdepends",
            "madison",
            "showpkg",
            "pkgnames",
            "stats",
            "showsrc",
        }
    ),
    "pip": frozenset({"list", "show", "freeze", "check"}),
    "pip3": frozenset({"list", "show", "freeze", "check"}),
    "npm": frozenset({"ls", "list", "view", "outdated"}),
    "brew": frozenset({"list", "info", "outdated"}),
    "snap": frozenset({"list", "info"}),
    "flatpak": frozenset({"list", "info"}),
}


def _policy_package(argv: list[str]) -> Verdict | None:
    name = argv[0]
    install = _approval("package", "high", f"`{name}` installs, removes or changes packages")
    if argv[1:] in (["--version"], ["-V"], ["-v"]):
        return None
    if name == "dpkg":
        query = {"-l", "--list", "-L", "--listfiles", "-s", "--status", "-S", "--search", "-p",
                 "--print-avail", "--get-selections", "--print-architecture"}  # fmt: skip
        if len(argv) > 1 and argv[1] in query:
            return None
        return install
    if name == "rpm":
        if (
            len(argv) > 1
            and re.fullmatch(r"-q[a-zA-Z]*", argv[1])
            and not has_flag(argv, "E", {"--eval", "--scripts"})
        ):
            return None
        return install
    if name == "pacman":
        if len(argv) > 1 and re.fullmatch(r"-Q[a-zA-Z]*", argv[1]):
            return None
        return install
    reads = _PACKAGE_READ.get(name)
    if reads and len(argv) > 1 and argv[1] in reads:
        return None
    return install


def _policy_dpkg_query(argv: list[str]) -> Verdict | None:
    return None


POLICIES: dict[str, Policy] = {
    "find": _policy_find,
    "fd": _policy_fd,
    "fdfind": _policy_fd,
    "sed": _policy_sed,
    "awk": _policy_awk,
    "gawk": _policy_awk,
    "mawk": _policy_awk,
    "nawk": _policy_awk,
    "uniq": _policy_uniq,
    "xxd": _policy_xxd,
    "date": _policy_date,
    "hostname": _policy_hostname,
    "ps": _policy_ps,
    "top": _policy_top,
    "ping": _policy_ping,
    "ping6": _policy_ping,
    "mount": _policy_mount,
    "sysctl": _policy_sysctl,
    "crontab": _policy_crontab,
    "kill": _policy_kill,
    "ip": _policy_ip,
    "systemctl": _policy_systemctl,
    "kubectl": _policy_kubectl,
    "docker": _policy_docker,
    "podman": _policy_docker,
    "git": _policy_git,
    "dpkg-query": _policy_dpkg_query,
    **{name: _policy_package for name in ("apt", "apt-cache", "pip", "pip3", "npm", "brew",
                                          "snap", "flatpak", "dpkg", "rpm", "pacman")},
}  # fmt: skip

# Read-only subcommands of systemd's *ctl tools, with no options before the verb.
_CTL_READ = {
    "timedatectl": frozenset({"status", "show", "list-timezones", "timesync-status"}),
    "hostnamectl": frozenset({"status", "show"}),
    "localectl": frozenset({"status", "list-locales", "list-keymaps"}),
    "loginctl": frozenset({"list-sessions", "list-users", "list-seats", "show-session",
                           "show-user", "session-status", "user-status"}),
}  # fmt: skip

_SUBCOMMAND_PROGRAMS = frozenset(
    {"git", "kubectl", "docker", "podman", "systemctl", "ip", *_CTL_READ, *_PACKAGE_READ}
)
READ_ONLY_PROGRAMS = frozenset(
    PLAIN_READ_ONLY | set(FLAG_POLICIES) | set(POLICIES) | set(_CTL_READ)
)


# --------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------


@dataclass
class Arg:
    """One word of a simple command, with what the shell will do to it."""

    word: str
    raw: str
    params: list[str] = field(default_factory=list)
    glob: bool = False  # unquoted * ? [
    brace: bool = False  # unquoted { (brace expansion)
    expand: bool = False  # $ or ` outside single quotes
    subst: bool = False  # $(…) `…` <(…) >(…)
    tilde: bool = False

    @property
    def literal(self) -> bool:
        return not (self.glob or self.brace or self.expand or self.subst or self.tilde)

    @classmethod
    def plain(cls, word: str) -> Arg:
        """A word from a re-split string (`env -S`, `watch`): judged as literal text."""
        a = cls(word, word)
        a.glob = _has_glob(word)
        a.expand = "$" in word or "`" in word
        return a


def _raw_features(raw: str) -> tuple[bool, bool, bool]:
    """(glob, brace, expand) for the unquoted/double-quoted parts of a raw word."""
    glob = brace = expand = False
    quote: str | None = None
    i = 0
    while i < len(raw):
        c = raw[i]
        if quote is None:
            if c == "\\":
                i += 2
                continue
            if c in "'\"":
                quote = c
            elif c in "*?[":
                glob = True
            elif c == "{":
                brace = True
            elif c in "$`":
                expand = True
                if raw[i + 1 : i + 2] == "{":  # ${NAME}: a parameter, not brace expansion
                    end = raw.find("}", i)
                    i = end + 1 if end > 0 else len(raw)
                    continue
        elif quote == "'":
            if c == "'":
                quote = None
        else:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quote = None
            elif c in "$`":
                expand = True
        i += 1
    return glob, brace, expand


_PLAIN_PARAM = re.compile(r"[A-Za-z][A-Za-z0-9_]*|_[A-Za-z0-9_]+")


# --------------------------------------------------------------------------
# The analyser
# --------------------------------------------------------------------------


class _Analyzer:
    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.verdicts: list[Verdict] = []
        self.commands: list[list[str]] = []
        self.programs: list[str] = []  # effective program names, in order seen
        self.complex = False  # anything but one plain simple command
        # Where later commands run: None = the workspace; "?" = somewhere unknown
        # outside it; else a canonical path (`cd /etc && rm -rf *`).
        self.cwd: str | None = None
        self.simple_count = 0
        self.text = ""

    # -- entry -----------------------------------------------------------

    def analyze(self, text: str) -> None:
        self.text = text
        if self.depth > MAX_NESTING:
            self.add(Verdict("unknown", "high", "The command nests shells too deeply to judge."))
            return
        if not text.strip():
            self.add(Verdict("unknown", "high", "The command is empty."))
            return
        if len(text) > MAX_PARSE_CHARS:
            self.add(Verdict("unknown", "high", "The command is too long to judge."))
            self._fallback(text)
            return
        try:
            nodes = bashlex.parse(text)
        except Exception as exc:  # bashlex raises many kinds on odd input
            self.add(
                Verdict(
                    "unknown",
                    "high",
                    "The command could not be parsed as shell "
                    f"({_short_error(exc)}), so it needs approval.",
                )
            )
            self._fallback(text)
            return
        if len(nodes) > 1:
            self.complex = True
        for node in nodes:
            self.node(node)

    def add(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def merge(self, other: _Analyzer) -> None:
        self.verdicts.extend(other.verdicts)
        self.commands.extend(other.commands)
        self.programs.extend(other.programs)

    def sub(self, text: str) -> _Analyzer:
        inner = _Analyzer(self.depth + 1)
        inner.cwd = self.cwd
        inner.analyze(text)
        self.merge(inner)
        return inner

    # -- tree ------------------------------------------------------------

    def node(self, node: Any) -> list[str] | None:
        kind = getattr(node, "kind", None)
        if kind == "list":
            self.complex = True
            for part in node.parts:
                if part.kind == "operator":
                    if part.op == "&":
                        self.add(
                            Verdict(
                                "process",
                                "medium",
                                "`&` leaves a command running in the background.",
                            )
                        )
                    elif part.op not in (";", "&&", "||", "\n"):
                        self.add(
                            Verdict(
                                "unknown", "high", f"The operator `{part.op}` is not understood."
                            )
                        )
                else:
                    self.node(part)
            return None
        if kind == "pipeline":
            self.complex = True
            effective: list[list[str] | None] = []
            for part in node.parts:
                if part.kind in ("pipe", "reservedword"):
                    if part.kind == "reservedword" and part.word != "!":
                        self.add(Verdict("unknown", "high", f"`{part.word}` is not understood."))
                    continue
                effective.append(self.node(part))
            self._pipe_to_shell(effective)
            return None
        if kind == "command":
            return self.command(node)
        if kind == "compound":
            self.complex = True
            self.add(
                Verdict(
                    "unknown",
                    "medium",
                    "Loops, conditionals, subshells and `{ }` groups need approval.",
                )
            )
            for part in node.list:
                if part.kind == "reservedword":
                    continue
                if part.kind == "word":
                    self.word(part)
                else:
                    self.node(part)
            for redirect in getattr(node, "redirects", None) or []:
                self.redirect(redirect)
            return None
        if kind in ("for", "if", "while", "until"):
            self.complex = True
            for part in node.parts:
                if part.kind == "reservedword":
                    continue
                if part.kind == "word":
                    self.word(part)
                else:
                    self.node(part)
            return None
        if kind == "function":
            self.complex = True
            name = node.name.word
            body = _Analyzer(self.depth + 1)
            body.node(node.body)
            self.merge(body)
            if name in body.programs or any(c and c[0] == name for c in body.commands):
                self.add(_block(f"The function `{name}` calls itself: a fork bomb."))
            self.add(
                Verdict(
                    "unknown", "medium", f"Defining the shell function `{name}` needs approval."
                )
            )
            return None
        self.complex = True
        self.add(Verdict("unknown", "high", f"The shell construct `{kind}` is not understood."))
        return None

    def _pipe_to_shell(self, effective: list[list[str] | None]) -> None:
        for i, left in enumerate(effective):
            if not left or _prog_name(left[0]) not in DOWNLOADERS:
                continue
            for right in effective[i + 1 :]:
                if right and _runs_stdin_as_code(right):
                    self.add(
                        _block(
                            f"Piping a download (`{_prog_name(left[0])}`) into "
                            f"`{_prog_name(right[0])}` runs unreviewed code."
                        )
                    )
                    return

    def word(self, node: Any) -> Arg:
        """Scan a word node: substitutions are analysed as commands of their own."""
        raw = self.text[node.pos[0] : node.pos[1]] if hasattr(node, "pos") else node.word
        glob, brace, expand = _raw_features(raw)
        arg = Arg(node.word, raw, glob=glob, brace=brace, expand=expand)
        stack = list(getattr(node, "parts", None) or [])
        while stack:
            part = stack.pop()
            pk = part.kind
            if pk in ("commandsubstitution", "processsubstitution"):
                arg.subst = True
                self.complex = True
                before = len(self.programs)
                self.node(part.command)
                inner = self.programs[before:]
                what = (
                    "Command substitution"
                    if pk == "commandsubstitution"
                    else "Process substitution"
                )
                self.add(Verdict("unknown", "medium", f"{what} (`{raw}`) needs approval."))
                arg.params.extend(f"<{p}>" for p in inner)
            elif pk == "parameter":
                arg.params.append(part.value)
            elif pk == "tilde":
                arg.tilde = True
            stack.extend(getattr(part, "parts", None) or [])
        return arg

    def redirect(self, node: Any) -> tuple[str, str] | None:
        """Judge a redirection. Returns what it feeds to stdin, when that matters:
        ("download", "") for `< <(curl …)`, ("text", body) for here-documents/strings."""
        rtype = node.type
        out = node.output
        if rtype in ("<<", "<<-"):
            self.complex = True
            body = getattr(getattr(node, "heredoc", None), "value", "") or ""
            if "$" in body or "`" in body or "\\" in body:
                self.add(
                    Verdict("unknown", "medium", "A here-document with expansions needs approval.")
                )
            # the body ends with the delimiter line
            return ("text", body.rsplit("\n", 1)[0] if "\n" in body else "")
        if isinstance(out, str):  # `2>&-`: closing a descriptor
            if out == "-" and rtype in (">&", "<&"):
                return
            self.add(
                Verdict("unknown", "high", f"The redirection `{rtype}{out}` is not understood.")
            )
            return
        if isinstance(out, int):
            if rtype in (">&", "<&"):
                return  # 2>&1 and friends: fd duplication
            self.add(
                Verdict("unknown", "high", f"The redirection `{rtype}{out}` is not understood.")
            )
            return
        target_arg = self.word(out)
        target = target_arg.word
        self.complex = True
        if rtype == "<<<":
            return ("text", target)
        if rtype in ("<", "<&", "<>") and _is_bash_socket(target):
            self.add(Verdict("network", "high", f"`{target}` opens a network connection."))
            return
        if rtype in ("<", "<&"):
            if rtype == "<&" and target == "-":
                return
            stdin = None
            if any(p.startswith("<") and p[1:-1] in DOWNLOADERS for p in target_arg.params):
                stdin = ("download", "")
            reason = secret_reason(target)
            if reason:
                self.add(Verdict("read", "high", f"{reason}; reading it needs approval."))
            elif not target_arg.literal and not target_arg.tilde:
                self.add(
                    Verdict("read", "medium", f"The input file `{target}` is computed at run time.")
                )
            return stdin
        if rtype in (">", ">>", ">|", "&>", "&>>", ">&", "<>"):
            if rtype == ">&" and target == "-":
                return
            path = canonical_path(target) or target
            if path in HARMLESS_DEVICES and target_arg.literal:
                return
            if _is_bash_socket(target):
                self.add(Verdict("network", "high", f"`{target}` opens a network connection."))
                return
            target = resolve_operand(target, self.cwd)
            if is_disk(target) or is_critical_file(target):
                self.add(_block(f"Redirecting output onto `{target}` would destroy it."))
                return
            outside = self.cwd is not None and (self.cwd == "?" or _outside_workspace(target))
            if (
                outside
                or not target_arg.literal
                or _outside_workspace(target)
                or ".git" in target.split("/")
            ):
                self.add(
                    Verdict(
                        "write",
                        "high",
                        f"Redirecting output into `{target}` writes outside the workspace.",
                    )
                )
            else:
                self.add(
                    Verdict("write", "medium", f"Redirecting output into `{target}` writes a file.")
                )
            return
        self.add(Verdict("unknown", "high", f"The redirection `{rtype}` is not understood."))

    def command(self, node: Any) -> list[str] | None:
        args: list[Arg] = []
        assigns: list[str] = []
        stdin: tuple[str, str] | None = None
        for part in node.parts:
            pk = part.kind
            if pk == "word":
                args.append(self.word(part))
            elif pk == "assignment":
                self.complex = True
                self.word(part)  # substitutions inside the value
                assigns.append(part.word)
            elif pk == "redirect":
                stdin = self.redirect(part) or stdin
            else:
                self.complex = True
                self.add(Verdict("unknown", "high", f"`{pk}` in a command is not understood."))
        argv = [a.word for a in args]
        if argv:
            self.commands.append(argv)
        self.simple_count += 1
        if assigns:
            names = ", ".join(f"`{a.split('=', 1)[0]}`" for a in assigns)
            if argv:
                self.add(
                    Verdict(
                        "process",
                        "high",
                        f"Setting environment variables ({names}) can change what a command runs.",
                    )
                )
            else:
                self.add(
                    Verdict("process", "high", f"Setting shell variables ({names}) needs approval.")
                )
        if not argv:
            return None
        verdict, effective = self.judge(args)
        if stdin and effective and _runs_stdin_as_code(effective):
            runner = _prog_name(effective[0])
            if stdin[0] == "download":
                verdict = _block(f"Feeding a download to `{runner}` runs unreviewed code.")
            elif runner in SHELLS or runner in ("eval", "source", "."):
                # `bash <<EOF … EOF`, `sh <<< "…"`: the text is the script; judge it too
                inner = self.sub(stdin[1])
                verdict = _worse(verdict, worst(inner.verdicts))
        self.add(verdict)
        return effective

    # -- simple commands -------------------------------------------------

    def judge(self, args: list[Arg]) -> tuple[Verdict, list[str]]:
        """Judge one simple command (already split into words)."""
        argv = [a.word for a in args]
        head = args[0]
        if (not head.literal and head.raw != "[") or not head.word:
            self.complex = True
            self.programs.append("?")
            return (
                Verdict(
                    "unknown",
                    "high",
                    f"The program name `{head.raw}` is computed when the command runs.",
                ),
                argv,
            )
        prog = head.word
        name = _prog_name(prog)
        self.programs.append(name)
        reason = blocked_reason(name, argv, self.cwd)
        if reason:
            return _block(reason[0].upper() + reason[1:] + "."), argv
        if name in ("cd", "pushd"):
            self._change_directory(args)
        if "/" in prog and posixpath.dirname(posixpath.normpath(prog)) not in SYSTEM_BIN_DIRS:
            v = Verdict(
                "unknown",
                "high",
                f"`{prog}` runs a program from a path the classifier does not know.",
            )
            return self._with_suffix_scan(v, args), argv
        wrapper = WRAPPERS.get(name)
        if wrapper is not None:
            return wrapper(self, args)
        if name in SHELLS:
            return self._shell(args), argv
        if name in ("eval",):
            self.complex = True
            if self._subst_download(args):
                return _block("`eval` of a download runs unreviewed code."), argv
            inner = self.sub(" ".join(argv[1:]))
            return _floor(
                inner, Verdict("process", "high", "`eval` runs a string as shell code.")
            ), argv
        if name in ("source", "."):
            self.complex = True
            if self._subst_download(args):
                return _block(f"`{name}` of a download runs unreviewed code."), argv
            return Verdict("process", "high", f"`{name}` runs a shell script in this shell."), argv
        if name in ("cd", "type"):
            self.complex = True  # shell builtins: run through bash
        verdict = self._program(name, args)
        if verdict.risk != "low" and not verdict.blocked:
            verdict = self._with_suffix_scan(verdict, args)
        return verdict, argv

    def _change_directory(self, args: list[Arg]) -> None:
        operands = [a for a in args[1:] if not a.word.startswith("-") or a.word == "-"]
        if not operands:
            self.cwd = "~"
            return
        target = operands[0]
        if target.word == "-" or target.subst or (target.expand and not target.params):
            self.cwd = "?"
            return
        path = canonical_path(target.word)
        if path is not None:
            self.cwd = path
        elif self.cwd is None:
            self.cwd = "?" if _escapes(target.word) else None
        elif self.cwd != "?":
            self.cwd = canonical_path(resolve_operand(target.word, self.cwd)) or "?"

    def _program(self, name: str, args: list[Arg]) -> Verdict:
        argv = [a.word for a in args]
        argv[0] = name
        secret = self._secret(name, args)
        if name in READ_ONLY_PROGRAMS:
            v = self._read_only(name, argv, args)
            if v.risk == "low" and secret:
                return secret
            return _worse(v, secret)
        if name in INTERPRETERS or _PYTHON_RE.match(name):
            if argv[1:] in (["--version"], ["-V"], ["-v"], ["version"]):
                return _read(f"`{name} --version` only prints a version.")
            if self._subst_download(args):
                return _block(f"Running a download with `{name}` runs unreviewed code.")
            return _worse(Verdict("process", "high", f"`{name}` runs code."), secret)
        if name in PAGERS:
            return Verdict(
                "unknown",
                "medium",
                f"`{name}` is an interactive program that can run commands; use `cat` or `head`.",
            )
        if name in DOWNLOADERS:
            sends = has_flag(argv, "TdFXu", _UPLOAD_OPTIONS)
            if sends:
                return _worse(
                    Verdict("network", "high", f"`{name}` sends data over the network."), secret
                )
            return _worse(
                Verdict("network", "medium", f"`{name}` contacts the network and may write files."),
                secret,
            )
        if name in WRITE_PROGRAMS:
            return _worse(self._write(name, args), secret)
        if name in PROCESS_PROGRAMS:
            return Verdict("process", "high", PROCESS_PROGRAMS[name] + ".")
        if name in PACKAGE_PROGRAMS:
            return Verdict("package", "high", f"`{name}` installs, removes or changes packages.")
        if name in NETWORK_PROGRAMS:
            return Verdict("network", "high", NETWORK_PROGRAMS[name] + ".")
        if name in PRIVILEGED_PROGRAMS or name.startswith("mkfs."):
            return Verdict("privileged", "high", f"`{name}` changes system configuration.")
        if name in ("init", "telinit"):
            return Verdict("privileged", "high", f"`{name}` changes the system run level.")
        if name in ("exec", "xargs"):  # reached only without a command to wrap
            return Verdict("process", "high", f"`{name}` needs approval.")
        return _worse(
            Verdict("unknown", "high", f"`{name}` is not a program known to be read-only."), secret
        )

    def _read_only(self, name: str, argv: list[str], args: list[Arg]) -> Verdict:
        policy = FLAG_POLICIES.get(name)
        if policy and has_flag(argv, policy[0], policy[1]):
            action = "write" if "writ" in policy[2] or "edit" in policy[2] else "process"
            if name in ("journalctl", "dmesg"):
                action = "process"
            risk = "medium" if name not in ("rg",) else "high"
            v = Verdict(action, risk, _cap(policy[2]) + ".")
            if action == "write":
                targets = [Arg.plain(t) for t in _output_options(name, argv)]
                return _worse(v, self._write_outside(name, targets, v.reason))
            return v
        fn = POLICIES.get(name)
        if fn is not None:
            v = fn(argv)
            if v is not None:
                reason = v.reason if v.reason.endswith(".") else v.reason + "."
                v = Verdict(v.action, v.risk, _cap(reason))
                if v.action == "write" and v.risk == "medium":
                    return _worse(v, self._write_outside(name, args[1:], v.reason))
                return v
        if name in _CTL_READ:
            if len(argv) > 1 and argv[1] not in _CTL_READ[name]:
                return Verdict("privileged", "high", f"`{name} {argv[1]}` changes system settings.")
        words = self._word_problem(name, args)
        if words:
            return words
        label = name
        if name in _SUBCOMMAND_PROGRAMS:
            verb = next((a for a in argv[1:] if not a.startswith("-")), None)
            label = f"{name} {verb}" if verb else name
        return _read(f"`{label}` only reads.")

    def _word_problem(self, name: str, args: list[Arg]) -> Verdict | None:
        sensitive = name in FLAG_SENSITIVE
        for a in args[1:]:
            if a.subst:
                continue  # already judged as a substitution
            if a.brace:
                return Verdict("unknown", "medium", f"Brace expansion in `{a.raw}` needs approval.")
            for p in a.params:
                if p.startswith("<"):
                    continue
                if not _PLAIN_PARAM.fullmatch(p):
                    return Verdict(
                        "unknown", "medium", f"The expansion `{a.raw}` is not understood."
                    )
                if sensitive and p not in SAFE_VARIABLES:
                    return Verdict(
                        "unknown", "medium", f"`${p}` could expand to an option of `{name}`."
                    )
            if a.expand and not a.params:
                return Verdict(
                    "unknown", "medium", f"The expansion in `{a.raw}` is not understood."
                )
            if sensitive and a.glob and a.raw[:1] in "*?[":
                return Verdict(
                    "unknown",
                    "medium",
                    f"The glob `{a.raw}` could expand to a file named like an option of `{name}`.",
                )
        return None

    def _secret(self, name: str, args: list[Arg]) -> Verdict | None:
        if name in NON_READING:
            return None
        for a in args[1:]:
            reason = secret_reason(a.word)
            if reason:
                return Verdict("read", "high", f"{reason}; reading it needs approval.")
        return None

    def _write_outside(self, name: str, operands: list[Arg], reason: str) -> Verdict | None:
        """A `high` verdict when a write reaches outside the workspace, else None."""
        if self.cwd is not None and (self.cwd == "?" or _outside_workspace(self.cwd + "/x")):
            return Verdict(
                "write", "high", f"{reason.rstrip('.')}, after `cd` out of the workspace."
            )
        for a in operands:
            if a.word.startswith("-") or not a.word:
                continue
            if a.expand or a.subst or _outside_workspace(a.word) or ".git" in a.word.split("/"):
                return Verdict("write", "high", f"{reason.rstrip('.')}, outside the workspace.")
        return None

    def _write(self, name: str, args: list[Arg]) -> Verdict:
        reason = WRITE_PROGRAMS[name]
        if name == "sed":
            reason = "`sed -i` edits files in place"
        if self.cwd is not None and (self.cwd == "?" or _outside_workspace(self.cwd + "/x")):
            return Verdict("write", "high", f"{_cap(reason)}, after `cd` out of the workspace.")
        for a in args[1:]:
            if a.word.startswith("-") and a.word != "-":
                continue
            if not a.literal and not a.tilde:
                if name in ("rm", "shred", "mv", "chmod") and "$" in a.raw:
                    return Verdict(
                        "write",
                        "high",
                        f"{_cap(reason)}, and `{a.raw}` is only known at run time.",
                    )
                if a.expand or a.subst:
                    return Verdict(
                        "write",
                        "high",
                        f"{_cap(reason)}, and `{a.raw}` is only known at run time.",
                    )
            if _outside_workspace(a.word) or ".git" in a.word.split("/"):
                return Verdict(
                    "write",
                    "high",
                    f"{reason[0].upper() + reason[1:]} outside the workspace (`{a.word}`).",
                )
        return Verdict("write", "medium", reason[0].upper() + reason[1:] + ".")

    def _with_suffix_scan(self, verdict: Verdict, args: list[Arg]) -> Verdict:
        argv = [a.word for a in args]
        for i in range(1, len(argv)):
            name = _prog_name(argv[i])
            if name in SUFFIX_BLOCK_PROGRAMS or name.startswith("mkfs."):
                reason = blocked_reason(name, argv[i:], self.cwd)
                if reason:
                    return _block(reason[0].upper() + reason[1:] + ".")
        return verdict

    def _subst_download(self, args: list[Arg]) -> bool:
        return any(p.startswith("<") and p[1:-1] in DOWNLOADERS for a in args[1:] for p in a.params)

    def _shell(self, args: list[Arg]) -> Verdict:
        self.complex = True
        argv = [a.word for a in args]
        name = _prog_name(argv[0])
        command_string: str | None = None
        has_c = False
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--":
                i += 1
                break
            if a in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
                i += 2
                continue
            if a.startswith("--") or (a[:1] in "-+" and len(a) > 1):
                if not a.startswith("--") and "c" in a:
                    has_c = True
                i += 1
                continue
            break
        if has_c and i < len(argv):
            command_string = argv[i]
        if self._subst_download(args):
            return _block(f"Running a download with `{name}` runs unreviewed code.")
        if has_c and command_string is not None:
            inner = self.sub(command_string)
            return _floor(
                inner,
                Verdict("process", "high", f"`{name} -c` runs a command string as shell code."),
            )
        if self._subst_download(args):
            return _block(f"Running a download with `{name}` runs unreviewed code.")
        return Verdict("process", "high", f"`{name}` runs a shell script.")

    # -- fallback for what does not parse ---------------------------------

    def _fallback(self, text: str) -> None:
        """Look for blocked forms in text the parser rejected (it still needs approval)."""
        try:
            lex = shlex.shlex(text.replace("\x00", " "), posix=True, punctuation_chars=";&|()<>")
            lex.whitespace_split = True
            tokens = list(lex)
        except ValueError:
            tokens = text.split()
        segments: list[list[str]] = [[]]
        pipes: list[str] = []
        for tok in tokens:
            if tok and all(c in ";&|()<>" for c in tok):
                pipes.append(tok)
                segments.append([])
            else:
                segments[-1].append(tok)
        effective: list[list[str] | None] = []
        for seg in segments:
            argv = _strip_wrappers(seg)
            effective.append(argv or None)
            if not argv:
                continue
            reason = blocked_reason(_prog_name(argv[0]), argv)
            if reason is None:
                for i in range(1, len(argv)):
                    reason = blocked_reason(_prog_name(argv[i]), argv[i:])
                    if reason:
                        break
            if reason:
                self.add(_block(reason[0].upper() + reason[1:] + "."))
                return
        self._pipe_to_shell(effective)


def _is_bash_socket(target: str) -> bool:
    return target.startswith(("/dev/tcp/", "/dev/udp/"))


def _prog_name(prog: str) -> str:
    return posixpath.basename(prog) if "/" in prog else prog


def _runs_stdin_as_code(argv: list[str]) -> bool:
    name = _prog_name(argv[0])
    rest = argv[1:]
    if name in SHELLS:
        return (
            (
                not any(a.startswith("-") and not a.startswith("--") and "c" in a for a in rest)
                and not any(not a.startswith("-") for a in rest)
            )
            or "-s" in rest
            or "-" in rest
            or any(a in ("/dev/stdin", "/proc/self/fd/0", "/dev/fd/0") for a in rest)
        )
    if name in INTERPRETERS or _PYTHON_RE.match(name) or name in ("eval", "source", "."):
        positional = [a for a in rest if not a.startswith("-")]
        if "-" in rest or any(a in ("/dev/stdin", "/proc/self/fd/0") for a in rest):
            return True
        code_flags = any(a in ("-c", "-e", "-m", "-E", "-r", "--eval") for a in rest)
        return not positional and not code_flags
    return False


def _strip_wrappers(argv: list[str]) -> list[str]:
    """Crude wrapper removal for the fallback scan."""
    i = 0
    while i < len(argv):
        a = argv[i]
        name = _prog_name(a)
        if "=" in a and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", a):
            i += 1
        elif name in WRAPPERS or a.startswith("-") or re.fullmatch(r"[\d.]+[smhd]?", a):
            i += 1
        else:
            break
    return argv[i:]


def _floor(inner: _Analyzer, floor: Verdict) -> Verdict:
    w = worst(inner.verdicts)
    if w is None:
        return floor
    if w.rank > floor.rank:
        return w
    return floor


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _worse(a: Verdict, b: Verdict | None) -> Verdict:
    if b is None:
        return a
    return b if b.rank > a.rank else a


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


# --------------------------------------------------------------------------
# Wrappers: judged by what they wrap
# --------------------------------------------------------------------------

WrapperFn = Callable[[_Analyzer, list[Arg]], tuple[Verdict, list[str]]]


def _wrap(
    analyzer: _Analyzer,
    args: list[Arg],
    start: int | None,
    floor: Verdict,
    alone: Verdict,
) -> tuple[Verdict, list[str]]:
    """Judge args[start:] as the wrapped command, no lower than `floor`."""
    argv = [a.word for a in args]
    analyzer.complex = True if floor.risk != "low" else analyzer.complex
    if start is None or start >= len(args):
        return alone, argv
    inner_args = args[start:]
    # NAME=value words right after the wrapper are environment assignments.
    assigns = []
    while inner_args and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", inner_args[0].word):
        assigns.append(inner_args[0].word.split("=", 1)[0])
        inner_args = inner_args[1:]
    if not inner_args:
        return _worse(alone, floor) if assigns and floor.risk != "low" else alone, argv
    verdict, effective = analyzer.judge(inner_args)
    if assigns:
        names = ", ".join(f"`{n}`" for n in assigns)
        verdict = _worse(
            verdict,
            Verdict(
                "process",
                "high",
                f"Setting environment variables ({names}) can change what a command runs.",
            ),
        )
    return _worse(verdict, floor) if floor.rank > verdict.rank else verdict, effective


def _getopt_wrapper(
    flags: Sequence[str], values: Sequence[str], optional: Sequence[str] = ()
) -> Callable[[list[str]], tuple[int | None, str | None]]:
    def parse(argv: list[str]) -> tuple[int | None, str | None]:
        opts = getopt(argv, flags=flags, values=values, optional=optional, stop_at_positional=True)
        if opts.error:
            return None, opts.error
        return (opts.positionals[0] if opts.positionals else len(argv)), None

    return parse


_LOW = Verdict("read", "low", "")


def _make_wrapper(
    flags: Sequence[str],
    values: Sequence[str],
    floor: Verdict,
    alone: Verdict,
    *,
    optional: Sequence[str] = (),
    skip_operand: bool = False,
) -> WrapperFn:
    parse = _getopt_wrapper(flags, values, optional)

    def wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
        argv = [a.word for a in args]
        name = _prog_name(argv[0])
        if name in ("builtin", "exec"):
            analyzer.complex = True  # shell builtins: only bash can run them
        start, err = parse(argv)
        if err:
            v = Verdict(floor.action if floor.risk != "low" else "unknown", "high",
                        f"`{name}` with an {err} needs approval.")  # fmt: skip
            return analyzer._with_suffix_scan(v, args), argv
        if skip_operand and start is not None and start < len(argv):
            start += 1  # timeout DURATION
        real_floor = (
            floor
            if floor.reason
            else Verdict(floor.action, floor.risk, f"`{name}` only wraps another command.")
        )
        return _wrap(analyzer, args, start, real_floor, alone)

    return wrapper


def _env_wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    opts = getopt(
        argv,
        flags=(
            "-i",
            "--ignore-environment",
            "-0",
            "--null",
            "-v",
            "--debug",
            "--list-signal-handling",
        ),
        values=("-u", "--unset", "-C", "--chdir", "-S", "--split-string", "-P"),
        optional=("--ignore-signal", "--default-signal", "--block-signal"),
        stop_at_positional=True,
    )
    if opts.error:
        return analyzer._with_suffix_scan(
            Verdict("process", "high", f"`env` with an {opts.error} needs approval."), args
        ), argv
    for chdir in opts.values("-C", "--chdir"):
        path = canonical_path(chdir)
        analyzer.cwd = path if path is not None else ("?" if _escapes(chdir) else analyzer.cwd)
        if secret_reason(chdir):
            return Verdict(
                "read", "high", f"`env -C {chdir}` enters a credentials directory."
            ), argv
    split = opts.values("-S", "--split-string")
    if split:
        analyzer.complex = True
        try:
            words = shlex.split(split[0])
        except ValueError:
            return Verdict(
                "unknown", "high", "`env -S` with an unbalanced string needs approval."
            ), argv
        rest = [Arg.plain(w) for w in words] + [args[i] for i in opts.positionals]
        fake = [args[0], *rest]
        return _wrap(
            analyzer,
            fake,
            1,
            Verdict("process", "high", "`env -S` splits a string into a command."),
            _read("`env` only prints the environment."),
        )
    start = opts.positionals[0] if opts.positionals else len(argv)
    alone = _read("`env` only prints its (scrubbed) environment.")
    if start < len(argv):
        analyzer.complex = True
    return _wrap(
        analyzer, args, start, Verdict("read", "low", "`env` only wraps another command."), alone
    )


def _shell_string_wrapper(name: str, floor: Verdict) -> WrapperFn:
    """`su -c STRING`, `watch CMD…`: a command given as a string."""

    def wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
        argv = [a.word for a in args]
        analyzer.complex = True
        text: str | None = None
        if name == "su":
            for i, a in enumerate(argv[1:], 1):
                if a in ("-c", "--command") and i + 1 < len(argv):
                    text = argv[i + 1]
                elif a.startswith("--command="):
                    text = a.split("=", 1)[1]
        else:  # watch [options] command…
            opts = getopt(
                argv,
                flags=("-b", "--beep", "-c", "--color", "-d", "--differences", "-e", "--errexit",
                       "-g", "--chgexit", "-t", "--no-title", "-x", "--exec", "-p", "--precise"),
                values=("-n", "--interval", "-q", "--equexit"),
                optional=("--differences",),
                stop_at_positional=True,
            )  # fmt: skip
            if not opts.error and opts.positionals:
                text = " ".join(argv[opts.positionals[0] :])
        if text is None:
            return analyzer._with_suffix_scan(floor, args), argv
        inner = analyzer.sub(text)
        return _floor(inner, floor), argv

    return wrapper


def _xargs_wrapper(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    opts = getopt(
        argv,
        flags=("-0", "--null", "-r", "--no-run-if-empty", "-t", "--verbose", "-p",
               "--interactive", "-x", "--exit", "-o", "--open-tty"),
        values=("-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "--max-lines",
                "-n", "--max-args", "-P", "--max-procs", "-s", "--max-chars",
                "--process-slot-var"),
        optional=("--eof", "--replace", "-i", "-l", "-e"),
        stop_at_positional=True,
    )  # fmt: skip
    floor = Verdict("process", "high", "`xargs` runs a command built from its input.")
    if opts.error or not opts.positionals:
        return analyzer._with_suffix_scan(floor, args), argv
    return _wrap(analyzer, args, opts.positionals[0], floor, floor)


def _command_builtin(analyzer: _Analyzer, args: list[Arg]) -> tuple[Verdict, list[str]]:
    argv = [a.word for a in args]
    analyzer.complex = True
    if len(argv) > 1 and argv[1] in ("-v", "-V"):
        return _read("`command -v` only looks a program up."), argv
    start = 1
    while start < len(argv) and argv[start] in ("-p", "--"):
        start += 1
    return _wrap(
        analyzer,
        args,
        start,
        Verdict("read", "low", "`command` only wraps another command."),
        _read("`command` does nothing alone."),
    )


_SUDO_FLAGS = _opts(
    "-A --askpass -b --background -E -H --set-home -n --non-interactive -P --preserve-groups -S "
    "--stdin -k --reset-timestamp -K --remove-timestamp -i --login -s --shell -l --list -v "
    "--validate -V --version -e --edit -B --bell -N --no-update"
)
_SUDO_VALUES = _opts(
    "-u --user -g --group -p --prompt -C --close-from -D --chdir -r --role -t --type -U "
    "--other-user -T --command-timeout -R --chroot -h --host"
)

_SUDO_FLOOR = Verdict("privileged", "high", "`sudo` runs a command as another user (root).")


def _needs(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


WRAPPERS: dict[str, WrapperFn] = {
    "sudo": _make_wrapper(
        _SUDO_FLAGS,
        _SUDO_VALUES,
        _SUDO_FLOOR,
        _needs("privileged", "high", "`sudo` alone opens a root shell or changes sudo state."),
        optional=("--preserve-env",),
    ),
    "doas": _make_wrapper(
        _opts("-n -s -L"),
        _opts("-u -C"),
        _needs("privileged", "high", "`doas` runs a command as another user (root)."),
        _needs("privileged", "high", "`doas` alone opens a root shell."),
    ),
    "pkexec": _make_wrapper(
        _opts("--disable-internal-agent"),
        _opts("--user"),
        _needs("privileged", "high", "`pkexec` runs a command as root."),
        _needs("privileged", "high", "`pkexec` alone opens a root shell."),
    ),
    "runuser": _make_wrapper(
        _opts("-l --login -m -p --preserve-environment"),
        _opts("-u --user -g --group -G --supp-group -s --shell"),
        _needs("privileged", "high", "`runuser` runs a command as another user."),
        _needs("privileged", "high", "`runuser` alone opens a shell."),
    ),
    "timeout": _make_wrapper(
        _opts("--preserve-status --foreground -v --verbose"),
        _opts("-s --signal -k --kill-after"),
        _LOW,
        _read("`timeout` alone does nothing."),
        skip_operand=True,
    ),
    "nice": _make_wrapper(
        _opts("-h"), _opts("-n --adjustment"), _LOW, _read("`nice` alone prints the niceness.")
    ),
    "ionice": _make_wrapper(
        _opts("-t --ignore"),
        _opts("-c --class -n --classdata"),
        _LOW,
        _read("`ionice` alone prints the I/O class."),
    ),
    "stdbuf": _make_wrapper(
        (), _opts("-i --input -o --output -e --error"), _LOW, _read("`stdbuf` alone does nothing.")
    ),
    "nohup": _make_wrapper(
        (),
        (),
        _needs("process", "medium", "`nohup` keeps a command running after the session ends."),
        _needs("process", "medium", "`nohup` needs approval."),
    ),
    "setsid": _make_wrapper(
        _opts("-f --fork -w --wait -c --ctty"),
        (),
        _needs("process", "medium", "`setsid` detaches a command from this session."),
        _needs("process", "medium", "`setsid` needs approval."),
    ),
    "exec": _make_wrapper(
        _opts("-c -l"),
        _opts("-a"),
        _needs("process", "high", "`exec` replaces the shell with another program."),
        _needs("process", "high", "`exec` alone changes the shell's file descriptors."),
    ),
    "builtin": _make_wrapper((), (), _LOW, _read("`builtin` alone does nothing.")),
    "time": _make_wrapper(
        _opts("-p --portability -v --verbose -q --quiet -a --append"),
        _opts("-f --format"),
        _LOW,
        _read("`time` alone does nothing."),
    ),
    "busybox": _make_wrapper(
        (),
        (),
        _needs("process", "high", "`busybox` runs one of its built-in programs."),
        _read("`busybox` alone lists its programs."),
    ),
    "env": _env_wrapper,
    "command": _command_builtin,
    "xargs": _xargs_wrapper,
    "su": _shell_string_wrapper(
        "su", _needs("privileged", "high", "`su` runs commands as another user.")
    ),
    "watch": _shell_string_wrapper(
        "watch", _needs("process", "medium", "`watch` runs a command repeatedly and never ends.")
    ),
}
# Wrappers not parsed in detail: approval, and what follows them is still
# scanned for blocked forms (`strace -f rm -rf /`).
for _name in _opts(
    "strace ltrace valgrind perf taskset chrt numactl unshare nsenter chroot systemd-run "
    "firejail bwrap script flock unbuffer parallel caffeinate proxychains torsocks faketime"
):
    WRAPPERS[_name] = _make_wrapper(
        (),
        (),
        _needs("process", "high", f"`{_name}` runs another command."),
        _needs("process", "high", f"`{_name}` needs approval."),
    )


# --------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def classify(command: str) -> Classification:
    """Judge a shell command. Never raises."""
    try:
        return _classify(command)
    except Exception as exc:  # a classifier bug must fail closed, not open
        return Classification(
            action_type="unknown",
            risk_level="high",
            requires_approval=True,
            blocked=False,
            reason=f"The command could not be judged ({type(exc).__name__}), so it needs approval.",
        )


def _classify(command: str) -> Classification:
    if not isinstance(command, str):
        command = str(command)
    analyzer = _Analyzer()
    extra: list[Verdict] = []
    if _CONTROL.search(command) or not command.isascii():
        extra.append(
            Verdict(
                "unknown",
                "high",
                "The command has control or non-ASCII characters, which can hide what it does.",
            )
        )
    if len(command) > MAX_COMMAND_CHARS:
        extra.append(Verdict("unknown", "high", "The command is too long to review."))
    text = command.replace("\x00", " ")
    analyzer.analyze(text)
    verdicts = analyzer.verdicts + extra
    decider = worst(verdicts) or Verdict("unknown", "high", "Nothing to judge.")
    if decider.risk == "low":
        names = list(dict.fromkeys(c[0] for c in analyzer.commands if c))
        if len(names) > 1 or len(analyzer.commands) > 1:
            shown = ", ".join(f"`{n}`" for n in names[:6])
            reason = f"Every part only reads ({shown})."
        else:
            reason = decider.reason or "It only reads."
        action = "read"
    else:
        reason = decider.reason
        action = decider.action
    if not reason.endswith((".", "?", "!")):
        reason += "."
    simple = (
        not analyzer.complex
        and len(analyzer.commands) == 1
        and analyzer.simple_count == 1
        and not extra
        and _argv_matches(text, analyzer.commands[0])
    )
    return Classification(
        action_type="destructive" if decider.blocked else action,
        risk_level=decider.risk,  # type: ignore[arg-type]
        requires_approval=decider.risk != "low",
        blocked=decider.blocked,
        reason=reason,
        commands=analyzer.commands,
        simple=simple,
    )


def _argv_matches(text: str, argv: list[str]) -> bool:
    """Whether running argv directly is exactly what bash would run."""
    try:
        split = shlex.split(text, comments=False, posix=True)
    except ValueError:
        return False
    if split != argv:
        return False
    # every word literal: no expansion characters outside quotes
    for raw in _raw_words(text):
        glob, brace, expand = _raw_features(raw)
        if glob or brace or expand or raw.startswith("~") or "#" in raw:
            return False
    return True


def _raw_words(text: str) -> list[str]:
    try:
        nodes = bashlex.parse(text)
    except Exception:
        return [text]
    out: list[str] = []
    for node in nodes:
        for part in getattr(node, "parts", None) or []:
            if part.kind == "word":
                out.append(text[part.pos[0] : part.pos[1]])
    return out


# --------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------

ENV_ALLOWLIST = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR",
     "PWD", "COLUMNS", "LINES", "NO_COLOR"}
)  # fmt: skip
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)
_NEVER_PREFIXES = ("SLACK_", "MATRIX_", "DUCKLM_", "OPENAI_", "AWS_")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def scrubbed_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a command gets: an allow-list, never anything secret-looking.

    PATH keeps only absolute directories, so a file in the workspace named `ls`
    cannot stand in for the real one.
    """
    source = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name, value in source.items():
        if not (name in ENV_ALLOWLIST or name.startswith("LC_")):
            continue
        if name.startswith(_NEVER_PREFIXES) or _SECRET_NAME.search(name):
            continue
        if not isinstance(value, str) or "\x00" in value:
            continue
        out[name] = value
    path = [p for p in out.get("PATH", DEFAULT_PATH).split(":") if p.startswith("/")]
    out["PATH"] = ":".join(path) or DEFAULT_PATH
    return out


# Added for commands that run without approval: no pager, no prompts, and git
# must not start a filesystem monitor named in the repository's config.
_AUTO_RUN_ENV = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "SYSTEMD_PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "core.fsmonitor",
    "GIT_CONFIG_VALUE_0": "false",
}

_GRACE_SECONDS = 2.0
_DRAIN_AFTER_EXIT = 2.0


def _limits() -> None:  # pragma: no cover - runs in the child
    try:
        import resource

        for limit, value in (
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_FSIZE, 1 << 30),
            (resource.RLIMIT_NOFILE, 1024),
        ):
            _soft, hard = resource.getrlimit(limit)
            new = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (new, new if hard == resource.RLIM_INFINITY else hard))
    except Exception:
        pass


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _drain(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, int]:
    """Read everything (so the child never blocks on a full pipe), keep the first `cap` bytes."""
    if stream is None:
        return b"", 0
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
            dropped += max(0, len(chunk) - room)
        else:
            dropped += len(chunk)
    return bytes(kept), dropped


def _render(data: bytes, dropped: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[… output truncated: {dropped} bytes dropped]"
    return text


def _refusal(command: str, c: Classification, error: str) -> ToolResult:
    return ToolResult(
        ok=False,
        error=error,
        metadata={
            "command": command,
            "action_type": c.action_type,
            "risk_level": c.risk_level,
            "requires_approval": c.requires_approval,
            "blocked": c.blocked,
            "returncode": None,
            "reason": c.reason,
            "duration_ms": 0,
            "truncated": False,
            "timed_out": False,
        },
    )


def _prepare(
    command: str, fresh: Classification, workspace: Path
) -> ToolResult | tuple[list[str], str, dict[str, str]]:
    """argv, the program to run and its environment; or a refusal."""
    if not workspace.is_dir():
        return _refusal(command, fresh, f"workspace {str(workspace)!r} is not a directory")
    env = scrubbed_env()
    root = workspace.resolve()
    env["PWD"] = str(root)
    # A PATH entry inside the workspace would let a file there stand in for `ls`.
    kept = [p for p in env["PATH"].split(":") if not Path(p).resolve().is_relative_to(root)]
    env["PATH"] = ":".join(kept) or DEFAULT_PATH
    if not fresh.requires_approval:
        env.update(_AUTO_RUN_ENV)
    if fresh.simple and fresh.commands:
        argv = list(fresh.commands[0])
        program = shutil.which(argv[0], path=env["PATH"]) if "/" not in argv[0] else argv[0]
        if program is None:
            return _refusal(command, fresh, f"command not found: {argv[0]}")
        return argv, program, env
    bash = shutil.which("bash", path=env["PATH"]) or shutil.which("bash") or "/bin/bash"
    return ["bash", "--noprofile", "--norc", "-c", command], bash, env


async def execute(
    command: str,
    classification: Classification,
    *,
    workspace: Path,
    timeout: float = 60.0,  # noqa: ASYNC109 - part of the contract
    max_output: int = 64 * 1024,
) -> ToolResult:
    """Run a classified command. Blocked commands are refused here too."""
    fresh = classify(command)
    if classification.blocked or fresh.blocked:
        reason = fresh.reason if fresh.blocked else classification.reason
        return _refusal(command, fresh, f"Blocked: {reason}")
    prepared = _prepare(command, fresh, Path(workspace))
    if isinstance(prepared, ToolResult):
        return prepared
    argv, executable, env = prepared
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            executable=executable,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(workspace),
            env=env,
            start_new_session=True,
            preexec_fn=_limits,
        )
    except FileNotFoundError:
        return _refusal(command, fresh, f"command not found: {argv[0]}")
    except PermissionError:
        return _refusal(command, fresh, f"permission denied: {argv[0]}")
    except OSError as exc:
        return _refusal(command, fresh, f"could not start {argv[0]}: {exc.strerror or exc}")
    out_task = asyncio.create_task(_drain(proc.stdout, max_output))
    err_task = asyncio.create_task(_drain(proc.stderr, max_output))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _GRACE_SECONDS)
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: leave nothing behind
            _killpg(proc.pid, signal.SIGKILL)
    # Whatever the command left in its process group (background jobs) goes too.
    _killpg(proc.pid, signal.SIGTERM)
    _killpg(proc.pid, signal.SIGKILL)
    done, pending = await asyncio.wait({out_task, err_task}, timeout=_DRAIN_AFTER_EXIT)
    for task in pending:  # a grandchild that escaped the group still holds the pipe
        task.cancel()
    stdout, out_dropped = out_task.result() if out_task in done else (b"", 0)
    stderr, err_dropped = err_task.result() if err_task in done else (b"", 0)
    duration_ms = int((time.monotonic() - started) * 1000)
    returncode = proc.returncode
    output = _render(stdout, out_dropped)
    err_text = _render(stderr, err_dropped)
    if err_text:
        output += ("\n" if output and not output.endswith("\n") else "") + "[stderr]\n" + err_text
    ok = returncode == 0 and not timed_out
    error: str | None = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif returncode == 127 and not fresh.simple:
        error = "exit status 127 (command not found)"
    elif returncode is not None and returncode < 0:
        error = f"killed by signal {-returncode}"
    elif returncode != 0:
        error = f"exit status {returncode}"
    return ToolResult(
        ok=ok,
        output=output,
        error=error,
        metadata={
            "command": command,
            "action_type": fresh.action_type,
            "risk_level": fresh.risk_level,
            "requires_approval": fresh.requires_approval,
            "blocked": fresh.blocked,
            "returncode": returncode,
            "reason": fresh.reason,
            "duration_ms": duration_ms,
            "truncated": bool(out_dropped or err_dropped),
            "timed_out": timed_out,
        },
    )


# --------------------------------------------------------------------------
# The tool
# --------------------------------------------------------------------------


class ShellTool(Tool):
    name: ClassVar[str] = "shell_exec_safe"
    description: ClassVar[str] = (
        "Run one shell command in the workspace and return its output. Read-only "
        "commands (ls, cat, grep, git status/log/diff, df, ps, systemctl status, "
        "kubectl get, …) run at once; anything that writes, installs, controls "
        "services or uses the network waits for a person's approval; destroying "
        "the system is refused. Prefer plain read-only commands without "
        "redirections or substitutions."
    )
    args_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    }

    def __init__(self, workspace: Path, *, timeout: float = 60.0, max_output: int = 65536) -> None:
        self.workspace = Path(workspace)
        self.timeout = timeout
        self.max_output = max_output

    @staticmethod
    def _command(args: dict[str, Any]) -> str:
        if not isinstance(args, dict):
            raise ToolArgumentError("shell_exec_safe takes an object with 'command'")
        command = args.get("command")
        if command is None:
            raise ToolArgumentError("shell_exec_safe needs a 'command'")
        if not isinstance(command, str):
            raise ToolArgumentError("'command' must be a string")
        if not command.strip():
            raise ToolArgumentError("'command' must not be empty")
        if len(command) > MAX_COMMAND_CHARS:
            raise ToolArgumentError(
                f"'command' is {len(command)} characters; the limit is {MAX_COMMAND_CHARS}"
            )
        return command

    def assess(self, args: dict[str, Any]) -> Assessment:
        return classify(self._command(args)).assessment()

    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        command = self._command(args)
        fresh = classify(command)
        if fresh.blocked:
            return _refusal(command, fresh, f"Blocked: {fresh.reason}")
        if fresh.requires_approval and not assessment.requires_approval:
            # The caller cleared this as read-only; it is not. Never trust that.
            return _refusal(
                command, fresh, f"Refused: this command needs approval ({fresh.reason})"
            )
        return await execute(
            command,
            fresh,
            workspace=self.workspace,
            timeout=self.timeout,
            max_output=self.max_output,
        )
