"""The `/duck` command grammar, shared by Slack (`/duck …`), Matrix (`!duck …`) and
the console (`/duck …`), plus the thread-reply grammar for decisions
(`approve`, `deny [reason]`, `always`).

Parsing only: nothing here touches the store. `bot/admin.py` carries commands out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

MAX_COMMAND_TEXT = 4000

USAGE = """\
DuckLM commands:
  help                          this text
  run <command>                 run a shell command directly (same approval rules)
  rules                         list the "always allow" rules
  rules add exact <command>     allow exactly this command (admins)
  rules add prefix <command>    allow commands starting with these words (admins)
                                options at the end: for=7d (expires), global
                                (every channel; default: this one), confirm
  rules preview exact|prefix <command>
                                the past commands such a rule would have allowed
  rules review                  idle rules, rules that allowed a failure or a denial
  rules revoke <rule-id>        revoke a rule (admins)
  approvals                     pending approvals
  tasks                         recent tasks in this channel
  policy                        who may approve, administer, schedule here; workspace, tools
  task <task-id>                a task's audit trail
  schedule add "<cron>" [tz=<zone>] <prompt>
                                run a prompt here on a five-field cron schedule
  schedule list                 this channel's schedules
  schedule pause|resume|remove <schedule-id>
In an approval's thread, reply `approve`, `deny [reason]` or `always`."""


class CommandError(ValueError):
    """Bad command syntax; the message says what was wrong and how to write it."""


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Run:
    command: str


@dataclass(frozen=True)
class RulesList:
    include_revoked: bool = False


@dataclass(frozen=True)
class RulesAdd:
    kind: Literal["exact", "prefix"]
    pattern: str
    tool: str = "shell_exec_safe"
    lifetime: float | None = None  # seconds until it expires (`for=7d`); None: never
    scope_global: bool = False  # `global`: every channel (default: the one it is added in)
    confirmed: bool = False  # `confirm`: add it even when it covers more than the command


@dataclass(frozen=True)
class RulesPreview:
    kind: Literal["exact", "prefix"]
    pattern: str


@dataclass(frozen=True)
class RulesReview:
    pass


@dataclass(frozen=True)
class RulesRevoke:
    rule_id: str


@dataclass(frozen=True)
class Approvals:
    pass


@dataclass(frozen=True)
class Tasks:
    pass


@dataclass(frozen=True)
class PolicyShow:
    """`policy`: the policy in force in this channel (issue #20)."""


@dataclass(frozen=True)
class TaskShow:
    task_id: str


@dataclass(frozen=True)
class ScheduleAdd:
    cron: str
    prompt: str
    timezone: str | None = None  # None: DUCKLM_TZ


@dataclass(frozen=True)
class ScheduleList:
    pass


@dataclass(frozen=True)
class ScheduleChange:
    action: Literal["pause", "resume", "remove"]
    schedule_id: str


Command = (
    Help
    | Run
    | RulesList
    | RulesAdd
    | RulesRevoke
    | RulesPreview
    | RulesReview
    | Approvals
    | Tasks
    | PolicyShow
    | TaskShow
    | ScheduleAdd
    | ScheduleList
    | ScheduleChange
)

# Commands that change rules need DUCKLM_ADMINS.
ADMIN_ONLY: tuple[type, ...] = (RulesAdd, RulesRevoke)
# Commands that change schedules need DUCKLM_ADMINS or DUCKLM_SCHEDULERS.
SCHEDULER_ONLY: tuple[type, ...] = (ScheduleAdd, ScheduleChange)


def _usage(line: str) -> CommandError:
    return CommandError(f"Usage: {line}\nSend `help` for every command.")


def parse_command(text: str) -> Command:
    """Parse the text after `/duck` (or `!duck`)."""
    text = (text or "").strip()
    if len(text) > MAX_COMMAND_TEXT:
        raise CommandError(f"That command is too long ({len(text)} characters).")
    if not text:
        return Help()
    verb, _, rest = text.partition(" ")
    verb, rest = verb.lower(), rest.strip()

    if verb in ("help", "?"):
        return Help()
    if verb == "run":
        if not rest:
            raise _usage("run <command>")
        return Run(rest)
    if verb == "rules":
        return _parse_rules(rest)
    if verb == "approvals":
        return Approvals()
    if verb == "tasks":
        return Tasks()
    if verb == "policy":
        return PolicyShow()
    if verb in ("schedule", "schedules"):
        return _parse_schedule(rest)
    if verb == "task":
        if not rest or " " in rest:
            raise _usage("task <task-id>")
        return TaskShow(rest)
    raise CommandError(f"Unknown command `{verb}`.\n{USAGE}")


