"""SQL text shared by both backends, and its translation for PostgreSQL.

Every statement of the store is written once, with `?` placeholders (SQLite's
and the DB-API's style). asyncpg wants `$1 … $n`; `to_postgres` rewrites a
statement once and caches the result (a statement's text is a constant of
the code, or one of a few shapes, so the cache stays small).

What the rewrite touches, outside string literals, quoted identifiers and
comments (a `?` inside `'…'` is data, not a placeholder):
- `?` becomes `$1`, `$2`, … in order;
- `INDEXED BY <index>` (a SQLite planner hint, used where SQLite's planner
  would pick a worse index) is dropped: PostgreSQL has no such syntax, and its
  planner chooses partial indexes from the query's conditions itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

_INDEXED_BY = re.compile(r"\s+INDEXED\s+BY\s+[A-Za-z_][A-Za-z0-9_]*", re.IGNORECASE)
# Large enough for any table, small enough for SQLite's and PostgreSQL's 64-bit
# LIMIT: what "no limit" is bound as (SQLite's -1 is an error on PostgreSQL).
NO_LIMIT = 2**62


@lru_cache(maxsize=2048)
def to_postgres(sql: str) -> str:
    """`sql` with `$n` placeholders for `?` and SQLite-only hints removed."""
    out: list[str] = []
    n = 0
    i = 0
    length = len(sql)
    while i < length:
        char = sql[i]
        if char in ("'", '"'):
            # A literal or a quoted identifier; a doubled quote escapes itself.
            end = i + 1
            while end < length:
                if sql[end] == char:
                    if end + 1 < length and sql[end + 1] == char:
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1])
            i = end + 1
        elif char == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = length if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif char == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = length if end < 0 else end + 2
            out.append(sql[i:end])
            i = end
        elif char == "?":
            n += 1
            out.append(f"${n}")
            i += 1
        else:
            # Copy the run of ordinary characters up to the next special one.
            end = i + 1
            while end < length and sql[end] not in "'\"-/?":
                end += 1
            out.append(_INDEXED_BY.sub("", sql[i:end]))
            i = end
    return "".join(out)


def platform_filter(column: str, platforms: Sequence[str]) -> tuple[str, list[object]]:
    """A condition true when `column` (a conversation key "<platform>:…") belongs
    to one of `platforms`, with its parameters.

    The same text on both backends: `substr(x, 1, n) = 'slack:'` means what
    `substr(x, 1, instr(x, ':') - 1) = 'slack'` did for a platform name without
    a colon, and needs neither SQLite's instr nor PostgreSQL's strpos (nor
    PostgreSQL's refusal of substr's negative length when there is no colon)."""
    if not platforms:
        return "0 = 1", []
    parts: list[str] = []
    params: list[object] = []
    for platform in platforms:
        prefix = f"{platform}:"
        parts.append(f"substr({column}, 1, ?) = ?")
        params += [len(prefix), prefix]
    return "(" + " OR ".join(parts) + ")", params
