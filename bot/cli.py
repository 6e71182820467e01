"""`ducklm`: the command-line entry point.

Start-up time is part of the interface: `ducklm --help` and the read-only
subcommands should answer about as fast as Python starts. So this module
imports only the standard library at the top. Everything else is imported
where a subcommand needs it: the settings after the arguments parsed, the
stores alone (no runtime loop, so no shell parser and no model client) for
`tasks`, `events`, `approvals` and `rules`, the whole runtime for `console`,
and the platform libraries only in `ducklm run` (bot/server.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot import commands as c
    from bot.policy import Actor
    from runtime.factory import Runtime
    from runtime.settings import Settings
    from runtime.store import Stores

EXIT_USAGE = 2

NO_PLATFORM = """\
No chat platform is configured, so there is nothing for `ducklm run` to serve.
  Slack (Socket Mode): set SLACK_BOT_TOKEN and SLACK_APP_TOKEN
  Slack (HTTP):        set SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET and DUCKLM_SLACK_MODE=http
  Matrix:              set MATRIX_HOMESERVER, MATRIX_USER_ID and MATRIX_PASSWORD
                       (or MATRIX_ACCESS_TOKEN)
To try DuckLM without a chat account, run `ducklm console`."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ducklm",
        description="DuckLM chat-ops bot. Configuration comes from DUCKLM_* environment "
        "variables or a .env file (see README).",
    )
    parser.add_argument(
        "--db", help="SQLite file or postgresql:// URL (default: $DUCKLM_DB or ducklm.db)"
    )
    parser.add_argument(
        "--workspace", type=Path, help="where tools run (default: $DUCKLM_WORKSPACE or cwd)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("console", help="chat with the agent in this terminal")
    sub.add_parser("run", help="serve every configured chat platform (Slack, Matrix)")

    tasks = sub.add_parser("tasks", help="list recent tasks")
    tasks.add_argument("--limit", type=int, default=20)
    tasks.add_argument("--conversation", help="only tasks whose conversation starts with this")

    events = sub.add_parser("events", help="a task's audit trail")
    events.add_argument("task_id")
    events.add_argument("--json", action="store_true", help="one JSON object per event")

    sub.add_parser("approvals", help="list pending approvals")

    policy = sub.add_parser("policy", help="the per-channel policy file (DUCKLM_POLICY_FILE)")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    policy_check = policy_sub.add_parser("check", help="validate a policy file without starting")
    policy_check.add_argument("file", type=Path)

    rules = sub.add_parser(
        "rules", help="list, add, preview, review or revoke 'always allow' rules"
    )
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    listing = rules_sub.add_parser("list", help="list rules")
    listing.add_argument("--all", action="store_true", help="include revoked rules")
    add = rules_sub.add_parser("add", help="add a rule")
    add.add_argument("kind", choices=["exact", "prefix"])
    add.add_argument(
        "pattern",
        nargs=argparse.REMAINDER,
        help="the command (exact) or its first words (prefix); quote it or give it last",
    )
    add.add_argument("--for", dest="lifetime", help="expire after this long (7d, 12h)")
    add.add_argument("--channel", help="limit it to one channel (slack:C123); default: global")
    preview = rules_sub.add_parser("preview", help="past commands a rule would have allowed")
    preview.add_argument("kind", choices=["exact", "prefix"])
    preview.add_argument("pattern", nargs=argparse.REMAINDER)
    rules_sub.add_parser("review", help="idle rules, rules that allowed a failure or a denial")
    revoke = rules_sub.add_parser("revoke", help="revoke a rule")
    revoke.add_argument("rule_id")

    matrix = sub.add_parser("matrix", help="Matrix maintenance")
    matrix_sub = matrix.add_subparsers(dest="matrix_command", required=True, metavar="ACTION")
    matrix_sub.add_parser(
        "reset-crypto",
        help="start encryption over: new device, new keys (stop the bot first)",
    )
    audit = sub.add_parser("audit", help="verify or export the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    check = audit_sub.add_parser("verify", help="recompute the hash chains (all, or one task's)")
    check.add_argument("task_id", nargs="?")
    export = audit_sub.add_parser("export", help="one record per action, to stdout")
    export.add_argument("--since", required=True, help="date or ISO time (UTC unless given)")
    export.add_argument("--until", help="date or ISO time, exclusive (default: now)")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    from bot import dbcli  # the standard library only, like this module

    dbcli.add_parser(sub)
    return parser


def _timestamp(text: str) -> float:
    """A --since/--until value: '2026-12-01' or an ISO time; naive means UTC."""
    from datetime import UTC, datetime

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"ducklm audit export: not a date or ISO time: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


async def _audit_verify(stores: Stores, task_id: str | None) -> int:
    from runtime.store.audit import verify

    if task_id is not None and await stores.tasks.get_task(task_id) is None:
        print(f"No task {task_id}.", file=sys.stderr)
        return 1
    result = await verify(stores.db, task_id)
    for failure in result.failures:
        print(f"FAILED: {failure.describe()}")
    state = "verified" if result.ok else f"{len(result.failures)} chain(s) do not verify"
    head = f"; head {result.head}" if task_id is not None and result.head else ""
    print(f"{result.events} events in {result.chains} chain(s): {state}{head}")
    return 0 if result.ok else 1


async def _audit_export(stores: Stores, since: float, until: float | None, fmt: str) -> int:
    from runtime.store.audit import csv_header, export_actions, to_csv, to_jsonl

    out = sys.stdout
    if fmt == "csv":
        out.write(csv_header())
    write = to_csv if fmt == "csv" else to_jsonl
    async for record in export_actions(stores.db, since, until):
        out.write(write(record))
    out.flush()
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    from runtime.settings import Settings

    overrides = {}
    if args.db is not None:
        overrides["db"] = args.db
    if args.workspace is not None:
        overrides["workspace"] = args.workspace
    return Settings(**overrides)


def _operator() -> Actor:
    from bot.policy import Actor

    user = os.environ.get("USER") or "operator"
    return Actor(f"cli:{user}", is_admin=True, is_approver=True)


async def _with_runtime(
    settings: Settings, body: Callable[[Runtime], Awaitable[int]], *, mcp: bool = False
) -> int:
    from runtime.factory import build_runtime

    # MCP servers only start for the console: `ducklm tasks` and friends read the store.
    runtime = await build_runtime(settings, mcp=mcp)
    try:
        return await body(runtime)
    finally:
        await runtime.close()


async def _with_stores(settings: Settings, body: Callable[[Stores], Awaitable[int]]) -> int:
    """The store alone, for subcommands that read or manage it: no runtime loop,
    so neither the shell parser nor the model client is imported."""
    from runtime.store import open_stores

    stores = await open_stores(settings.db)
    try:
        return await body(stores)
    finally:
        await stores.close()


def _sandbox_notice(settings: Settings) -> None:
    """One line at start when unasked commands cannot be (or are not) sandboxed."""
    # Here, not at the top: it loads the shell tool, which only `run` and `console` use.
    from runtime.tools.shell.sandbox import SandboxConfig, sandbox_notice

    notice = sandbox_notice(SandboxConfig.from_settings(settings))
    if notice:
        print(notice, file=sys.stderr)


async def _console(runtime: Runtime) -> int:
    from bot.console.terminal import Console

    _sandbox_notice(runtime.settings)
    for line in runtime.startup_notices():  # one line per MCP server
        print(line, file=sys.stderr)
    from runtime.replica import serving

    # A replica like `ducklm run`'s: the console's running tasks are its own, and a
    # bot sharing the database reports them interrupted only if the console dies.
    async with serving(runtime):
        if runtime.settings.metrics_port is None:
            return await Console(runtime).serve()
        from bot.backend import PlatformStartError
        from bot.health import own_port  # only then: aiohttp's server is not free to import

        try:
            async with own_port(runtime):  # /healthz, /readyz, /metrics on DUCKLM_METRICS_PORT
                return await Console(runtime).serve()
        except PlatformStartError as exc:  # the port is taken
            print(f"ducklm: {exc}", file=sys.stderr)
            return 1


async def _admin(stores: Stores, settings: Settings, command: c.Command, **kwargs: object) -> int:
    from bot.admin import CommandRunner
    from runtime.approvals import ApprovalService

    approvals = ApprovalService.from_stores(
        stores, ttl=settings.approval_ttl, rule_max_age=settings.rule_max_age
    )
    runner = CommandRunner(
        stores.tasks,
        stores.events,
        approvals,
        stores.schedules,
        timezone=settings.timezone,
        rule_idle_days=settings.rule_idle_days,
        workspace=str(settings.workspace),
        rules_listed=None,  # a terminal lists every rule
    )
    print(await runner.execute(command, _operator(), **kwargs))  # type: ignore[arg-type]
    return 0


async def _rules_add(
    stores: Stores, settings: Settings, args: argparse.Namespace, pattern: str
) -> int:
    from bot import commands as c
    from runtime.settings import parse_duration

    try:
        lifetime = None if args.lifetime is None else parse_duration(args.lifetime)
    except ValueError as exc:
        print(f"ducklm rules add --for: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The operator at a terminal has seen the preview options; no confirmation step.
    command = c.RulesAdd(args.kind, pattern, lifetime=lifetime, confirmed=True)
    prefix = f"{args.channel}|" if args.channel else None
    return await _admin(stores, settings, command, conversation_prefix=prefix)


async def _events(stores: Stores, task_id: str, as_json: bool) -> int:
    import json

    from bot.admin import describe_event

    if await stores.tasks.get_task(task_id) is None:
        print(f"No task {task_id}.", file=sys.stderr)
        return 1
    for event in await stores.events.list_events(task_id):
        if as_json:
            print(json.dumps(event.model_dump(mode="json"), ensure_ascii=False))
        else:
            print(describe_event(event))
    return 0


def _serve_platforms(settings: Settings) -> int:
    if not (settings.slack_configured or settings.matrix_configured):
        print(NO_PLATFORM, file=sys.stderr)
        return EXIT_USAGE
    _sandbox_notice(settings)
    import asyncio

    from bot.server import serve
    from runtime.store import StoreError

    try:
        return asyncio.run(serve(settings))
    except StoreError as exc:
        print(f"Database error: {exc}", file=sys.stderr)
        return 1


def _policy_check(path: Path) -> int:
    """`ducklm policy check FILE`: a summary (exit 0) or every error (exit 2)."""
    from bot.policy_file import PolicyFileError, load_policy_file

    try:
        found = load_policy_file(path)
    except PolicyFileError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(found.summary()))
    return 0


def _policy_ok(settings: Settings) -> bool:
    """DUCKLM_POLICY_FILE, when set, is valid; else its errors are on stderr."""
    if settings.policy_file is None:
        return True
    from bot.policy_file import PolicyFileError, load_policy_file

    try:
        load_policy_file(settings.policy_file)
    except PolicyFileError as exc:
        print("Policy file error (DUCKLM_POLICY_FILE), not starting:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Only now: `--help` and usage errors have exited already without them.
    import logging

    from pydantic import ValidationError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "policy":  # the file alone: no settings, no store
        return _policy_check(args.file)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"Configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    # The bot must not start on rights it cannot read (issue #20).
    if args.command in ("run", "console") and not _policy_ok(settings):
        return EXIT_USAGE

    if args.command == "run":
        return _serve_platforms(settings)
    if args.command == "console":
        return _run(_with_runtime(settings, _console, mcp=True))
    if args.command == "matrix":
        return _run(_matrix_reset_crypto(settings))
    if args.command == "db":
        return _db(args, settings)

    from bot import commands as c

    async def body(stores: Stores) -> int:
        match args.command:
            case "tasks":
                recent = await stores.tasks.list_recent(
                    args.limit, conversation_prefix=args.conversation
                )
                from bot.admin import describe_task

                print("\n".join(describe_task(t) for t in recent) or "No tasks yet.")
                return 0
            case "events":
                return await _events(stores, args.task_id, args.json)
            case "approvals":
                return await _admin(stores, settings, c.Approvals())
            case "audit":
                if args.audit_command == "verify":
                    return await _audit_verify(stores, args.task_id)
                until = None if args.until is None else _timestamp(args.until)
                return await _audit_export(stores, _timestamp(args.since), until, args.format)
            case "rules":
                if args.rules_command == "add":
                    pattern = " ".join(args.pattern).strip()
                    if not pattern:
                        print("Usage: ducklm rules add exact|prefix COMMAND", file=sys.stderr)
                        return EXIT_USAGE
                    return await _rules_add(stores, settings, args, pattern)
                if args.rules_command == "preview":
                    pattern = " ".join(args.pattern).strip()
                    if not pattern:
                        print("Usage: ducklm rules preview exact|prefix COMMAND", file=sys.stderr)
                        return EXIT_USAGE
                    return await _admin(stores, settings, c.RulesPreview(args.kind, pattern))
                if args.rules_command == "review":
                    return await _admin(stores, settings, c.RulesReview())
                if args.rules_command == "revoke":
                    return await _admin(stores, settings, c.RulesRevoke(args.rule_id))
                include = bool(getattr(args, "all", False))
                return await _admin(stores, settings, c.RulesList(include_revoked=include))
        raise AssertionError(args.command)

    return _run(_with_stores(settings, body))


def _db(args: argparse.Namespace, settings: Settings) -> int:
    """`ducklm db migrate|copy`: they open the databases themselves (without
    migrating first), so not through _with_stores."""
    from bot import dbcli

    if args.db_command == "migrate":
        target = args.db_target if args.db_target is not None else settings.db
        return _run(dbcli.migrate(str(target)))
    return _run(
        dbcli.copy(
            args.source,
            args.target,
            batch_rows=args.batch_size,
            replica_timeout=settings.replica_timeout,
        )
    )


async def _matrix_reset_crypto(settings: Settings) -> int:
    from bot.matrix.reset import reset_crypto

    if not settings.matrix_configured:
        print("Set MATRIX_HOMESERVER and MATRIX_USER_ID first.", file=sys.stderr)
        return EXIT_USAGE
    for line in await reset_crypto(settings):
        print(line)
    return 0


def _run(job: Coroutine[Any, Any, int]) -> int:
    """Run a subcommand's coroutine; a store problem is one line, not a traceback."""
    import asyncio

    from runtime.store import StoreError

    try:
        return asyncio.run(job)
    except StoreError as exc:
        print(f"Database error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
