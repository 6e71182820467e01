"""Per-program read-only policies: when `find`, `sed`, `git`, `kubectl`, … only read.

A policy gets the argv of one call and returns None when that call is
read-only, or the `Verdict` that makes it need approval. Programs with a
policy, with flag rules (`programs.FLAG_POLICIES`) or with read-only
subcommands together make up `READ_ONLY_PROGRAMS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from runtime.tools.shell.options import _opts, getopt, has_flag
from runtime.tools.shell.paths import secret_reason
from runtime.tools.shell.programs import (
    FLAG_POLICIES,
    PLAIN_READ_ONLY,
    WRITE_PROGRAMS,
)
from runtime.tools.shell.subcommands import (
    _CTL_READ,
    _SUBCOMMAND_PROGRAMS,  # noqa: F401 (re-exported: analyzer imports it from here)
    _policy_docker,
    _policy_dpkg_query,
    _policy_git,
    _policy_ip,
    _policy_kubectl,
    _policy_package,
    _policy_systemctl,
)
from runtime.tools.shell.verdict import Verdict

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

READ_ONLY_PROGRAMS = frozenset(
    PLAIN_READ_ONLY | set(FLAG_POLICIES) | set(POLICIES) | set(_CTL_READ)
)
