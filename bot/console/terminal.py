"""`ducklm console`: a line-based chat on the same runtime and store as the bots.

The person at the terminal is the operator: they may approve and manage rules
without being listed in DUCKLM_APPROVERS / DUCKLM_ADMINS, as DESIGN.md says.
Lines are read by `reader` (readline editing, history, Tab completion on a
terminal); what is shown goes through `output` (Markdown styled on a terminal,
plain text in a pipe).
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

from bot import commands as c
from bot.admin import CommandRunner
from bot.console.completion import candidates
from bot.console.format import render_card
from bot.console.output import Output
from bot.console.reader import LineReader, history_path
from bot.edits import edited_text, parse_edit, vote_counted_text
from bot.policy import AccessPolicy, Actor
from runtime.approvals import ApprovalError
from runtime.factory import Runtime
from runtime.loop import ChatResult, PendingApproval
from runtime.store.models import Event

EXIT_WORDS = {"exit", "quit", ":q"}

NO_MODEL_NOTICE = """\
No model is configured, so free-text questions cannot be answered yet.
To chat with the agent set DUCKLM_MODEL_BASE_URL (any OpenAI-compatible API) and
DUCKLM_MODEL_API_KEY (or OPENAI_API_KEY), and optionally DUCKLM_THINKER_MODEL /
DUCKLM_ACTION_MODEL. Until then: `run <command>` runs a shell command under the
approval rules, and `/duck help` lists the admin commands."""

NO_MODEL_REMINDER = (
    "No model is configured: use `run <command>`, `/duck help`, or set DUCKLM_MODEL_BASE_URL."
)

GREETING = "DuckLM console. Ask a question, `run <command>`, `/duck help`, or `exit`."


def quorum_notice(quorum: dict[str, int]) -> str | None:
    """What the operator is told at start when the default section asks more than
    one approver for a risk (issue #20): the console is one person, so such an
    action can only be denied here (or left to expire), never approved."""
    keys = [f"quorum.{level} = {n}" for level, n in quorum.items() if n > 1]
    if not keys:
        return None
    return (
        f"Note: the policy's default section sets {', '.join(keys)}. The console is "
        "one person, so an action of that risk cannot be approved from here alone "
        "(`a` counts as one approval): deny it with `d`, or ask for it in a chat "
        "channel, where other approvers can add theirs."
    )


class Console:
    def __init__(
        self,
        runtime: Runtime,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.out = Output(self.stdout)
        self.actor = Actor(f"console:{user or getpass.getuser()}", is_admin=True, is_approver=True)
        self.conversation = f"console:{self.actor.id.split(':', 1)[1]}"
        # The operator keeps its powers; its workspace and tools are the policy's
        # default section (issue #20; the environment without a policy file).
        self.policy = AccessPolicy.from_settings(runtime.settings)
        self.where = self.policy.default
        runtime.loop.tool_refusal = self.policy.tool_refusal
        self.runner = CommandRunner(
            runtime.stores.tasks,
            runtime.stores.events,
            runtime.approvals,
            runtime.stores.schedules,
            timezone=runtime.settings.timezone,
        )
        self.history: list[dict[str, str]] = []
        self.pending: PendingApproval | None = None
        self.pending_task: str | None = None
        runtime.loop.add_listener(self._on_event)

    def say(self, text: str) -> None:
        """Verbatim: approval cards, progress lines, errors."""
        self.out.line(text)

    def note(self, text: str) -> None:
        """The console's and the admin commands' own replies: `code` styled, lines kept."""
        self.out.inline(text)

    def answer(self, text: str) -> None:
        """What the agent answered: Markdown, rendered on a terminal."""
        self.out.markdown(text)

    async def serve(self) -> int:
        reader = LineReader(
            self.stdin,
            self.stdout,
            history_file=history_path(
                self.runtime.settings.local_dir, self.runtime.settings.local_stem
            ),
            keep=self._may_remember,
            complete=lambda before, word: candidates(
                before, word, pending=self.pending is not None
            ),
        )
        reader.open()
        try:
            return await self._serve(reader)
        finally:
            reader.close()

    async def _serve(self, reader: LineReader) -> int:
        self.note(GREETING)
        if self.runtime.model is None:
            self.note(NO_MODEL_NOTICE)
        notice = quorum_notice(dict(self.where.quorum))
        if notice:
            self.note(notice)
        self._report(reader)
        while True:
            line = await reader.read("> ")
            if line is None:  # EOF
                return 0
            line = line.strip()
            if not line:
                continue
            if line.lower() in EXIT_WORDS:
                return 0
            try:
                await self.handle(line)
            except Exception as exc:  # one bad line must not end the session
                self.say(f"Error: {type(exc).__name__}: {exc}")
            self._report(reader)

    def _report(self, reader: LineReader) -> None:
        """Say once why the history file is not used (it cannot be read or written)."""
        if reader.problem:
            self.say(reader.problem)
            reader.problem = None

    def _may_remember(self, line: str) -> bool:
        """What joins the history: not a line holding a secret (as the runtime redacts
        them: the file outlives the session), nor `exit` (the up arrow would end it)."""
        if line.strip().lower() in EXIT_WORDS:
            return False
        return self.runtime.redactor.redact(line).count == 0

    async def handle(self, line: str) -> None:
        if self.pending is not None:
            reply = c.parse_decision(line, letters=True)
            if reply is not None:
                await self._decide(reply)
                return
            edit = parse_edit(line)
            if edit is not None:  # approve with an edit (issue #20)
                await self._edit(edit)
                return
        if line.startswith(("/duck", "!duck")):
            await self._command(line.split(None, 1)[1] if " " in line else "")
            return
        if line.startswith("!run ") or line.lower().startswith("run "):
            await self._run_direct(line.split(None, 1)[1].strip())
            return
        if line.lower() in ("help", "?"):
            self.say(c.USAGE)  # a plain-text table
            return
        if self.runtime.model is None:
            self.note(NO_MODEL_REMINDER)
            return
        result = await self.runtime.loop.run_chat(
            line,
            self.where.workspace,
            history_messages=list(self.history),
            conversation=self.conversation,
            requested_by=self.actor.id,
        )
        self._show(result, question=line)

    async def _command(self, text: str) -> None:
        try:
            command = c.parse_command(text)
        except c.CommandError as exc:
            self.say(str(exc))
            return
        if isinstance(command, c.Run):
            await self._run_direct(command.command)
            return
        reply = await self.runner.execute(command, self.actor, where=self.where)
        # `help` is a plain-text table; the other replies are lines with `code`.
        if isinstance(command, c.Help):
            self.say(reply)
        else:
            self.note(reply)

    async def _run_direct(self, command: str) -> None:
        if not command:
            self.say("Usage: run <command>")
            return
        result = await self.runtime.loop.run_command(
            command,
            self.where.workspace,
            conversation=self.conversation,
            requested_by=self.actor.id,
        )
        self._show(result, question=f"run {command}")

    async def _decide(self, reply: c.DecisionReply) -> None:
        assert self.pending is not None and self.pending_task is not None
        pending, task_id = self.pending, self.pending_task
        # The operator may decide, but quorum counts people: the console is one.
        needed = self.where.quorum_for(pending.risk_level)
        try:
            outcome = await self.runtime.approvals.decide(
                pending.approval_id, reply.decision, self.actor.id, reply.note, quorum=needed
            )
        except ApprovalError as exc:
            self.say(f"Not decided: {exc}")
            return
        if outcome.waiting_for_more:
            self.note(
                vote_counted_text(pending.command or pending.tool, outcome.voters, needed, str)
            )
            self.note(self._alone(needed))
            return
        self.pending = self.pending_task = None
        if not outcome.taken:
            decided = outcome.approval.decision if outcome.approval else "decided"
            self.say(f"That approval was already {decided}; nothing ran again.")
            return
        if outcome.rule is not None:
            self.note(
                f"Rule `{outcome.rule.rule_id}` added: {outcome.rule.kind} `{outcome.rule.pattern}`"
            )
        result = await self.runtime.loop.continue_after_approval(task_id, pending.approval_id)
        self._show(result)

    async def _edit(self, command: str) -> None:
        """`edit <command>`: replace the pending command (classified afresh; a
        blocked one is refused), show the new card, and approve it as one person."""
        assert self.pending is not None
        try:
            edit = await self.runtime.approvals.edit(
                self.pending.approval_id, command, self.actor.id
            )
        except ApprovalError as exc:
            self.say(f"Not edited: {exc}")
            return
        edited = PendingApproval.from_approval(edit.approval, self.runtime.redactor)
        needed = self.where.quorum_for(edited.risk_level)
        self.note(
            edited_text(
                self.actor.id,
                self.runtime.redactor.redact(edit.old_command).text,
                edited.command or "",
                edit.old_risk,
                edit.new_risk,
                needed,
            )
        )
        self.pending = edited
        self.say(self._card(edited))
        await self._decide(c.DecisionReply("approve"))

    def _card(self, pending: PendingApproval) -> str:
        """The approval card; where its risk needs more than one approver it says
        that the console cannot complete it, and offers no Always (refused there:
        one person's rule would bypass the quorum)."""
        needed = self.where.quorum_for(pending.risk_level)
        text = render_card(pending, quorum=needed)
        if needed <= 1:
            return text
        return text + "\n  " + self._alone(needed)

    @staticmethod
    def _alone(needed: int) -> str:
        return (
            f"This needs {needed} approvers and the console is one person: it cannot be "
            "approved from here alone. `d` denies it; otherwise it stays pending."
        )

    def _show(self, result: ChatResult, question: str | None = None) -> None:
        if question is not None:
            self.history.append({"role": "user", "content": question})
        if result.status == "waiting_for_approval" and result.pending_approval:
            self.pending = result.pending_approval
            self.pending_task = result.task_id
            self.say(self._card(result.pending_approval))
            return
        if result.status == "failed":
            self.say(f"Task failed: {result.final_response}")
            return
        self.answer(result.final_response)
        self.history.append({"role": "assistant", "content": result.final_response})

    def _on_event(self, event: Event) -> None:
        """Show what the agent is doing while it does it."""
        payload = event.payload
        if event.event_type == "tool_call_started":
            args = payload.get("args") or {}
            what = args.get("command") or args.get("path") or ""
            self.say(f"  … {payload.get('tool')} {what}".rstrip())
        elif event.event_type == "model_call_started" and payload.get("role") == "thinker":
            self.say("  … writing the answer")
