"""Words: one argument of a simple command and what the shell will do to it.

An `Arg` records whether a word is literal or is globbed, brace-expanded,
parameter-expanded, substituted or tilde-expanded, so the analyser can tell
a word it knows from one only known at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from runtime.tools.shell.paths import _has_glob


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


def _starts_brace_expansion(raw: str, i: int) -> bool:
    """Whether the unquoted `{` at `raw[i]` starts a brace expansion.

    bash expands only `{a,b}` and `{x..y}`; `stash@{0}`, `{}` and an unclosed
    `{` stay literal. Quotes or expansions inside the braces are not worth
    modelling: they count as an expansion (approval).
    """
    depth = 0
    for j in range(i, len(raw)):
        c = raw[j]
        if c in "'\"\\$`":
            return True
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                body = raw[i + 1 : j]
                return "," in body or ".." in body or "{" in body
    return False


class _Scan(NamedTuple):
    """What the shell does to a raw word, read from its unquoted and
    double-quoted parts (single quotes and backslashes make text literal)."""

    glob: bool  # unquoted * ? [
    brace: bool  # an unquoted { that starts a brace expansion
    expand: bool  # $ or ` outside single quotes
    literal: bool  # none of those, nor ~ # or any unquoted {, and every quote closed


def _scan(raw: str) -> _Scan:
    glob = brace = expand = special = False
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
                special = True
                brace = brace or _starts_brace_expansion(raw, i)
            elif c in "$`":
                expand = True
                if raw[i + 1 : i + 2] == "{":  # ${NAME}: a parameter, not brace expansion
                    end = raw.find("}", i)
                    i = end + 1 if end > 0 else len(raw)
                    continue
            elif c in "~#":
                special = True
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
    # A ${…} skip does not follow quotes, so the final quote state is only
    # trusted with no special character seen (and then nothing was skipped).
    literal = not (glob or expand or special) and quote is None
    return _Scan(glob, brace, expand, literal)


def _raw_features(raw: str) -> tuple[bool, bool, bool]:
    """(glob, brace, expand) for the unquoted/double-quoted parts of a raw word."""
    scan = _scan(raw)
    return scan.glob, scan.brace, scan.expand


def _literal(raw: str) -> bool:
    """A raw word whose meaning is its quote-removed text (no expansion at all)."""
    return _scan(raw).literal


_PLAIN_PARAM = re.compile(r"[A-Za-z][A-Za-z0-9_]*|_[A-Za-z0-9_]+")
