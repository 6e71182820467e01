"""Who may do what in chat: requesters, approvers, admins and the four-eyes rule.

Secure by default: with DUCKLM_APPROVERS unset nobody may approve in chat, and
with DUCKLM_ADMINS unset nobody may change rules in chat (the console and the
CLI still can; they are the operator). With DUCKLM_REQUESTERS unset only the
bot's own people may ask: Matrix users on its homeserver and members of the
Slack workspace it is installed in (not the guests of a Slack Connect channel).
Even read-only commands disclose the host, so a stranger may not run them.

Per channel (issue #20): DUCKLM_POLICY_FILE (bot/policy_file.py, docs/policy.md)
may give each channel or room its own approvers, admins, schedulers, four-eyes
risk, workspace and tools. The variables are the default section; the file's
`default` overrides them; a channel's section overrides the default there (lists
replace, they never extend). `for_channel` / `for_conversation` say what applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.store.models import Approval
from runtime.tools.base import RISK_ORDER

if TYPE_CHECKING:
    from bot.policy_file import PolicyFile, Section
    from runtime.settings import Settings

ANYONE = "*"


def _matrix_server(user_id: str) -> str:
    """`@alice:example.org` -> `example.org` (a port stays: `localhost:8448`)."""
    return user_id.partition(":")[2].lower()


@dataclass(frozen=True)
class Actor:
    """Who is asking, with what they may do. `id` is platform-qualified (`slack:U1`)."""

    id: str
    is_admin: bool = False
    is_approver: bool = False
    is_scheduler: bool = False

    @property
    def may_schedule(self) -> bool:
        return self.is_admin or self.is_scheduler


@dataclass(frozen=True)
class ChannelPolicy:
    """The rights in force in one channel (or room): its section of the policy
    file laid over the default section, itself laid over the environment."""

    # Which section applied: "environment" (no policy file), "default" (the file's
    # default section) or the channel section's name (`slack:C1`).
    section: str
    approvers: frozenset[str]
    admins: frozenset[str]
    schedulers: frozenset[str]
    four_eyes_risk: str
    workspace: str  # where tools run for tasks of this channel
    tools: frozenset[str] | None = None  # which tools may be used; None: all
    # Issue #20, part 2: distinct approvers needed per risk level (a level not
    # named needs what the highest named level below it needs, else one), and
    # who is called in when an approval stays open `escalate_after` seconds.
    quorum: Mapping[str, int] = field(default_factory=dict)
    escalate_after: float | None = None
    escalate_to: frozenset[str] = frozenset()

    def quorum_for(self, risk_level: str | None) -> int:
        """How many distinct people must approve an action of this risk here."""
        rank = RISK_ORDER.get(risk_level or "high", 2)
        needed = [n for level, n in self.quorum.items() if RISK_ORDER.get(level, 9) <= rank]
        return max(needed, default=1)

    def escalated(self) -> ChannelPolicy:
        """This policy once an approval was escalated: its escalation approvers
        decide as approvers of the channel."""
        return replace(self, approvers=self.approvers | self.escalate_to)

    def allows_tool(self, tool: str) -> bool:
        if self.tools is None:
            return True
        if tool in self.tools:
            return True
        # `mcp__<server>__*` allows every tool of that server.
        server, sep, _ = tool.rpartition("__")
        return bool(sep) and f"{server}__*" in self.tools

    def needs_second_person(self, risk_level: str | None) -> bool:
        if self.four_eyes_risk == "off":
            return False
        return RISK_ORDER.get(risk_level or "high", 2) >= RISK_ORDER[self.four_eyes_risk]

    def over(self, section: Section, name: str, workspace: Path | None) -> ChannelPolicy:
        """This policy with what `section` sets replacing it (lists replace)."""

        def pick(value: list[str] | None, current: frozenset[str]) -> frozenset[str]:
            return current if value is None else frozenset(value)

        return ChannelPolicy(
            section=name,
            approvers=pick(section.approvers, self.approvers),
            admins=pick(section.admins, self.admins),
            schedulers=pick(section.schedulers, self.schedulers),
            four_eyes_risk=section.four_eyes_risk or self.four_eyes_risk,
            workspace=str(workspace) if workspace is not None else self.workspace,
            tools=self.tools if section.tools is None else frozenset(section.tools),
            quorum=_pick_quorum(section.quorum, self.quorum),
            escalate_after=_pick_after(section.escalate_after, self),
            escalate_to=pick(section.escalate_to, self.escalate_to),
        )

    def describe(self) -> list[str]:
        """`/duck policy`: what applies here, one fact a line."""

        def names(ids: frozenset[str]) -> str:
            return ", ".join(sorted(ids)) if ids else "nobody"

        if self.section == "environment":
            where = "the environment (no DUCKLM_POLICY_FILE)"
        elif self.section == "default":
            where = "the policy file's default section (no section for this channel)"
        else:
            where = f"the policy file's section `{self.section}`"
        tools = ", ".join(sorted(self.tools)) if self.tools is not None else "all"
        quorum = ", ".join(
            f"{level} = {n}"
            for level, n in sorted(self.quorum.items(), key=lambda kv: RISK_ORDER.get(kv[0], 9))
        )
        escalation = (
            f"after {duration_text(self.escalate_after)} to {names(self.escalate_to)}"
            if self.escalate_after is not None and self.escalate_to
            else "off"
        )
        return [
            f"Policy here: {where}",
            f"approvers: {names(self.approvers)}",
            f"admins: {names(self.admins)}",
            f"schedulers: {names(self.schedulers)} (and admins)",
            f"four-eyes from risk: {self.four_eyes_risk}",
            f"workspace: {self.workspace}",
            f"tools: {tools or 'none'}",
            f"quorum: {quorum or 'one approver for every risk'}",
            f"escalation: {escalation}",
        ]


def _pick_quorum(value: Mapping[str, int] | None, current: Mapping[str, int]) -> Mapping[str, int]:
    # A section's quorum table replaces the one above it, as lists do.
    return current if value is None else dict(value)


def _pick_after(value: float | str | None, current: ChannelPolicy) -> float | None:
    if value is None:
        return current.escalate_after
    if value == "off":  # the file's way to turn the default's escalation off here
        return None
    return float(value)


def duration_text(seconds: float) -> str:
    """600 -> "10m": the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class AccessPolicy:
    def __init__(
        self,
        approvers: Iterable[str] = (),
        admins: Iterable[str] = (),
        four_eyes_risk: str = "high",
        schedulers: Iterable[str] = (),
        *,
        requesters: Iterable[str] = (),
        channels: Iterable[str] = (),
        matrix_allowed_inviters: Iterable[str] = (),
        workspace: str = ".",
        policy_file: PolicyFile | None = None,
        escalate_after: float | None = None,
        escalate_to: Iterable[str] = (),
    ) -> None:
        environment = ChannelPolicy(
            "environment",
            frozenset(approvers),
            frozenset(admins),
            frozenset(schedulers),
            four_eyes_risk,
            workspace,
            escalate_after=escalate_after,
            escalate_to=frozenset(escalate_to),
        )
        self.policy_file = policy_file
        self.default = environment
        # (platform, channel, Slack team or None) -> that channel's policy.
        self.sections: dict[tuple[str, str, str | None], ChannelPolicy] = {}
        if policy_file is not None:
            self.default = environment.over(
                policy_file.default, "default", policy_file.default_workspace
            )
            for rule in policy_file.channels:
                self.sections[(rule.platform, rule.channel, rule.team)] = self.default.over(
                    rule.section, rule.name, rule.workspace
                )
        # The default section's, as before the policy file: what every caller
        # that knows no channel sees.
        self.approvers = self.default.approvers
        self.admins = self.default.admins
        self.schedulers = self.default.schedulers
        self.four_eyes_risk = self.default.four_eyes_risk
        everywhere = [self.default, *self.sections.values()]
        # Approvers and admins of any channel may always ask (they are the bot's people).
        self.trusted = frozenset().union(*(p.approvers | p.admins for p in everywhere))
        self.any_approvers = frozenset().union(*(p.approvers for p in everywhere))
        # Escalation approvers decide only once an approval was escalated to them;
        # they may talk to the bot (a decision reply) like approvers.
        self.any_escalation = frozenset().union(*(p.escalate_to for p in everywhere))
        self.trusted |= self.any_escalation
        self.requesters = frozenset(entry.strip() for entry in requesters if entry.strip())
        self.channels = frozenset(entry.strip() for entry in channels if entry.strip())
        self.matrix_allowed_inviters = tuple(
            entry.strip() for entry in matrix_allowed_inviters if entry.strip()
        )
        # platform -> its home: the installing Slack team id, the Matrix server
        # name. Learned when the platform connects (set_home).
        self.homes: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """The policy of these settings; with DUCKLM_POLICY_FILE set, that file is
        read and validated (PolicyFileError: the bot must not start)."""
        policy_file = None
        if settings.policy_file is not None:
            from bot.policy_file import load_policy_file

            policy_file = load_policy_file(settings.policy_file)
        return cls(
            settings.approvers,
            settings.admins,
            settings.four_eyes_risk,
            schedulers=settings.schedulers,
            requesters=settings.requesters,
            channels=settings.channels,
            matrix_allowed_inviters=settings.matrix_allowed_inviters,
            workspace=str(settings.workspace),
            policy_file=policy_file,
            escalate_after=settings.escalate_after,
            escalate_to=settings.escalate_to,
        )

    # -- per channel -------------------------------------------------------------

    def for_channel(self, platform: str, channel: str) -> ChannelPolicy:
        """The policy in force in a channel (room). A Slack section naming a
        workspace applies only where the bot is installed in that workspace; one
        naming none applies in any."""
        if platform == "slack":
            home = self.homes.get("slack")
            if home is not None and (found := self.sections.get((platform, channel, home))):
                return found
        return self.sections.get((platform, channel, None), self.default)

    def for_conversation(self, conversation: str | None) -> ChannelPolicy:
        """The policy of a task's conversation key (`slack:C1|ts`); the default
        for the console and the CLI (no channel)."""
        platform, _, rest = (conversation or "").partition(":")
        channel, sep, _ = rest.rpartition("|")
        if not sep or not channel:
            return self.default
        return self.for_channel(platform, channel)

    # -- who may ask -----------------------------------------------------------

    @property
    def anyone_may_ask(self) -> bool:
        return ANYONE in self.requesters

    def set_home(self, platform: str, home: str) -> None:
        """Platforms call this when they connect: Slack with the installing team
        id (auth.test `team_id`), Matrix with the server name of the bot's id."""
        self.homes[platform] = home.strip() if platform == "slack" else home.strip().lower()

    def may_ask(self, user: str, *, origin: str | None = None) -> bool:
        """May `user` (platform-qualified) ask the bot and run direct commands?
        `origin` is the sender's Slack team (`user_team`); None means the team
        the event came from, i.e. the installing one."""
        if user in self.trusted:
            return True
        if self.requesters:
            return self.anyone_may_ask or any(
                self._matches(entry, user, origin) for entry in self.requesters
            )
        platform, _, ident = user.partition(":")
        home = self.homes.get(platform)
        if platform == "slack":
            # Before auth.test has told us the team, only "the event's own team"
            # (origin None) is known to be home; a named team is not.
            return origin is None or (home is not None and origin == home)
        if platform == "matrix":
            return home is not None and _matrix_server(ident) == home
        return False

    def _matches(self, entry: str, user: str, origin: str | None) -> bool:
        platform, _, ident = user.partition(":")
        kind, _, wanted = entry.partition(":")
        if kind != platform:
            return False
        if platform == "slack":
            if wanted.startswith(("T", "E")):  # a workspace (or an Enterprise Grid org)
                team = origin if origin is not None else self.homes.get("slack")
                return team == wanted
            return ident == wanted
        if platform == "matrix":
            local, _, server = wanted.partition(":")
            if local == "*":
                return _matrix_server(ident) == server.lower()
            return ident == wanted
        return False

    def tool_refusal(self, conversation: str | None, tool: str) -> str | None:
        """Why `tool` may not be used in a task of this conversation (its
        channel's `tools`), or None if it may (the loop's `tool_refusal` hook)."""
        where = self.for_conversation(conversation)
        if where.allows_tool(tool):
            return None
        allowed = ", ".join(sorted(where.tools or ())) or "none"
        return (
            f"The tool {tool} may not be used here (policy section `{where.section}` "
            f"allows: {allowed}), so it did not run."
        )

    def answers_in(self, platform: str, channel: str) -> bool:
        """DUCKLM_CHANNELS: does the bot answer in this channel (room) at all?"""
        return not self.channels or f"{platform}:{channel}" in self.channels

    def may_invite(self, user: str) -> bool:
        """May this Matrix user invite the bot into a room? Whoever may ask, and
        of those only the DUCKLM_MATRIX_ALLOWED_INVITERS when that is set
        (`@user:server`, `matrix:@user:server`, `server` or `:server`)."""
        if not self.may_ask(user):
            return False
        if not self.matrix_allowed_inviters:
            return True
        ident = user.removeprefix("matrix:")
        for entry in self.matrix_allowed_inviters:
            entry = entry.removeprefix("matrix:")
            if entry.startswith("@"):
                if entry == ident:
                    return True
            elif entry.lstrip(":").lower() == _matrix_server(ident):
                return True
        return False

    def refuse_ask_text(self, user: str) -> str:
        """The short private answer to someone who may not ask (sent at most once
        an hour per person, see bot/admission.py)."""
        return (
            f"Sorry, you (`{user}`) may not ask DuckLM here, so I did nothing. An "
            "operator can allow you by adding you (or your workspace or server) to "
            "DUCKLM_REQUESTERS."
        )

    def actor(self, user: str, where: ChannelPolicy | None = None) -> Actor:
        """Who `user` is in a channel (`where`; the default section without one)."""
        where = where or self.default
        return Actor(
            user,
            is_admin=user in where.admins,
            is_approver=user in where.approvers,
            is_scheduler=user in where.schedulers,
        )

    def needs_second_person(
        self, risk_level: str | None, where: ChannelPolicy | None = None
    ) -> bool:
        return (where or self.default).needs_second_person(risk_level)

    def _where_to_add(self, where: ChannelPolicy) -> str:
        if self.policy_file is None:
            return "DUCKLM_APPROVERS"
        if where.section == "default":
            return f"the approvers of the default section of {self.policy_file.path.name}"
        return f"the approvers of section `{where.section}` of {self.policy_file.path.name}"

    def refuse_decision(
        self, user: str, approval: Approval, decision: str, where: ChannelPolicy | None = None
    ) -> str | None:
        """Why `user` may not take `decision` on `approval` in the channel whose
        policy is `where`, or None if they may. Without `where` (a caller that
        does not know the channel) only who approves nowhere is refused, and the
        default's four-eyes risk applies; the decision itself always passes
        `where` (ChatService.handle_decision)."""
        approvers = where.approvers if where is not None else self.any_approvers
        target = where or self.default
        if not approvers:
            here = " here" if self.sections else ""
            return (
                f"Nobody may approve actions in chat{here} yet. An operator can allow you by "
                f"adding `{user}` to {self._where_to_add(target)}."
            )
        if user not in approvers:
            if where is not None and user in self.any_approvers:
                return (
                    f"You (`{user}`) are not an approver in this channel (policy section "
                    f"`{where.section}`), so nothing changed."
                )
            return (
                f"You (`{user}`) are not an approver, so nothing changed. An operator can "
                f"add you to {self._where_to_add(target)}."
            )
        if decision == "always" and approval.risk_level == "critical":
            return "Critical actions can't be allowed forever; approve this once instead."
        if (
            decision in ("approve", "always")
            and user == approval.requested_by
            and target.needs_second_person(approval.risk_level)
        ):
            return (
                f"This is a {approval.risk_level}-risk action you asked for yourself; "
                "another approver has to approve it (four-eyes rule)."
            )
        return None

    def describe_requesters(self) -> str:
        if self.anyone_may_ask:
            return "anyone (DUCKLM_REQUESTERS=*)"
        listed = sorted(self.requesters)
        if listed:
            return ", ".join(listed) + " (DUCKLM_REQUESTERS)"
        homes = []
        if "matrix" in self.homes:
            homes.append(f"Matrix users on {self.homes['matrix']}")
        if "slack" in self.homes:
            homes.append(f"members of Slack workspace {self.homes['slack']}")
        where = " and ".join(homes) or "the bot's own Matrix homeserver and Slack workspace"
        return f"{where} (DUCKLM_REQUESTERS unset)"

    def startup_block(self) -> list[str]:
        """What `ducklm run` prints at start, one block: who may ask, approve and
        administer, and where it answers, so an open configuration shows at a glance."""

        def names(ids: frozenset[str], setting: str) -> str:
            return ", ".join(sorted(ids)) if ids else f"nobody ({setting} unset)"

        lines = [
            f"who may ask: {self.describe_requesters()}"
            + ("; approvers and admins too" if not self.anyone_may_ask else ""),
            f"who may approve: {names(self.approvers, 'DUCKLM_APPROVERS')}",
            f"who may administer: {names(self.admins, 'DUCKLM_ADMINS')}",
        ]
        if self.schedulers:
            lines.append(f"who may schedule: {', '.join(sorted(self.schedulers))} and admins")
        if self.policy_file is not None:
            # The lines above are the default section's; channels may differ.
            lines.append(
                f"policy file: {self.policy_file.path} in force (DUCKLM_POLICY_FILE), "
                f"{len(self.sections)} channel section(s): "
                + (", ".join(p.section for p in self.sections.values()) or "none")
                + "; the lines above are its default section"
            )
        if self.matrix_allowed_inviters:
            lines.append(
                "who may invite on Matrix: requesters among "
                + ", ".join(self.matrix_allowed_inviters)
                + " (DUCKLM_MATRIX_ALLOWED_INVITERS)"
            )
        lines.append(
            "answers in: "
            + (", ".join(sorted(self.channels)) if self.channels else "every channel and room")
            + (" (DUCKLM_CHANNELS)" if self.channels else " it is in (DUCKLM_CHANNELS unset)")
        )
        return lines

    def startup_warnings(self) -> list[str]:
        warnings = []
        if self.anyone_may_ask:
            warnings.append(
                "DUCKLM_REQUESTERS=*: ANYONE who can reach the bot (any Matrix server, any "
                "Slack Connect guest) may ask it and run read-only commands on this host."
            )
        if not self.any_approvers:
            warnings.append(
                "DUCKLM_APPROVERS is not set: nobody can approve actions in chat "
                "(set it to ids such as slack:U024BE7LH or matrix:@alice:example.org)."
            )
        if not any(p.admins for p in [self.default, *self.sections.values()]):
            warnings.append("DUCKLM_ADMINS is not set: nobody can manage rules in chat.")
        return warnings
