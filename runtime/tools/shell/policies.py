"""Per-program read-only policies: when `date`, `kill`, `git`, `kubectl`, … only read.

A policy gets the argv of one call and returns None when that call is
read-only, or the `Verdict` that makes it need approval. Programs with a
policy, with flag rules (`programs.FLAG_POLICIES`) or with read-only
subcommands together make up `READ_ONLY_PROGRAMS`; the programs with an
option allow-list (`specs_text`, `specs_system`) join them in the analyser.
The mini-languages (sed, awk, jq, find, test) live in `languages`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from runtime.tools.shell.languages import sed_script_problem  # noqa: F401 (re-exported)
from runtime.tools.shell.options import getopt, has_flag
from runtime.tools.shell.programs import (
    FLAG_POLICIES,
    PLAIN_READ_ONLY,
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
