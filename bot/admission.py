"""Admission: whether one inbound message may become work, decided before it is
recorded (issue #22).

In order, an `Inbound` is refused when
1. its channel is outside DUCKLM_CHANNELS (silently: the bot does not answer there);
2. its sender may not ask (`AccessPolicy.may_ask`; told at most once an hour);
3. it is another bot's, and the bot already answered bots
   DUCKLM_BOT_REPLIES_PER_THREAD times in that thread (two bots must not talk forever);
4. its sender, or its channel, already has DUCKLM_USER_MAX_TASKS /
   DUCKLM_CHANNEL_MAX_TASKS requests running or queued;
5. its sender, or its channel, is out of tokens (DUCKLM_USER_RATE /
   DUCKLM_CHANNEL_RATE, token buckets: a burst of N, then N per period).
A flood refusal (4-5) is explained once per burst: after one answer the sender
hears nothing more until a request of theirs is admitted again (or ten minutes
passed); the bot-thread bound (3) is explained once per thread. The global
DUCKLM_MAX_CONCURRENT_TASKS still bounds what actually runs (bot/service.py).

Thread replies that are decision words (`approve`, `deny …`, `always`) start
no task, so the flood limits leave them alone; an empty mention (the bot
answers with a hint) spends a token but holds no slot.

Everything here lives in memory, per process: a restart forgets the counts and
refills the buckets, which errs towards serving people. Check and charge
happen in one synchronous call, so concurrent deliveries cannot both take the
last slot; `cancel` undoes a charge when recording the request then fails.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot.commands import parse_decision
from bot.inbox import Inbound
from bot.policy import AccessPolicy

if TYPE_CHECKING:
    from runtime.settings import Settings

REFUSAL_INTERVAL = 3600.0  # a stranger is told "you may not ask" at most this often
# A flood refusal is explained again after this long, even if nothing of the
# sender's was admitted in between (a burst long ago is not this burst).
BURST_QUIET = 600.0
MAX_REMEMBERED = 10_000  # bounds every per-user / per-thread memory (strangers are many)

Rate = tuple[int, float]  # (tokens, seconds to refill them all)


@dataclass(frozen=True)
class Refusal:
    """Why an inbound was not admitted. `text` is the private answer to give the
    sender now, or None to stay quiet (already told, or an unserved channel)."""

    reason: str  # channel | stranger | bot_replies | user_busy | channel_busy | user_rate | ...
    text: str | None


class TokenBucket:
    """`capacity` tokens, refilled continuously at capacity/period per second."""

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = float(capacity)
        self.per_second = capacity / period
        self.tokens = float(capacity)
        self.updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.per_second)
        self.updated = max(self.updated, now)

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + 1.0)

    def wait(self, now: float) -> float:
        """Seconds until the next token."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.per_second)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


@dataclass
class _Charge:
    """What admitting one inbound changed, so `cancel` can undo exactly that."""

    user: str
    channel: str
    slot: bool = False  # holds a running/queued slot until finished()
    buckets: list[TokenBucket] = field(default_factory=list)
    bot_thread: str | None = None
    flood_told: float | None = None  # the user's "told" mark this admission cleared


