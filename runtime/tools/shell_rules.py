"""The "always allow" rules for shell commands: normalization and matching.

A rule is `exact` (the whole command, normalized) or `prefix` (an argv
prefix such as `systemctl restart nginx`, stored shlex-joined). Matching is
deliberately narrow:

- a blocked command is never matched, whatever the rules say;
- an exact rule covers exactly its normalized command (compound or not), and
  a part of a compound command that is exactly it;
- otherwise a command is covered only if it is a plain list/pipeline of simple
  commands and *every* part is read-only or matched by a rule
  (`git pull` does not cover `git pull && rm -rf build`);
- a prefix rule covers a part only if the part's redirections and environment
  assignments are ones the rule itself contains, and any command or process
  substitution lies inside the matched prefix.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import bashlex

from runtime.tools.shell import INTERPRETERS, MAX_COMMAND_CHARS, MAX_PARSE_CHARS, SHELLS, classify
from runtime.tools.shell.programs import _PYTHON_RE

RULE_KINDS = ("exact", "prefix")

# A prefix rule of just one of these would allow anything at all.
_TOO_BROAD = frozenset(
    {*SHELLS, *INTERPRETERS, "sudo", "doas", "su", "pkexec", "env", "eval", "exec", "source",
     ".", "xargs", "timeout", "nice", "nohup", "command", "builtin", "busybox", "watch",
     "setsid", "stdbuf", "ionice", "time"}
)  # fmt: skip


class RuleLike(Protocol):
    kind: str
    pattern: str


# --------------------------------------------------------------------------
# Rendering words canonically
# --------------------------------------------------------------------------


def _literal(raw: str) -> bool:
    """A raw word whose meaning is its quote-removed text (no expansion at all)."""
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
            elif c in "*?[{$`~#":
                return False
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
                return False
        i += 1
    return quote is None


def _render_word(text: str, node: Any) -> str:
    raw = text[node.pos[0] : node.pos[1]]
    if _literal(raw):
        return shlex.quote(node.word)
    return raw


def _render_assignment(text: str, node: Any) -> str:
    raw = text[node.pos[0] : node.pos[1]]
    name, _, value = raw.partition("=")
    if _literal(value):
        try:
            parts = shlex.split(value) if value else [""]
        except ValueError:
            return raw
        if len(parts) == 1:
            return f"{name}={shlex.quote(parts[0])}" if parts[0] else f"{name}="
    return raw


def _render_redirect(text: str, node: Any) -> str:
    prefix = str(node.input) if isinstance(node.input, int) else ""
    out = node.output
    if node.type in ("<<", "<<-"):
        # The body's whitespace is data: keep it exactly.
        return text[node.pos[0] : node.pos[1]].strip()
    if isinstance(out, int):
        return f"{prefix}{node.type}{out}"
    return f"{prefix}{node.type} {_render_word(text, out)}"


def _collapse(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


@dataclass
class _Part:
    """One simple command of a list/pipeline, rendered canonically."""

    text: str  # its source text
    words: list[str] = field(default_factory=list)
    assignments: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    # index of the first word that holds a substitution, if any
    first_subst: int | None = None


def _has_subst(node: Any) -> bool:
    stack = list(getattr(node, "parts", None) or [])
    while stack:
        p = stack.pop()
        if p.kind in ("commandsubstitution", "processsubstitution"):
            return True
        stack.extend(getattr(p, "parts", None) or [])
    return False


def _part(text: str, node: Any) -> _Part:
    part = _Part(text=text[node.pos[0] : node.pos[1]])
    for p in node.parts:
        if p.kind == "word":
            if _has_subst(p) and part.first_subst is None:
                part.first_subst = len(part.words)
            part.words.append(_render_word(text, p))
        elif p.kind == "assignment":
            if _has_subst(p) and part.first_subst is None:
                part.first_subst = -1  # never inside a prefix
            part.assignments.append(_render_assignment(text, p))
        elif p.kind == "redirect":
            if not isinstance(p.output, int) and _has_subst(p.output):
                part.first_subst = -1
            part.redirects.append(_render_redirect(text, p))
    return part


class _Unsupported(Exception):
    """A construct that is not a plain list/pipeline of simple commands."""


def _tokens(text: str, node: Any, parts: list[_Part] | None) -> list[str]:
    """Canonical tokens of a node; collects simple-command parts when asked."""
    kind = node.kind
    if kind == "list":
        out: list[str] = []
        for p in node.parts:
            if p.kind == "operator":
                if p.op == "&" and parts is not None:
                    raise _Unsupported("background")
                out.append(";" if p.op == "\n" else p.op)
            else:
                out.extend(_tokens(text, p, parts))
        return out
    if kind == "pipeline":
        out = []
        for p in node.parts:
            if p.kind == "pipe":
                out.append(p.pipe)
            elif p.kind == "reservedword":
                out.append(p.word)
            else:
                out.extend(_tokens(text, p, parts))
        return out
    if kind == "command":
        part = _part(text, node)
        if parts is not None:
            parts.append(part)
        # keep source order: assignments, words and redirects as they appear
        out = []
        for p in node.parts:
            if p.kind == "word":
                out.append(_render_word(text, p))
            elif p.kind == "assignment":
                out.append(_render_assignment(text, p))
            elif p.kind == "redirect":
                out.append(_render_redirect(text, p))
        return out
    if parts is not None:
        raise _Unsupported(kind)
    # Loops, groups, functions: the source text as written (quoted whitespace is data).
    return [text[node.pos[0] : node.pos[1]].strip()]


def _parse(command: str) -> list[Any] | None:
    if not command.strip() or len(command) > MAX_PARSE_CHARS or "\x00" in command:
        return None
    try:
        return bashlex.parse(command)
    except Exception:
        return None


def normalize_command(command: str) -> str:
    """Canonical text: words re-quoted shlex-style, single spaces between words and operators.

    `ls  -la   'a b'` and `ls -la "a b"` both become `ls -la 'a b'`. Words
    with expansions keep their source text. Unparseable text is the stripped
    original with whitespace runs collapsed.
    """
    if not isinstance(command, str):
        command = str(command)
    nodes = _parse(command)
    if nodes is None:
        return _collapse(command)
    try:
        chunks = [" ".join(_tokens(command, node, None)) for node in nodes]
    except Exception:
        return _collapse(command)
    return " ; ".join(chunks)


def _split_parts(command: str) -> list[_Part] | None:
    """The simple commands of a plain list/pipeline, or None for anything else."""
    nodes = _parse(command)
    if nodes is None:
        return None
    parts: list[_Part] = []
    try:
        for node in nodes:
            _tokens(command, node, parts)
    except _Unsupported:
        return None
    except Exception:
        return None
    return parts


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def rule_for_command(command: str) -> tuple[str, str]:
    """What an "Always" click creates: an exact rule for this command."""
    return "exact", normalize_command(command)


def validate_rule(kind: str, pattern: str) -> str:
    """Check a rule an admin (or an Always click) wants; return its normalized pattern."""
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}: use exact or prefix")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("a rule needs a command pattern")
    nodes = _parse(pattern)
    if nodes is None:
        raise ValueError(f"`{_collapse(pattern)[:200]}` cannot be parsed as a shell command")
    verdict = classify(pattern)
    if verdict.blocked:
        shown = _collapse(pattern)[:200]
        why = verdict.reason.rstrip(".")
        raise ValueError(f"`{shown}` is blocked ({why}); no rule can allow it")
    normalized = normalize_command(pattern)
    if kind == "prefix":
        parts = _split_parts(pattern)
        if parts is None or len(parts) != 1 or not parts[0].words:
            raise ValueError("a prefix rule must be one simple command, such as `git pull`")
        first = shlex.split(parts[0].words[0])[0] if _literal(parts[0].words[0]) else ""
        name = first.rsplit("/", 1)[-1]
        if len(parts[0].words) == 1 and (name in _TOO_BROAD or _PYTHON_RE.match(name)):
            raise ValueError(
                f"a prefix rule of just `{name}` would allow any command; name the command too"
            )
        if name in _TOO_BROAD and parts[0].words[-1] in ("-c", "'-c'"):
            raise ValueError(f"a prefix rule `{normalized}` would allow any command string")
    return normalized


def describe_rule(kind: str, pattern: str) -> str:
    """How a rule reads on an approval card or in `/duck rules`."""
    if kind == "exact":
        return f"exactly `{pattern}`"
    if kind == "prefix":
        return f"any command starting with `{pattern}`"
    return f"{kind} `{pattern}`"


def _prefix_covers(part: _Part, rule_part: _Part) -> bool:
    n = len(rule_part.words)
    if n == 0 or part.words[:n] != rule_part.words:
        return False
    if part.first_subst is not None and not (0 <= part.first_subst < n):
        return False  # a substitution outside the prefix the rule names
    if any(a not in rule_part.assignments for a in part.assignments):
        return False
    return all(r in rule_part.redirects for r in part.redirects)


def rule_covers(command: str, rules: Sequence[RuleLike]) -> bool:
    """Whether the rules allow this command forever. Blocked commands: never."""
    if not isinstance(command, str) or not command.strip() or len(command) > MAX_COMMAND_CHARS:
        return False
    verdict = classify(command)
    if verdict.blocked:
        return False
    normalized = normalize_command(command)
    prefix_parts: list[_Part] = []
    exact_patterns: set[str] = set()
    for rule in rules:
        kind = getattr(rule, "kind", None)
        pattern = getattr(rule, "pattern", None)
        if not isinstance(pattern, str) or not pattern.strip():
            continue
        if kind == "exact":
            exact_patterns.add(normalize_command(pattern))
        elif kind == "prefix":
            parsed = _split_parts(pattern)
            if parsed and len(parsed) == 1 and parsed[0].words:
                prefix_parts.append(parsed[0])
    if normalized in exact_patterns:
        return True
    if not prefix_parts and not exact_patterns:
        return False
    parts = _split_parts(command)
    if not parts:
        return False
    for part in parts:
        if not part.words:
            return False  # a bare assignment
        if normalize_command(part.text) in exact_patterns:
            continue
        if any(_prefix_covers(part, rp) for rp in prefix_parts):
            continue
        judged = classify(part.text)
        if judged.blocked or judged.requires_approval:
            return False
    return True
