"""The entry point of classification: `classify(command) -> Classification`.

Runs the analyser over the whole command, adds what only the raw text shows
(control characters, length), lets the worst verdict decide, and works out
whether the command is one simple command that can run as argv without a
shell. `classify` never raises: a classifier bug fails closed.

(Named `classifier`, not `classify`, so the module does not shadow the
function the package re-exports.)
"""

from __future__ import annotations

import posixpath
import re
import shlex
from typing import Any

import bashlex

from runtime.tools.shell.analyzer import _Analyzer
from runtime.tools.shell.limits import MAX_COMMAND_CHARS
from runtime.tools.shell.profiles import PROGRAM_PROFILES, profile_for
from runtime.tools.shell.specs import parse
from runtime.tools.shell.specs_text import TEXT_SPECS
from runtime.tools.shell.verdict import Classification, Verdict, worst
from runtime.tools.shell.words import _raw_features

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
        # Never parsed: the tool refuses to run it anyway, and analysing
        # megabytes of model output would stall the whole bot.
        return Classification(
            action_type="unknown",
            risk_level="high",
            requires_approval=True,
            blocked=False,
            reason=f"The command is too long to review ({len(command):,} characters; "
            f"the limit is {MAX_COMMAND_CHARS:,}).",
        )
    text, arithmetic = _plain_arithmetic(command.replace("\x00", " "))
    analyzer.analyze(text)
    verdicts = analyzer.verdicts + extra
    profile = profile_for(c[0] for c in analyzer.commands if c)
    if profile is not None:
        verdicts.extend(_profile_companions(analyzer.commands))
        if analyzer.inputs:
            verdicts.append(
                Verdict(
                    "read",
                    "medium",
                    f"`{analyzer.inputs[0]}` is read next to a client with a sandbox profile "
                    "(network, credentials) it would share; run it on its own.",
                )
            )
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
        and not arithmetic
        and _argv_matches(text, analyzer.commands[0], analyzer.nodes)
    )
    return Classification(
        action_type="destructive" if decider.blocked else action,
        risk_level=decider.risk,  # type: ignore[arg-type]
        requires_approval=decider.risk != "low",
        blocked=decider.blocked,
        reason=reason,
        commands=analyzer.commands,
        simple=simple,
        sandbox_profile=profile if decider.risk == "low" else None,
    )


# Programs that may share a sandbox profile with a client that needs it, when
# they read only their standard input (`kubectl get pods | grep web | head`),
# with how many operands that use leaves them (the pattern, the program).
_STDIN_FILTERS: dict[str, int] = {
    **dict.fromkeys(("grep", "egrep", "fgrep", "awk", "gawk", "mawk", "sed", "jq", "yq"), 1),
    **dict.fromkeys(("head", "tail", "sort", "uniq", "wc", "cut", "column", "tac", "rev", "nl",
                     "fold", "fmt", "cat", "base64", "tr", "paste", "expand"), 0),
}  # fmt: skip
_PATTERN_OPTIONS = ("-e", "--regexp", "-f", "--file", "--expression", "--source")


def _profile_companions(commands: list[list[str]]) -> list[Verdict]:
    """A profile (network, a kubeconfig, a socket) is lent to the whole command.

    So every other program in it must be a filter of the client's output:
    `kubectl get pods; cat /etc/ducklm/kubeconfig.yaml` or `dig x; ping 10.0.0.5`
    would borrow what only the client was meant to get.
    """
    out: list[Verdict] = []
    clients = sorted({posixpath.basename(c[0]) for c in commands if c} & set(PROGRAM_PROFILES))
    for argv in commands:
        name = posixpath.basename(argv[0]) if argv else ""
        if not argv or name in PROGRAM_PROFILES:
            continue
        limit = _STDIN_FILTERS.get(name)
        allow = TEXT_SPECS.get(name)
        operands: list[str] = []
        if allow is not None:
            opts = parse(allow, argv)
            operands = [argv[i] for i in opts.positionals if argv[i] != "-"]
            if opts.has(*_PATTERN_OPTIONS) and limit:
                limit -= 1
            if opts.has("-r", "-R", "--recursive"):
                limit = None
        if limit is None or allow is None or len(operands) > limit:
            out.append(
                Verdict(
                    "read",
                    "medium",
                    f"`{name}` runs next to `{clients[0]}`, whose sandbox profile (network, "
                    "credentials) it would share; run it on its own.",
                )
            )
            break
    return out


# Stands for an arithmetic result: big, so that a bound on a number (`seq`,
# `sleep`, `shuf -n`) is never met by a value only bash would compute.
_UNKNOWN_NUMBER = "99999999999"
_ARITHMETIC_CHARS = frozenset("0123456789+-*/%<>=!&|^~?:, \t()")


def _plain_arithmetic(text: str) -> tuple[str, bool]:
    """`$((1024 * 1024))` with numbers and operators only, read as a number.

    bashlex cannot parse arithmetic expansion. One made of digits and
    operators cannot name a variable (whose array subscript could run code) or
    a file, so for judging it is just a (large) number; anything else is left for the
    parser to refuse. Returns the text to judge and whether it was changed
    (then the command must run through bash, not as argv).
    """
    if "$((" not in text:
        return text, False
    out: list[str] = []
    i, changed = 0, False
    while i < len(text):
        start = text.find("$((", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        j, depth = start + 3, 0
        while j < len(text) and text[j] in _ARITHMETIC_CHARS:
            if text[j] == "(":
                depth += 1
            elif text[j] == ")":
                if depth == 0:
                    break
                depth -= 1
            j += 1
        if text[j : j + 2] == "))" and depth == 0 and j > start + 3:
            out.append(_UNKNOWN_NUMBER)
            changed = True
            i = j + 2
        else:
            out.append("$((")
            i = start + 3
    return "".join(out), changed


def _argv_matches(text: str, argv: list[str], nodes: list[Any] | None = None) -> bool:
    """Whether running argv directly is exactly what bash would run."""
    try:
        split = shlex.split(text, comments=False, posix=True)
    except ValueError:
        return False
    if split != argv:
        return False
    # every word literal: no expansion characters outside quotes
    for raw in _raw_words(text, nodes):
        glob, brace, expand = _raw_features(raw)
        if glob or brace or expand or raw.startswith("~") or "#" in raw:
            return False
    return True


def _raw_words(text: str, nodes: list[Any] | None = None) -> list[str]:
    if not nodes:  # the analyser's tree, or parse again
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
