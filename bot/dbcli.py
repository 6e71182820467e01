"""`ducklm db migrate` and `ducklm db copy`: the schema and the installation's move.

The parser part imports only the standard library (it is built for every
`ducklm --help`); the store is imported when a command runs. The SQL lives in
runtime/store/upgrade.py and runtime/store/copy.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

EXIT_REFUSED = 1
EXIT_NEWER = 2  # a database newer than this DuckLM: the same code as a usage error

COPY_DESCRIPTION = """\
Copy a whole installation from SOURCE to TARGET (each a SQLite file or a
postgresql:// URL), usually SQLite -> PostgreSQL before running several replicas:
every task, event (with its seq and chain hash), approval, rule, schedule,
delivery and inbox row, and the replicas' shared state (the Matrix session
and sync token). Not copied: the replicas' own records and their leases
(they describe processes of SOURCE, all stopped; TARGET's register afresh).

Stop every bot on SOURCE first: a running bot is not supported during the
copy, and a replica heartbeat fresher than DUCKLM_REPLICA_TIMEOUT refuses it.
An older SOURCE is migrated to the current schema first; a newer one is
refused. TARGET (a new SQLite file, or an existing PostgreSQL database) is
brought to the current schema and must hold no DuckLM data. The copy is one
transaction on TARGET: on any failure TARGET keeps no row. Afterwards
the row counts are compared per table and the audit chains verified on
TARGET. Progress goes to stderr, the report to stdout. Exit status: 0 copied,
1 refused or failed (nothing kept in TARGET), 2 a schema newer than this DuckLM."""

MIGRATE_DESCRIPTION = """\
Apply the pending schema migrations to the database (--db, else $DUCKLM_DB)
and exit; `ducklm run` and every other command do this at start anyway, so
this is for upgrading at a time of your choosing (before a rolling deploy of
replicas). A database newer than this DuckLM is refused (exit 2), unchanged."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `db` subcommand and its two actions."""
    db = sub.add_parser("db", help="migrate the schema, or copy an installation to another DB")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    migrate = actions.add_parser(
        "migrate",
        help="apply pending schema migrations and exit",
        description=MIGRATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after the action (`ducklm db migrate --db X`), as the usage reads.
    migrate.add_argument("--db", dest="db_target", help="SQLite file or postgresql:// URL")
    copy = actions.add_parser(
        "copy",
        help="copy every row to an empty database (SQLite -> PostgreSQL); stop the bot first",
        description=COPY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    copy.add_argument("source", metavar="SOURCE", help="SQLite file or postgresql:// URL")
    copy.add_argument("target", metavar="TARGET", help="SQLite file or postgresql:// URL")
    copy.add_argument(
        "--batch-size",
        type=_positive,
        default=1000,
        metavar="ROWS",
        help="rows read per batch (default 1000)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def migrate(target: str) -> int:
    from runtime.store.upgrade import NewerSchema, migrate_database

    try:
        shown, before, after = await migrate_database(target)
    except NewerSchema as exc:
        print(f"Database error: {exc}", file=sys.stderr)
        return EXIT_NEWER
    if before == after:
        print(f"database {shown}: already at v{after}")
    else:
        print(f"database {shown}: schema v{before} -> v{after}")
    return 0


class _Progress:
    """Progress lines on stderr: a table's start, then at most one a second,
    then its end (a big installation takes a while)."""

    EVERY_S = 1.0

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        moment = time.monotonic()
        if done == 0:
            line = f"{table}: copying {total} row(s)"
        elif done >= total:
            line = f"{table}: {done}/{total} copied"
        elif moment - self._last >= self.EVERY_S:
            line = f"{table}: {done}/{total}"
        else:
            return
        self._last = moment
        print(line, file=self._out, flush=True)

    def note(self, sentence: str) -> None:
        print(sentence, file=self._out, flush=True)


async def copy(source: str, target: str, *, batch_rows: int, replica_timeout: float) -> int:
    from runtime.store.copy import copy_database
    from runtime.store.upgrade import CopyRefused, NewerSchema

    progress = _Progress(sys.stderr)
    try:
        report = await copy_database(
            source,
            target,
            replica_timeout=replica_timeout,
            batch_rows=batch_rows,
            progress=progress,
            note=progress.note,
        )
    except CopyRefused as exc:
        print(f"Refused: {exc}", file=sys.stderr)
        return EXIT_NEWER if isinstance(exc, NewerSchema) else EXIT_REFUSED
    print(f"copied {report.source} -> {report.target}")
    if report.source_migrated is not None:
        print("source migrated first: schema v{} -> v{}".format(*report.source_migrated))
    if report.target_migrated is not None:
        print("target schema v{} -> v{}".format(*report.target_migrated))
    for table in report.tables:
        state = "equal" if table.ok else "DIFFER"
        print(
            f"  {table.name}: {table.source_rows} in source, {table.target_rows} in target, {state}"
        )
    audit = report.audit
    if audit is not None:
        state = "verified" if audit.ok else f"{len(audit.failures)} chain(s) do not verify"
        if report.audit_as_source:
            state += ", exactly as in the source (copied as they are)"
        print(f"audit verify on target: {audit.events} events in {audit.chains} chain(s): {state}")
        for failure in audit.failures:
            print(f"  FAILED: {failure.describe()}")
    return 0
