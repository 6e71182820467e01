"""Option parsing, GNU style and conservative.

`getopt` parses options the way getopt_long does and refuses what it does not
know, so an option the classifier has never seen leads to approval rather
than to a guess. `has_flag` answers "could this argv contain that option",
counting abbreviations and bundles. `_opts` writes option tables (and other
word lists) as one string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field


def _opts(text: str) -> tuple[str, ...]:
    """Option tables written as one string: "-a --all -b"."""
    return tuple(text.split())


@dataclass
class Opts:
    options: list[tuple[str, str | None]] = field(default_factory=list)
    positionals: list[int] = field(default_factory=list)  # indices into argv
    error: str | None = None

    def has(self, *names: str) -> bool:
        return any(name in names for name, _ in self.options)

    def values(self, *names: str) -> list[str]:
        return [v for n, v in self.options if n in names and v is not None]


def getopt(
    argv: Sequence[str],
    start: int = 1,
    *,
    flags: Sequence[str] = (),
    values: Sequence[str] = (),
    optional: Sequence[str] = (),
    stop_at_positional: bool = False,
    long_abbrev: bool = False,
    pairs: Sequence[str] = (),
    numbers_are_operands: bool = False,
    lenient: bool = False,
) -> Opts:
    """Parse options the way getopt_long does, refusing what it does not know.

    `flags` take no value, `values` take one (`-n5`, `-n 5`, `--lines=5`,
    `--lines 5`), `optional` long options take a value only as `--x=v`. Any
    unknown option sets `error`: the caller then asks for approval.

    Abbreviations (`--lin` for `--lines`) are resolved only with
    `long_abbrev`, and only when the tables passed are the program's complete
    long-option list: getopt_long prefers an exact match and resolves a prefix
    against *all* the program's options, so resolving it against an
    allow-list alone could read a forbidden option as an allowed one. An exact
    match always wins; an ambiguous prefix is an error.

    `pairs` take two words (jq's `--arg NAME VALUE`; the value is recorded as
    "NAME VALUE"'s second word, the name is dropped). `numbers_are_operands`
    reads `-5` as a number (`seq -5 5`); `lenient` reads an unknown option as
    an operand, for programs that print such words instead of parsing them
    (`echo -x`).
    """
    known_long = [o for o in (*flags, *values, *optional, *pairs) if o.startswith("--")]
    flag_set, value_set, optional_set = set(flags), set(values), set(optional)
    pair_set = set(pairs)
    out = Opts()
    i = start
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.positionals.extend(range(i + 1, len(argv)))
            break
        if numbers_are_operands and _NUMBER.fullmatch(arg):
            out.positionals.append(i)
            i += 1
            continue
        if arg in pair_set:
            if i + 2 >= len(argv):
                out.error = f"option {arg} needs two values"
                return out
            out.options.append((arg, argv[i + 2]))
            i += 3
            continue
        if lenient and not _known(arg, known_long, flag_set, value_set, optional_set):
            if stop_at_positional:
                out.positionals.extend(range(i, len(argv)))
                break
            out.positionals.append(i)
            i += 1
            continue
        if arg.startswith("--"):
            name, eq, val = arg.partition("=")
            if name not in known_long and long_abbrev:
                matches = [o for o in known_long if o.startswith(name)]
                if len(matches) > 1:
                    out.error = f"ambiguous option `{name}`"
                    return out
                if matches:
                    name = matches[0]
            if name in value_set:
                if eq:
                    out.options.append((name, val))
                elif i + 1 < len(argv):
                    out.options.append((name, argv[i + 1]))
                    i += 1
                else:
                    out.error = f"option {name} needs a value"
                    return out
            elif name in optional_set:
                out.options.append((name, val if eq else None))
            elif name in flag_set and not eq:
                out.options.append((name, None))
            else:
                out.error = f"unknown option `{arg}`"
                return out
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                opt = "-" + arg[j]
                if opt in value_set:
                    rest = arg[j + 1 :]
                    if rest:
                        out.options.append((opt, rest))
                    elif i + 1 < len(argv):
                        out.options.append((opt, argv[i + 1]))
                        i += 1
                    else:
                        out.error = f"option {opt} needs a value"
                        return out
                    break
                if opt in flag_set:
                    out.options.append((opt, None))
                    j += 1
                    continue
                out.error = f"unknown option `{opt}`"
                return out
        else:
            if stop_at_positional:
                out.positionals.extend(range(i, len(argv)))
                break
            out.positionals.append(i)
        i += 1
    return out


_NUMBER = re.compile(r"-[0-9]+(\.[0-9]+)?")


def _known(
    arg: str,
    known_long: Sequence[str],
    flag_set: set[str],
    value_set: set[str],
    optional_set: set[str],
) -> bool:
    """Whether `arg` is wholly made of known options (for `lenient` parsing)."""
    if arg == "-" or not arg.startswith("-"):
        return True  # an operand either way
    if arg.startswith("--"):
        name = arg.partition("=")[0]
        return name in known_long
    for j, letter in enumerate(arg[1:], 1):
        opt = "-" + letter
        if opt in value_set:
            return True
        if opt not in flag_set:
            return False
        if j == len(arg) - 1:
            return True
    return True


def _long_hit(arg: str, longs: frozenset[str] | set[str]) -> bool:
    name = arg.split("=", 1)[0]
    return len(name) > 2 and any(f.startswith(name) for f in longs)


def has_flag(argv: Sequence[str], shorts: str, longs: frozenset[str] | set[str]) -> bool:
    """Conservative: any argument that is, or may be an abbreviation of, a listed option."""
    for arg in argv[1:]:
        if arg.startswith("--"):
            if _long_hit(arg, longs):
                return True
        elif arg.startswith("-") and len(arg) > 1 and any(c in shorts for c in arg[1:]):
            return True
    return False
