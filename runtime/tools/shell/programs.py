"""What the classifier knows about programs: tables by what a program does.

Read-only programs (plainly, or except for some flags), and the programs that
write files, control processes, install packages, use the network, need
privileges, run code or shut the machine down. The tables decide the verdict
for a program that has no policy of its own (`policies`).
"""

from __future__ import annotations

import re

from runtime.tools.shell.options import _opts

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
     "fdisk", "sfdisk", "parted", "gdisk", "sgdisk", "cfdisk", "blkdiscard", "kill",
     "killall5", "pkill", "killall", "systemctl", "init", "telinit", "shutdown", "reboot",
     "halt", "poweroff", "rsync", "busctl", "dbus-send", "gdbus", "qdbus", "tee", "loginctl",
     "fuser", "hdparm", "nvme", "cryptsetup", "mdadm", "skill", "sg_format", "sg_sanitize"}
)  # fmt: skip