class Admission:
    def __init__(
        self,
        policy: AccessPolicy,
        *,
        user_max_tasks: int = 5,
        channel_max_tasks: int = 6,
        user_rate: Rate | None = (10, 600.0),
        channel_rate: Rate | None = (30, 600.0),
        bot_replies_per_thread: int = 5,
        refusal_interval: float = REFUSAL_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.user_max_tasks = user_max_tasks
        self.channel_max_tasks = channel_max_tasks
        self.user_rate = user_rate
        self.channel_rate = channel_rate
        self.bot_replies_per_thread = bot_replies_per_thread
        self.refusal_interval = refusal_interval
        self.clock = clock
        self._held_by_user: dict[str, int] = {}
        self._held_in_channel: dict[str, int] = {}
        self._user_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._channel_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._bot_replies: OrderedDict[str, int] = OrderedDict()
        self._stranger_told: OrderedDict[str, float] = OrderedDict()
        self._flood_told: OrderedDict[str, float] = OrderedDict()  # user -> when told
        self._bot_thread_told: OrderedDict[str, None] = OrderedDict()
        # What each admitted request holds, by the caller's key for it: the
        # Inbound at first, its inbox id once recorded (see `rekey`).
        self._charges: dict[Hashable, list[_Charge]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, policy: AccessPolicy) -> Admission:
        return cls(
            policy,
            user_max_tasks=settings.user_max_tasks,
            channel_max_tasks=settings.channel_max_tasks,
            user_rate=settings.user_rate,
            channel_rate=settings.channel_rate,
            bot_replies_per_thread=settings.bot_replies_per_thread,
        )

    # -- the decision ------------------------------------------------------------

    def admit(self, inbound: Inbound) -> Refusal | None:
        """None: admitted, and charged (a slot, tokens) under the key `inbound`
        until `finished` (or `cancel`). A Refusal: nothing charged; give the
        sender its text, if any. Call it once per delivery, after the delivery
        keys were claimed (a duplicate must not count)."""
        now = self.clock()
        thread = inbound.thread
        channel = f"{thread.platform}:{thread.channel}"
        if not self.policy.answers_in(thread.platform, thread.channel):
            return Refusal("channel", None)
        if not self.policy.may_ask(inbound.user, origin=inbound.origin):
            return Refusal("stranger", self._stranger_text(inbound.user, now))
        if in_thread_decision(inbound):
            self._remember(inbound, _Charge(inbound.user, channel))
            return None
        if inbound.from_bot:  # (0: the bot never answers bots)
            if self._bot_replies.get(thread.key, 0) >= self.bot_replies_per_thread:
                return Refusal("bot_replies", self._bot_thread_text(thread.key))
        wants_slot = bool(inbound.text.strip())  # an empty mention only gets a hint
        if wants_slot:
            busy = self._busy(inbound.user, channel)
            if busy is not None:
                return self._flood(inbound.user, *busy, now)
        buckets: list[TokenBucket] = []
        for limits, key, rate, reason in (
            (self._user_buckets, inbound.user, self.user_rate, "user_rate"),
            (self._channel_buckets, channel, self.channel_rate, "channel_rate"),
        ):
            if rate is None:
                continue
            bucket = self._bucket(limits, key, rate, now)
            if not bucket.take(now):
                for taken in buckets:  # all or nothing
                    taken.give_back(now)
                return self._flood(inbound.user, reason, _rate_text(reason, rate, bucket, now), now)
            buckets.append(bucket)
        charge = _Charge(inbound.user, channel, buckets=buckets)
        if wants_slot:
            charge.slot = True
            _bump(self._held_by_user, inbound.user, 1)
            _bump(self._held_in_channel, channel, 1)
        if inbound.from_bot:
            charge.bot_thread = thread.key
            _bump(self._bot_replies, thread.key, 1)
            self._bot_replies.move_to_end(thread.key)
            _trim(self._bot_replies)
        told = self._flood_told.pop(inbound.user, None)  # a new burst: explained again
        if told is not None:
            charge.flood_told = told
        self._remember(inbound, charge)
        return None

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """From now on the admitted request `old` (its Inbound) is known as `new`
        (e.g. its inbox id) to `finished` and `cancel`."""
        for charge in self._charges.pop(old, []):
            self._charges.setdefault(new, []).append(charge)

    def cancel(self, key: Hashable) -> None:
        """Undo `admit` for a request that did not become work after all
        (recording it failed, or a direct run's thread could not be opened)."""
        charge = self._forget(key)
        if charge is None:
            return
        now = self.clock()
        self._release(charge)
        for bucket in charge.buckets:
            bucket.give_back(now)
        if charge.bot_thread is not None:
            _bump(self._bot_replies, charge.bot_thread, -1)
        if charge.flood_told is not None:
            self._flood_told[charge.user] = charge.flood_told

    def cancel_refusal(self, inbound: Inbound, refusal: Refusal) -> None:
        """Undo the "told" mark of a refusal that was never sent (recording the
        delivery failed, so the platform's retry may send it)."""
        if refusal.text is None:
            return
        if refusal.reason == "stranger":
            self._stranger_told.pop(inbound.user, None)
        elif refusal.reason == "bot_replies":
            self._bot_thread_told.pop(inbound.thread.key, None)
        else:
            self._flood_told.pop(inbound.user, None)

    # -- the service's side: the work ends -------------------------------------------
    # Running and queued count alike, from admission to `finished`, so the
    # service needs to say nothing when a queued task gets its run slot.

    def finished(self, key: Hashable) -> None:
        """The admitted request's work ended (answered, waiting for approval,
        failed): its slot is free. Unknown or repeated calls do nothing, so a
        message recovered after a restart (never admitted here) is harmless."""
        charge = self._forget(key)
        if charge is not None:
            self._release(charge)

    def load(self, *, user: str | None = None, channel: str | None = None) -> int:
        """Requests running or queued for a user, or in a channel (`slack:C1`)."""
        if user is not None:
            return self._held_by_user.get(user, 0)
        if channel is not None:
            return self._held_in_channel.get(channel, 0)
        return sum(self._held_by_user.values())

    # -- internals -----------------------------------------------------------------

    def _busy(self, user: str, channel: str) -> tuple[str, str] | None:
        held = self._held_by_user.get(user, 0)
        if self.user_max_tasks and held >= self.user_max_tasks:
            return "user_busy", (
                f"You already have {held} requests running or waiting, the most DuckLM "
                f"takes from one person at once (DUCKLM_USER_MAX_TASKS={self.user_max_tasks}), "
                "so I did not start this one. Ask again when one has finished; I won't "
                "answer each extra message until then."
            )
        held = self._held_in_channel.get(channel, 0)
        if self.channel_max_tasks and held >= self.channel_max_tasks:
            return "channel_busy", (
                f"This channel already has {held} requests running or waiting "
                f"(DUCKLM_CHANNEL_MAX_TASKS={self.channel_max_tasks}), so I did not start "
                "yours. Ask again when one has finished; I won't answer each extra message "
                "until then."
            )
        return None

    def _flood(self, user: str, reason: str, text: str, now: float) -> Refusal:
        told = self._flood_told.get(user)
        if told is not None and now - told < BURST_QUIET:
            return Refusal(reason, None)  # told once in this burst already
        self._flood_told[user] = now
        self._flood_told.move_to_end(user)
        _trim(self._flood_told)
        return Refusal(reason, text)

    def _stranger_text(self, user: str, now: float) -> str | None:
        told = self._stranger_told.get(user)
        if told is not None and now - told < self.refusal_interval:
            return None
        self._stranger_told[user] = now
        self._stranger_told.move_to_end(user)
        _trim(self._stranger_told)
        return self.policy.refuse_ask_text(user)

    def _bot_thread_text(self, thread_key: str) -> str | None:
        if thread_key in self._bot_thread_told:
            return None
        self._bot_thread_told[thread_key] = None
        _trim(self._bot_thread_told)
        if not self.bot_replies_per_thread:
            return "I don't answer other bots (DUCKLM_BOT_REPLIES_PER_THREAD=0)."
        return (
            f"I have answered bots {self.bot_replies_per_thread} times in this thread, the "
            "most I do (DUCKLM_BOT_REPLIES_PER_THREAD), so two bots cannot keep each other "
            "going. A person can still ask here."
        )

    def _bucket(
        self, buckets: OrderedDict[str, TokenBucket], key: str, rate: Rate, now: float
    ) -> TokenBucket:
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(rate[0], rate[1], now)
            if len(buckets) > MAX_REMEMBERED:
                # A full bucket is the same as a new one: forgetting it loses nothing.
                for old in [k for k, b in buckets.items() if b.full(now)]:
                    del buckets[old]
        buckets.move_to_end(key)
        return bucket

    def _remember(self, key: Hashable, charge: _Charge) -> None:
        self._charges.setdefault(key, []).append(charge)

    def _forget(self, key: Hashable) -> _Charge | None:
        charges = self._charges.get(key)
        if not charges:
            return None
        charge = charges.pop(0)
        if not charges:
            del self._charges[key]
        return charge

    def _release(self, charge: _Charge) -> None:
        if charge.slot:
            charge.slot = False
            _bump(self._held_by_user, charge.user, -1)
            _bump(self._held_in_channel, charge.channel, -1)


def in_thread_decision(inbound: Inbound) -> bool:
    """A reply in a thread that reads as `approve` / `deny …` / `always`."""
    return inbound.in_thread and parse_decision(inbound.text) is not None


def _bump(counts: dict[str, int], key: str, by: int) -> None:
    value = counts.get(key, 0) + by
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


def _trim(memory: OrderedDict[str, object]) -> None:
    while len(memory) > MAX_REMEMBERED:
        memory.popitem(last=False)


def _rate_text(reason: str, rate: Rate, bucket: TokenBucket, now: float) -> str:
    count, period = rate
    if reason == "user_rate":
        who, setting = "one person", "DUCKLM_USER_RATE"
        start = "You are asking faster than"
    else:
        who, setting = "one channel", "DUCKLM_CHANNEL_RATE"
        start = "This channel is asking faster than"
    return (
        f"{start} DuckLM takes new requests from {who} ({count} per {duration(period)}, "
        f"{setting}), so I did not start this one. Try again in "
        f"{duration(max(1.0, bucket.wait(now)))}; I won't answer each extra message until then."
    )


def duration(seconds: float) -> str:
    """600 -> "10 minutes", 3600 -> "1 hour", 45 -> "45 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and (seconds % size == 0 or seconds >= 2 * size or unit == "minute"):
            value = round(seconds / size)
            return f"{value} {unit}{'s' if value != 1 else ''}"
    value = max(1, round(seconds))
    return f"{value} second{'s' if value != 1 else ''}"
