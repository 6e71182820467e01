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

from runtime.tools.shell.options import Opts, getopt, has_flag
from runtime.tools.shell.verdict import Verdict

# A shape gets an option's value and returns why it is not allowed, or None.
Shape = Callable[[str], str | None]
# A language check gets argv and its parsed options, and judges what the
# options and operands say beyond their shapes (a sed script, a find
# expression): None when read-only, else the Verdict that needs approval.
Language = Callable[[Sequence[str], Opts], Verdict | None]


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
    # Resolve `--foll` to `--follow-name`: only for a table that lists every
    # long option the real program has. An allow-list lists only the harmless
    # ones, and getopt_long resolves an abbreviation against the program's own
    # list, so `--foll` may be the forbidden `--follow` (exact or abbreviated).
    long_abbrev: bool = False
    # options taking two words (jq's `--arg NAME VALUE`); the shape judges the second
    pairs: Mapping[str, Shape] = field(default_factory=dict)
    # `-20` means this option with the value 20 (`head -20` is `head -n 20`)
    numeric: str | None = None
    numbers_are_operands: bool = False  # `seq -5 5`
    lenient: bool = False  # unknown options are printed, not parsed (`echo -x`)
    # exact words read as another option (xxd's `-cols` is `-c`)
    aliases: Mapping[str, str] = field(default_factory=dict)
    # Whether a glob operand may be left unguarded by `--`: true only when no
    # option of the real program (listed or not) can write, run a program or
    # reach the network, so a file named like an option does no harm.
    glob_safe: bool = False
    # Whether `--` ends the options: a glob after it cannot become one. Not so
    # for find (its expression follows) or test (`--` is a string to it).
    honours_dashes: bool = True
    language: Language | None = None
    # Options left out on purpose, with the verdict that says why (`sed -i`
    # writes): only the reason and risk of the approval, never a permission.
    dangers: Mapping[str, Verdict] = field(default_factory=dict)


def spec(
    flags: str = "",
    values: Mapping[str, Shape] | None = None,
    *,
    optional: Mapping[str, Shape] | None = None,
    max_operands: int | None = None,
    operand: Shape | None = None,
    stop_at_positional: bool = False,
    long_abbrev: bool = False,
    pairs: Mapping[str, Shape] | None = None,
    numeric: str | None = None,
    numbers_are_operands: bool = False,
    lenient: bool = False,
    aliases: Mapping[str, str] | None = None,
    glob_safe: bool = False,
    honours_dashes: bool = True,
    language: Language | None = None,
    dangers: Mapping[str, Verdict] | None = None,
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
        pairs=dict(pairs or {}),
        numeric=numeric,
        numbers_are_operands=numbers_are_operands,
        lenient=lenient,
        aliases=dict(aliases or {}),
        glob_safe=glob_safe,
        honours_dashes=honours_dashes,
        language=language,
        dangers=dict(dangers or {}),
    )


def with_values(shape: Shape, names: str) -> dict[str, Shape]:
    """`{"-n": NUM, "--lines": NUM}` written as `with_values(NUM, "-n --lines")`."""
    return {name: shape for name in names.split()}


def normalize(s: Spec, argv: Sequence[str]) -> list[str]:
    """argv with the spec's aliases and numeric options (`-20`) spelled the ordinary way.

    Indices stay the same (one word in, one word out), so `Opts.positionals`
    still point into the caller's argv.
    """
    if not s.aliases and s.numeric is None:
        return list(argv)
    out = [argv[0]] if argv else []
    done = False
    for word in argv[1:]:
        if not done and word == "--":
            done = True
        elif not done and word in s.aliases:
            word = s.aliases[word]
        elif not done and s.numeric and _NUMERIC.fullmatch(word):
            word = s.numeric + ("=" if s.numeric.startswith("--") else "") + word[1:]
        out.append(word)
    return out


_NUMERIC = re.compile(r"-[0-9]+")


def parse(s: Spec, argv: Sequence[str]) -> Opts:
    """argv parsed against the spec (unknown options set `error`)."""
    return getopt(
        normalize(s, argv),
        flags=s.flags,
        values=tuple(s.values),
        optional=tuple(s.optional),
        stop_at_positional=s.stop_at_positional,
        long_abbrev=s.long_abbrev,
        pairs=tuple(s.pairs),
        numbers_are_operands=s.numbers_are_operands,
        lenient=s.lenient,
    )


def check(name: str, s: Spec, argv: Sequence[str]) -> str | None:
    """Why this call of `name` is outside its allow-list, or None when every part is listed."""
    return _check_parsed(name, s, argv, parse(s, argv))


def judge(name: str, s: Spec, argv: Sequence[str]) -> Verdict | None:
    """The allow-list and the spec's language check together: None when read-only.

    An option outside the list needs approval as a `medium` unknown: it may be
    harmless, but nobody has looked at it.
    """
    opts = parse(s, argv)
    problem = _check_parsed(name, s, argv, opts)
    if problem:
        for option, verdict in s.dangers.items():
            long = option.startswith("--")
            if has_flag(argv, "" if long else option[1:], {option} if long else set()):
                return verdict
        return Verdict(
            "unknown", "medium", f"{problem[:1].upper()}{problem[1:]}; it needs approval."
        )
    if s.language is not None:
        return s.language(argv, opts)
    return None


def _check_parsed(name: str, s: Spec, argv: Sequence[str], opts: Opts) -> str | None:
    if opts.error:
        return f"`{name}` with an {opts.error}"
    for option, value in opts.options:
        shape = s.values.get(option) or s.optional.get(option) or s.pairs.get(option)
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
