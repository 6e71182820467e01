"""Per-program read-only policies left outside the allow-list modules (`mount`).

A policy gets the argv of one call and returns None when that call is
read-only, or the `Verdict` that makes it need approval. Programs with a
policy, with flag rules (`programs.FLAG_POLICIES`) or with read-only
subcommands together make up `READ_ONLY_PROGRAMS`; the programs with an
option allow-list (`specs_text`, `specs_system`) join them in the analyser.
The mini-languages (sed, awk, jq, find, test) live in `languages`.
"""

from __future__ import annotations

from collections.abc import Callable

from runtime.tools.shell.languages import sed_script_problem  # noqa: F401 (re-exported)
from runtime.tools.shell.programs import (
    FLAG_POLICIES,
    PLAIN_READ_ONLY,
)
from runtime.tools.shell.subcommands import (
    _CTL_READ,
    _SUBCOMMAND_PROGRAMS,  # noqa: F401 (re-exported: analyzer imports it from here)
)
from runtime.tools.shell.verdict import Verdict

# A policy gets argv and returns None when the call is read-only, or a Verdict.
Policy = Callable[[list[str]], Verdict | None]


def _approval(action: str, risk: str, reason: str) -> Verdict:
    return Verdict(action, risk, reason)


def _policy_mount(argv: list[str]) -> Verdict | None:
    if all(a in ("-l", "--show-labels") for a in argv[1:]):
        return None
    return _approval("privileged", "high", "`mount` with arguments mounts or changes filesystems")


# The policies of date, hostname, ps, top, ping, sysctl, crontab, kill and of
# the subcommand programs (git, kubectl, docker, the package tools, ...) live
# with their allow-lists in `specs_system` and `subcommands`; the analyser
# asks those first, so only what they do not cover is here.
POLICIES: dict[str, Policy] = {
    "mount": _policy_mount,
}

READ_ONLY_PROGRAMS = frozenset(
    PLAIN_READ_ONLY | set(FLAG_POLICIES) | set(POLICIES) | set(_CTL_READ)
)
