"""Who may do what in chat: requesters, approvers, admins and the four-eyes rule.

Secure by default: with DUCKLM_APPROVERS unset nobody may approve in chat, and
with DUCKLM_ADMINS unset nobody may change rules in chat (the console and the
CLI still can; they are the operator). With DUCKLM_REQUESTERS unset only the
bot's own people may ask: Matrix users on its homeserver and members of the
Slack workspace it is installed in (not the guests of a Slack Connect channel).
Even read-only commands disclose the host, so a stranger may not run them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.store.models import Approval
from runtime.tools.base import RISK_ORDER

if TYPE_CHECKING:
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
    ) -> None:
        self.approvers = frozenset(approvers)
        self.admins = frozenset(admins)
        self.schedulers = frozenset(schedulers)
        self.four_eyes_risk = four_eyes_risk
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
        return cls(
            settings.approvers,
            settings.admins,
            settings.four_eyes_risk,
            schedulers=settings.schedulers,
            requesters=settings.requesters,
            channels=settings.channels,
            matrix_allowed_inviters=settings.matrix_allowed_inviters,
        )

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
        if user in self.approvers or user in self.admins:
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

    def actor(self, user: str) -> Actor:
        return Actor(
            user,
            is_admin=user in self.admins,
            is_approver=user in self.approvers,
            is_scheduler=user in self.schedulers,
        )

    def needs_second_person(self, risk_level: str | None) -> bool:
        if self.four_eyes_risk == "off":
            return False
        return RISK_ORDER.get(risk_level or "high", 2) >= RISK_ORDER[self.four_eyes_risk]

    def refuse_decision(self, user: str, approval: Approval, decision: str) -> str | None:
        """Why `user` may not take `decision` on `approval`, or None if they may."""
        if not self.approvers:
            return (
                "Nobody may approve actions in chat yet. An operator can allow you by "
                f"adding `{user}` to DUCKLM_APPROVERS."
            )
        if user not in self.approvers:
            return (
                f"You (`{user}`) are not an approver, so nothing changed. An operator can "
                "add you to DUCKLM_APPROVERS."
            )
        if decision == "always" and approval.risk_level == "critical":
            return "Critical actions can't be allowed forever; approve this once instead."
        if (
            decision in ("approve", "always")
            and user == approval.requested_by
            and self.needs_second_person(approval.risk_level)
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
        if not self.approvers:
            warnings.append(
                "DUCKLM_APPROVERS is not set: nobody can approve actions in chat "
                "(set it to ids such as slack:U024BE7LH or matrix:@alice:example.org)."
            )
        if not self.admins:
            warnings.append("DUCKLM_ADMINS is not set: nobody can manage rules in chat.")
        return warnings
