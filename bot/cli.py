"""`ducklm`: the command-line entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import ValidationError

from bot import commands as c
from bot.admin import Actor, CommandRunner, describe_event
from runtime.factory import Runtime, build_runtime
from runtime.settings import Settings
from runtime.store import StoreError
from runtime.tools.shell.sandbox import SandboxConfig, sandbox_notice

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
    parser.add_argument("--db", type=Path, help="SQLite file (default: $DUCKLM_DB or ducklm.db)")
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

    rules = sub.add_parser("rules", help="list, add or revoke 'always allow' rules")
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
    revoke = rules_sub.add_parser("revoke", help="revoke a rule")
    revoke.add_argument("rule_id")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if args.db is not None:
        overrides["db"] = args.db
    if args.workspace is not None:
        overrides["workspace"] = args.workspace
    return Settings(**overrides)


def _operator() -> Actor:
    user = os.environ.get("USER") or "operator"
    return Actor(f"cli:{user}", is_admin=True, is_approver=True)


async def _with_runtime(
    settings: Settings, body: Callable[[Runtime], Awaitable[int]], *, mcp: bool = False
) -> int:
    # MCP servers only start for the console: `ducklm tasks` and friends read the store.
    runtime = await build_runtime(settings, mcp=mcp)
    try:
        return await body(runtime)
    finally:
        await runtime.close()


def _sandbox_notice(settings: Settings) -> None:
    """One line at start when unasked commands cannot be (or are not) sandboxed."""
    notice = sandbox_notice(SandboxConfig.from_settings(settings))
    if notice:
        print(notice, file=sys.stderr)


async def _console(runtime: Runtime) -> int:
    from bot.console import Console

    _sandbox_notice(runtime.settings)
    for line in runtime.startup_notices():  # one line per MCP server
        print(line, file=sys.stderr)
    return await Console(runtime).serve()


async def _admin(runtime: Runtime, command: c.Command, **kwargs: object) -> int:
    runner = CommandRunner(
        runtime.stores.tasks,
        runtime.stores.events,
        runtime.approvals,
        runtime.stores.schedules,
        timezone=runtime.settings.timezone,
    )
    print(await runner.execute(command, _operator(), **kwargs))  # type: ignore[arg-type]
    return 0


async def _events(runtime: Runtime, task_id: str, as_json: bool) -> int:
    if await runtime.stores.tasks.get_task(task_id) is None:
        print(f"No task {task_id}.", file=sys.stderr)
        return 1
    for event in await runtime.stores.events.list_events(task_id):
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
    from bot.server import serve

    try:
        return asyncio.run(serve(settings))
    except StoreError as exc:
        print(f"Database error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"Configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.command == "run":
        return _serve_platforms(settings)

    async def body(runtime: Runtime) -> int:
        match args.command:
            case "console":
                return await _console(runtime)
            case "tasks":
                recent = await runtime.stores.tasks.list_recent(
                    args.limit, conversation_prefix=args.conversation
                )
                from bot.admin import describe_task

                print("\n".join(describe_task(t) for t in recent) or "No tasks yet.")
                return 0
            case "events":
                return await _events(runtime, args.task_id, args.json)
            case "approvals":
                return await _admin(runtime, c.Approvals())
            case "rules":
                if args.rules_command == "add":
                    pattern = " ".join(args.pattern).strip()
                    if not pattern:
                        print("Usage: ducklm rules add exact|prefix COMMAND", file=sys.stderr)
                        return EXIT_USAGE
                    return await _admin(runtime, c.RulesAdd(args.kind, pattern))
                if args.rules_command == "revoke":
                    return await _admin(runtime, c.RulesRevoke(args.rule_id))
                include = bool(getattr(args, "all", False))
                return await _admin(runtime, c.RulesList(include_revoked=include))
        raise AssertionError(args.command)

    try:
        return asyncio.run(_with_runtime(settings, body, mcp=args.command == "console"))
    except StoreError as exc:
        print(f"Database error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