def _parse_rules(rest: str) -> Command:
    sub, _, args = rest.partition(" ")
    sub, args = sub.lower(), args.strip()
    if sub in ("", "list"):
        if args not in ("", "--all", "all"):
            raise _usage("rules [list] [all]")
        return RulesList(include_revoked=bool(args))
    if sub == "add":
        kind, _, pattern = args.partition(" ")
        pattern, options = _rule_options(pattern.strip())
        kind, pattern = kind.lower(), _unquote(pattern)
        if kind not in ("exact", "prefix") or not pattern:
            raise _usage("rules add exact|prefix <command> [for=7d] [global] [confirm]")
        return RulesAdd(kind, pattern, **options)  # type: ignore[arg-type]
    if sub == "preview":
        kind, _, pattern = args.partition(" ")
        kind, pattern = kind.lower(), _unquote(pattern.strip())
        if kind not in ("exact", "prefix") or not pattern:
            raise _usage("rules preview exact|prefix <command>")
        return RulesPreview(kind, pattern)  # type: ignore[arg-type]
    if sub == "review":
        if args:
            raise _usage("rules review")
        return RulesReview()
    if sub in ("revoke", "remove", "rm"):
        if not args or " " in args:
            raise _usage("rules revoke <rule-id>")
        return RulesRevoke(args)
    raise _usage(
        "rules [list | add exact|prefix <command> [for=7d] [global] [confirm] | "
        "preview exact|prefix <command> | review | revoke <rule-id>]"
    )


_SCHEDULE_USAGE = (
    'schedule add "<minute hour day month weekday>" [tz=<zone>] <prompt>  '
    "| schedule list | schedule pause|resume|remove <schedule-id>"
)


def _parse_schedule(rest: str) -> Command:
    sub, _, args = rest.partition(" ")
    sub, args = sub.lower(), args.strip()
    if sub in ("", "list", "ls"):
        return ScheduleList()
    if sub in ("pause", "resume", "remove", "rm", "delete"):
        if not args or " " in args:
            raise _usage(f"schedule {sub} <schedule-id>")
        action = "remove" if sub in ("rm", "delete") else sub
        return ScheduleChange(action, args)  # type: ignore[arg-type]
    if sub != "add":
        raise _usage(_SCHEDULE_USAGE)
    cron, rest_after = _take_cron(args)
    timezone = None
    head, _, tail = rest_after.partition(" ")
    if head.lower().startswith(("tz=", "timezone=")):
        timezone = head.split("=", 1)[1]
        rest_after = tail.strip()
    if not rest_after:
        raise _usage(_SCHEDULE_USAGE)
    return ScheduleAdd(cron, rest_after, timezone or None)


def _take_cron(args: str) -> tuple[str, str]:
    """The cron expression, quoted (`"0 9 * * 1-5"`) or as the first five words."""
    if args[:1] in ("'", '"', "`"):
        quote = args[0]
        end = args.find(quote, 1)
        if end == -1:
            raise CommandError(f"The cron expression has no closing {quote}.")
        return args[1:end].strip(), args[end + 1 :].strip()
    words = args.split()
    if len(words) < 6:
        raise _usage(_SCHEDULE_USAGE)
    return " ".join(words[:5]), args.split(None, 5)[5].strip()


def _rule_options(text: str) -> tuple[str, dict[str, object]]:
    """Split the trailing options `for=<duration>`, `global` and `confirm` off a
    rule's command (quote the command to end it with one of these words)."""
    from runtime.settings import parse_duration

    words = text.split(" ")
    options: dict[str, object] = {}
    while len(words) > 1:
        last = words[-1].strip()
        if last.lower().startswith("for="):
            try:
                options["lifetime"] = parse_duration(last[4:])
            except ValueError as exc:
                raise CommandError(f"{exc}. Example: rules add prefix git pull for=7d") from None
        elif last.lower() == "global":
            options["scope_global"] = True
        elif last.lower() == "confirm":
            options["confirmed"] = True
        elif last:
            break
        words.pop()
    return " ".join(words).strip(), options


def _unquote(pattern: str) -> str:
    """Allow `rules add prefix "git pull"` as well as the bare words."""
    if len(pattern) >= 2 and pattern[0] == pattern[-1] and pattern[0] in "\"'`":
        try:
            words = shlex.split(pattern.strip("`")) if pattern[0] == "`" else shlex.split(pattern)
        except ValueError:
            return pattern
        if len(words) == 1:
            return words[0]
    return pattern


Decision = Literal["approve", "deny", "always"]

# Only the documented words: "no idea why" or "yes, but…" in a thread must stay
# questions for the bot, never decisions.
_DECISION_WORDS: dict[str, Decision] = {"approve": "approve", "deny": "deny", "always": "always"}
# The console's one-letter prompt answers: [a]pprove / [d]eny / a[l]ways.
_CONSOLE_LETTERS: dict[str, Decision] = {"a": "approve", "d": "deny", "l": "always"}


@dataclass(frozen=True)
class DecisionReply:
    decision: Decision
    note: str | None = None


def parse_decision(text: str, *, letters: bool = False) -> DecisionReply | None:
    """A thread reply that decides an approval, or None if the text is something else.

    Only `deny` takes a reason; `approve`/`always` followed by more words are not
    decisions (so "approve this later, I'm busy" does not run anything).
    """
    words = (text or "").strip().split(None, 1)
    if not words:
        return None
    head = words[0].lower().rstrip(".!:,")
    rest = words[1].strip() if len(words) > 1 else ""
    decision = _DECISION_WORDS.get(head) or (_CONSOLE_LETTERS.get(head) if letters else None)
    if decision is None:
        return None
    if decision == "deny":
        return DecisionReply("deny", rest[:1000] or None)
    if rest:
        return None
    return DecisionReply(decision)
