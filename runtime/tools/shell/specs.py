"""Option allow-lists: which options a read-only program may get, and the shape of their values.

Every program that may run without approval has a `Spec`: the options known
to be harmless, each value-taking one with a `Shape` that its value must have.
Anything else (an option nobody listed, a value of the wrong shape, too many
operands) means approval. This is the opposite of a deny-list on purpose: a
new or forgotten option of a well-known tool (`-o` naming a program, a
`--server` that sends the token elsewhere) is then a question for a person,
not a hole.

Parsing is `options.getopt`, which resolves abbreviations of long options and
`=`/glued forms the way getopt_long does before anything is checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from runtime.tools.shell.options import getopt

# A shape gets an option's value and returns why it is not allowed, or None.
Shape = Callable[[str], str | None]


@dataclass(frozen=True)
class Spec:
    """The allow-list of one read-only program."""

    flags: tuple[str, ...] = ()
    values: Mapping[str, Shape] = field(default_factory=dict)
    # long options that take a value only as `--name=value`
    optional: Mapping[str, Shape] = field(default_factory=dict)
    max_operands: int | None = None
    operand: Shape | None = None  # every operand must have this shape (None: any word)
    stop_at_positional: bool = False
    long_abbrev: bool = True


def spec(
    flags: str = "",
    values: Mapping[str, Shape] | None = None,
    *,
    optional: Mapping[str, Shape] | None = None,
    max_operands: int | None = None,
    operand: Shape | None = None,
    stop_at_positional: bool = False,
    long_abbrev: bool = True,
) -> Spec:
    """A `Spec` with its flags written as one string: `spec("-a -l --all", {"-n": NUM})`."""
    return Spec(
        flags=tuple(flags.split()),
        values=dict(values or {}),
        optional=dict(optional or {}),
        max_operands=max_operands,
        operand=operand,
        stop_at_positional=stop_at_positional,
        long_abbrev=long_abbrev,
    )


def with_values(shape: Shape, names: str) -> dict[str, Shape]:
    """`{"-n": NUM, "--lines": NUM}` written as `with_values(NUM, "-n --lines")`."""
    return {name: shape for name in names.split()}


def check(name: str, s: Spec, argv: Sequence[str]) -> str | None:
    """Why this call of `name` is outside its allow-list, or None when every part is listed."""
    opts = getopt(
        argv,
        flags=s.flags,
        values=tuple(s.values),
        optional=tuple(s.optional),
        stop_at_positional=s.stop_at_positional,
        long_abbrev=s.long_abbrev,
    )
    if opts.error:
        return f"`{name}` with an {opts.error}"
    for option, value in opts.options:
        shape = s.values.get(option) or s.optional.get(option)
        if shape is None or value is None:
            continue
        problem = shape(value)
        if problem:
            return f"`{name} {option}` {problem}"
    operands = [argv[i] for i in opts.positionals]
    if s.max_operands is not None and len(operands) > s.max_operands:
        return f"`{name}` takes at most {s.max_operands} operand(s) here"
    if s.operand is not None:
        for word in operands:
            problem = s.operand(word)
            if problem:
                return f"`{name}` operand `{word}` {problem}"
    return None


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def ANY(value: str) -> str | None:  # read as a constant in tables
    """Any text that the program treats as data (a pattern, a label), never a path or program.

    Secret paths in it are still caught by the analyser's secret check.
    """
    return None


def matches(pattern: str, what: str) -> Shape:
    """A value that fully matches a regular expression; `what` says what was expected."""
    compiled = re.compile(pattern)

    def shape(value: str) -> str | None:
        return None if compiled.fullmatch(value) else f"needs {what}, not `{value}`"

    return shape


def choice(*words: str) -> Shape:
    """One of a few fixed words."""
    allowed = frozenset(words)

    def shape(value: str) -> str | None:
        return None if value in allowed else f"takes one of {', '.join(sorted(allowed))}"

    return shape


def list_of(item: Shape, sep: str = ",") -> Shape:
    """A `sep`-separated list whose every item has the shape `item`."""

    def shape(value: str) -> str | None:
        for part in value.split(sep):
            problem = item(part)
            if problem:
                return problem
        return None

    return shape


NUM = matches(r"[+-]?[0-9]+", "a whole number")
# sizes and counts with a unit suffix: 10, 10K, 1.5M, 20%
SIZE = matches(r"[+-]?[0-9]+(\.[0-9]+)?[A-Za-z%]{0,3}", "a number (with an optional unit)")
NAME = matches(r"[A-Za-z0-9_.:@%+=/-]{1,256}", "a plain name")
