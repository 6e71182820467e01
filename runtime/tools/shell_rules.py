"""The "always allow" rules for shell commands: normalization and matching.

A rule is `exact` (the whole command, normalized) or `prefix` (an argv
prefix such as `rm -rf build`, stored shlex-joined). A rule covers only what
it names:

- a blocked command is never covered, whatever the rules say;
- an exact rule covers its normalized command as a whole (compound or not,
  with its `cd`). A one-command exact rule also covers that command as one
  part of a compound command, under the conditions below;
- a prefix rule covers its own words plus added *plain operands inside the
  workspace*, and only for programs whose operands are paths
  (`rule_prefixes.PATH_OPERAND_PROGRAMS`): never an added option, expansion,
  glob, `~`, absolute path, `..`, `.git`, secret, unit, resource or target;
  never an environment assignment or redirection the rule does not contain
  (besides `2>&1`-style duplications and `/dev/null`). Added operands are
  resolved in the workspace, symbolic links included;
- a compound command (a list or pipeline of simple commands) is covered only
  when every part is covered or read-only. A part is covered by a rule only
  when no `cd` (or other context builtin, `export`, `alias`, …) comes before
  it and it does not read a pipe (`echo 'rm -rf ~' | bash` is not covered by
  a rule for `bash`). The parts no rule covers are judged together by the
  classifier, so `cd /proc/1 && cat environ` after a covered part still needs
  approval. A command no rule names any part of is not covered (read-only
  ones run unasked, in the sandbox).

What a prefix may be is decided in `runtime.tools.rule_prefixes`.

Matching through an index: a rule is parsed once, when it is made
(`compile_rule`: its normalized text, its program, its match key and, for a
prefix rule, its parsed words as JSON, all stored with it). A command is parsed
once per check (`lookup_command`); it names the few match keys a covering rule
could have (its whole normalized text, each part's, each word-prefix of each
part up to the longest prefix rule stored for that part's program), the store
returns only the rules with those keys, and `CommandLookup.covered_by` decides
with exactly the semantics above. No stored pattern is parsed again, so the
cost of a check does not grow with the number of rules. (Should the way words
are rendered here ever change, the stored forms must be made again: a
migration `UPDATE rules SET normalized = NULL` has every rule parsed once more
by the next check, as rules from before schema v6 are.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import bashlex

from runtime.tools.rule_prefixes import (
    CONTEXT_BUILTINS,
    path_operands_allowed,
    plain_operand_problem,
    prefix_problem,
    program_name,
)
from runtime.tools.shell import MAX_COMMAND_CHARS, MAX_PARSE_CHARS, classify
from runtime.tools.shell.words import _literal

RULE_KINDS = ("exact", "prefix")


class RuleLike(Protocol):
    kind: str
    pattern: str


# --------------------------------------------------------------------------
# Rendering words canonically
# --------------------------------------------------------------------------


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
    words: list[str] = field(default_factory=list)  # canonical (re-quoted) words
    values: list[str] = field(default_factory=list)  # quote-removed words
    literal: list[bool] = field(default_factory=list)  # word has no expansion at all
    assignments: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    # index of the first word that holds a substitution, if any
    first_subst: int | None = None
    piped_in: bool = False  # reads the output of the part before it


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
            raw = text[p.pos[0] : p.pos[1]]
            part.words.append(_render_word(text, p))
            part.values.append(p.word)
            part.literal.append(_literal(raw) and not _has_subst(p))
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
        after_pipe = False
        for p in node.parts:
            if p.kind == "pipe":
                out.append(p.pipe)
                after_pipe = True
            elif p.kind == "reservedword":
                out.append(p.word)
            else:
                before = len(parts) if parts is not None else 0
                out.extend(_tokens(text, p, parts))
                if parts is not None and after_pipe and len(parts) > before:
                    parts[before].piped_in = True  # it reads the previous part's output
                after_pipe = False
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
    """What an "Always" click creates: an exact rule for this command, never a prefix.

    An exact rule names one command with its `cd` context, so "Always" on
    `bash -lc '…'` or `kubectl exec …` allows that command again and nothing
    else. (The caller refuses blocked commands; this never raises, so a card
    can show the rule.)
    """
    return "exact", normalize_command(command)


def _prefix_part(pattern: str) -> _Part | None:
    parts = _split_parts(pattern)
    if parts is None or len(parts) != 1 or not parts[0].words:
        return None
    return parts[0]


def _prefix_refusal(part: _Part) -> str | None:
    """Why a prefix rule with these words must not exist (None: it may)."""
    if not part.literal[0]:
        return "the program of a prefix rule must be a plain word, not an expansion"
    return prefix_problem(part.values)


def validate_rule(kind: str, pattern: str) -> str:
    """Check a rule an admin wants (`ducklm rules add`, `/duck rules add`); return its
    normalized pattern. ("Always" makes an exact rule, `rule_for_command`.)

    Raises ValueError with the reason, which `rules add` shows as it is.
    """
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}: use exact or prefix")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("a rule needs a command pattern")
    shown = _collapse(pattern)[:200]
    if len(pattern) > MAX_COMMAND_CHARS:
        raise ValueError(f"a rule pattern is limited to {MAX_COMMAND_CHARS} characters")
    nodes = _parse(pattern)
    if nodes is None:
        raise ValueError(f"`{shown}` cannot be parsed as a shell command")
    verdict = classify(pattern)
    if verdict.blocked:
        why = verdict.reason.rstrip(".")
        raise ValueError(f"`{shown}` is blocked ({why}); no rule can allow it")
    normalized = normalize_command(pattern)
    if kind == "prefix":
        part = _prefix_part(pattern)
        if part is None:
            raise ValueError("a prefix rule must be one simple command, such as `git pull`")
        problem = _prefix_refusal(part)
        if problem:
            raise ValueError(f"`{normalized}` refused: {problem}")
    return normalized


def describe_rule(kind: str, pattern: str) -> str:
    """How a rule reads on an approval card or in `/duck rules`."""
    if kind == "exact":
        return f"exactly `{pattern}`"
    if kind == "prefix":
        part = _prefix_part(pattern)
        refusal = "it is not one simple command" if part is None else _prefix_refusal(part)
        if refusal:
            return f"`{pattern}` (covers nothing: {refusal})"
        assert part is not None
        if path_operands_allowed(part.values):
            return f"`{pattern}`, optionally followed by more files inside the workspace"
        return f"`{pattern}` (its options and operands exactly as named)"
    return f"{kind} `{pattern}`"


# Redirections any covered command may add: they write nothing.
_HARMLESS_REDIRECT = re.compile(r"^([12]?>&[12]|[12]?>>? /dev/null|&>>? /dev/null)$")


def _prefix_covers(part: _Part, rule: _Part, workspace: str | os.PathLike[str] | None) -> bool:
    n = len(rule.words)
    if n == 0 or part.words[:n] != rule.words:
        return False
    if part.first_subst is not None and not (0 <= part.first_subst < n):
        return False  # a substitution outside the prefix the rule names
    if any(a not in rule.assignments for a in part.assignments):
        return False
    if any(r not in rule.redirects and not _HARMLESS_REDIRECT.match(r) for r in part.redirects):
        return False
    extra = range(n, len(part.words))
    if not extra:
        return True
    if not path_operands_allowed(rule.values):
        return False  # an added unit, resource, target or argument the rule did not name
    return all(
        part.literal[i] and plain_operand_problem(part.values[i], workspace) is None for i in extra
    )


def _changes_context(part: _Part) -> bool:
    """`cd`, `export`, `alias`, …: the parts after it run in a context no rule named."""
    if not part.words:
        return True  # a bare assignment sets a variable for what follows
    if not part.literal[0]:
        return True
    # `builtin cd /etc` and `command cd /etc` reach the same builtins.
    return program_name(part.values[0]) in CONTEXT_BUILTINS | {"builtin", "command"}


@dataclass
class _Rules:
    exact: set[str] = field(default_factory=set)
    prefixes: list[_Part] = field(default_factory=list)


def usable_rules(rules: Sequence[RuleLike]) -> _Rules:
    """The rules, normalized (parsed: build once for many commands); a stored prefix
    rule today's checks refuse covers nothing (it may predate them, or have been
    written to the store by hand)."""
    out = _Rules()
    for rule in rules:
        kind = getattr(rule, "kind", None)
        pattern = getattr(rule, "pattern", None)
        if not isinstance(pattern, str) or not pattern.strip():
            continue
        if kind == "exact":
            if _parse(pattern) is not None:
                out.exact.add(normalize_command(pattern))
        elif kind == "prefix":
            part = _prefix_part(pattern)
            if part is not None and _prefix_refusal(part) is None:
                out.prefixes.append(part)
    return out


# --------------------------------------------------------------------------
# The index: rules parsed once, commands looked up by key
# --------------------------------------------------------------------------


def _digest(tag: bytes, text: str) -> str:
    # JSON (ASCII) keeps any text encodable, lone surrogates included.
    return hashlib.blake2b(tag + json.dumps(text).encode(), digest_size=16).hexdigest()


def exact_key(normalized: str) -> str:
    """The match key of an exact rule for this normalized command."""
    return "e" + _digest(b"exact\x00", normalized)


def prefix_keys(words: Sequence[str]) -> list[str]:
    """The match keys of the word-prefixes of `words`: the k-th is the key a prefix
    rule of exactly `words[:k+1]` has. One pass (the hash is extended word by word),
    so a long part costs its length, not its length squared."""
    h = hashlib.blake2b(b"prefix\x00", digest_size=16)
    keys = []
    for word in words:
        h.update(json.dumps(word).encode() + b"\x00")  # JSON never holds a raw NUL
        keys.append("p" + h.copy().hexdigest())
    return keys


@dataclass(frozen=True)
class CompiledRule:
    """What matching needs of one rule, computed when the rule is made and stored
    with it (the store's `RuleKeys`)."""

    normalized: str  # the pattern, normalized
    program: str | None  # the program a prefix rule names (its first word's name)
    match_key: str | None  # None: the rule can cover nothing (it never matches)
    words: int  # a prefix rule's number of words (0 for an exact rule)
    parsed: str | None  # a prefix rule's one part, as JSON (`_part_from_json`)


def _part_json(part: _Part) -> str:
    return json.dumps(
        {
            "text": part.text,
            "words": part.words,
            "values": part.values,
            "literal": part.literal,
            "assignments": part.assignments,
            "redirects": part.redirects,
            "first_subst": part.first_subst,
        }
    )


def _part_from_json(text: str) -> _Part | None:
    try:
        data = json.loads(text)
        part = _Part(
            text=str(data["text"]),
            words=[str(w) for w in data["words"]],
            values=[str(v) for v in data["values"]],
            literal=[bool(b) for b in data["literal"]],
            assignments=[str(a) for a in data["assignments"]],
            redirects=[str(r) for r in data["redirects"]],
            first_subst=data["first_subst"] if isinstance(data["first_subst"], int) else None,
        )
    except (ValueError, TypeError, KeyError):
        return None  # damaged by hand: covers nothing
    if not part.words or not (len(part.words) == len(part.values) == len(part.literal)):
        return None
    return part


def compile_rule(kind: str, pattern: str) -> CompiledRule:
    """Parse a rule once, for the store. Never raises: a rule that cannot cover
    anything (unparseable, not one simple command) gets no match key."""
    try:
        return _compile(kind, pattern)
    except Exception:
        # One odd stored pattern must not fail every later check: it covers nothing.
        return CompiledRule(_collapse(str(pattern)), None, None, 0, None)


def _compile(kind: str, pattern: str) -> CompiledRule:
    if not isinstance(pattern, str) or not pattern.strip():
        return CompiledRule(str(pattern), None, None, 0, None)
    normalized = normalize_command(pattern)
    if kind == "exact":
        if _parse(pattern) is None:
            return CompiledRule(normalized, None, None, 0, None)
        parts = _split_parts(pattern)
        first = parts[0] if parts and parts[0].words and parts[0].literal[0] else None
        program = program_name(first.values[0]) if first is not None else None
        return CompiledRule(normalized, program, exact_key(normalized), 0, None)
    if kind == "prefix":
        part = _prefix_part(pattern)
        if part is None or not part.literal[0]:
            return CompiledRule(normalized, None, None, 0, None)
        # Whether today's checks refuse it is asked at each match (they may have
        # grown since it was made); that reads only the stored words.
        return CompiledRule(
            normalized,
            program_name(part.values[0]),
            prefix_keys(part.words)[-1],
            len(part.words),
            _part_json(part),
        )
    return CompiledRule(normalized, None, None, 0, None)


class StoredRuleLike(Protocol):
    kind: str
    normalized: str | None
    parsed: str | None


def usable_from_compiled(rules: Iterable[StoredRuleLike]) -> _Rules:
    """The rules a lookup returned, from their stored parsed form (no parsing)."""
    out = _Rules()
    for rule in rules:
        if rule.kind == "exact" and rule.normalized is not None:
            out.exact.add(rule.normalized)
        elif rule.kind == "prefix" and rule.parsed is not None:
            part = _part_from_json(rule.parsed)
            if part is not None and _prefix_refusal(part) is None:
                out.prefixes.append(part)
    return out


@dataclass
class CommandLookup:
    """A command parsed once for a check: the keys to look up, then the decision."""

    command: str
    normalized: str
    parts: list[_Part] | None  # None: not a plain list/pipeline (loops, groups, …)
    part_normalized: list[str] = field(default_factory=list)

    def programs(self) -> set[str]:
        """The programs whose prefix rules could cover a part."""
        return {program_name(p.values[0]) for p in self.parts or () if p.words and p.literal[0]}

    def keys(self, longest_prefix: Mapping[str, int]) -> list[str]:
        """Every match key a covering rule could have. `longest_prefix`: per program,
        the most words any of its prefix rules has (0 or missing: none)."""
        keys = {exact_key(self.normalized)}
        for part, normalized in zip(self.parts or (), self.part_normalized, strict=True):
            keys.add(exact_key(normalized))
            if part.words and part.literal[0]:
                n = longest_prefix.get(program_name(part.values[0]), 0)
                if n > 0:
                    keys.update(prefix_keys(part.words[:n]))
        return sorted(keys)

    def covered_by(self, usable: _Rules, workspace: str | os.PathLike[str] | None) -> bool:
        """Whether these rules allow the command forever (blocked: never)."""
        if not usable.exact and not usable.prefixes:
            return False
        if classify(self.command).blocked:
            return False
        if self.normalized in usable.exact:
            return True  # the whole command, exactly as a rule names it (with its `cd`)
        if not self.parts:
            return False
        uncovered: list[_Part] = []
        covered_any = False
        context_changed = False
        for part, normalized in zip(self.parts, self.part_normalized, strict=True):
            if (
                not context_changed
                and not part.piped_in
                and part.words
                and _part_covered(part, normalized, usable, workspace)
            ):
                covered_any = True
                continue
            uncovered.append(part)
            context_changed = context_changed or _changes_context(part)
        if not covered_any:
            return False  # nothing a rule names: the classifier already asked for approval
        if not uncovered:
            return True
        # The rest is judged together, in order, so the classifier follows its `cd`s.
        rest = classify(" ; ".join(p.text for p in uncovered))
        return not (rest.blocked or rest.requires_approval)

    def names(self, usable: _Rules, workspace: str | os.PathLike[str] | None) -> bool:
        """Whether these rules name the whole command or one of its parts (which rules
        took part in allowing it, for counting their use)."""
        if self.normalized in usable.exact:
            return True
        return any(
            part.words and _part_covered(part, normalized, usable, workspace)
            for part, normalized in zip(self.parts or (), self.part_normalized, strict=True)
        )


def lookup_command(command: str) -> CommandLookup | None:
    """Parse a command for a check; None when no rule can cover it (empty, too long,
    unparseable: what cannot be parsed cannot be shown to be what a rule named)."""
    if not isinstance(command, str) or not command.strip() or len(command) > MAX_COMMAND_CHARS:
        return None
    nodes = _parse(command)
    if nodes is None:
        return None
    # One parse gives both the canonical text and the parts.
    try:
        normalized = " ; ".join(" ".join(_tokens(command, node, None)) for node in nodes)
    except Exception:
        normalized = _collapse(command)
    parts: list[_Part] | None = []
    try:
        for node in nodes:
            _tokens(command, node, parts)
    except Exception:  # _Unsupported, or anything bashlex built that we do not know
        parts = None
    lookup = CommandLookup(command, normalized, parts)
    for part in parts or ():
        # A one-part command is its own part: no second parse.
        lookup.part_normalized.append(
            normalized if part.text == command else normalize_command(part.text)
        )
    return lookup


def rule_covers(
    command: str,
    rules: Sequence[RuleLike],
    workspace: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether the rules allow this command forever. Blocked commands: never.

    `workspace` is the directory the command runs in; the operands a prefix
    rule lets a command add are resolved there. Without it, a prefix covers
    only its own words. (This parses every rule given; the bot checks through
    the store's index instead: `ApprovalService.is_allowed_forever`.)
    """
    lookup = lookup_command(command)
    if lookup is None:
        return False
    return lookup.covered_by(usable_rules(rules), workspace)


def _part_covered(
    part: _Part, normalized: str, usable: _Rules, workspace: str | os.PathLike[str] | None
) -> bool:
    if _changes_context(part):
        return False  # only an exact rule for the whole command names a `cd`
    if normalized in usable.exact:
        return True
    return any(_prefix_covers(part, rule, workspace) for rule in usable.prefixes)
