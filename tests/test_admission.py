"""Flood limits and refusal answers (bot/admission.py), on an injected clock:
nothing here sleeps."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from bot.admission import Admission, Refusal, TokenBucket, duration
from bot.backend import Thread
from bot.inbox import Inbound
from bot.policy import AccessPolicy

HOME = "T0HOME001"
_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def inbound(
    text: str = "how full is the disk?",
    *,
    user: str = "slack:UALICE",
    channel: str = "COPS",
    root: str | None = None,
    **kw: Any,
) -> Inbound:
    n = next(_ids)
    ts = f"1700000000.{n:06d}"
    return Inbound(
        thread=Thread("slack", channel, root or ts),
        user=user,
        text=text,
        deliveries=(f"slack:event:Ev{n}", f"slack:msg:{channel}:{ts}"),
        message_id=ts,
        in_thread=root is not None,
        **kw,
    )


def admission(clock: Clock, policy: AccessPolicy | None = None, **kw: Any) -> Admission:
    if policy is None:
        policy = AccessPolicy(approvers=["slack:UAPPROVER"])
        policy.set_home("slack", HOME)
    limits: dict[str, Any] = {
        "user_max_tasks": 3,
        "channel_max_tasks": 6,
        "user_rate": None,
        "channel_rate": None,
        "bot_replies_per_thread": 2,
    }
    limits.update(kw)
    return Admission(policy, clock=clock, **limits)


# -- the token bucket -----------------------------------------------------------------


def test_token_bucket_bursts_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(3, 30.0, now=0.0)  # 3 at once, one every 10 s
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(10.0)
    assert not bucket.take(9.9)
    assert bucket.take(10.0)
    assert not bucket.take(10.0)
    # a long pause refills to the burst size, never beyond
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]
    bucket.give_back(1000.0)
    assert bucket.take(1000.0)
    # a clock that steps back (it should not, but) gives nothing away
    assert not bucket.take(500.0)


def test_duration_reads_like_a_person_wrote_it() -> None:
    assert duration(600) == "10 minutes"
    assert duration(3600) == "1 hour"
    assert duration(5400) == "90 minutes"
    assert duration(86400) == "1 day"
    assert duration(45) == "45 seconds"
    assert duration(1) == "1 second"
    assert duration(0.2) == "1 second"


# -- who may ask, where -------------------------------------------------------------------


def test_a_stranger_is_refused_and_told_at_most_once_an_hour() -> None:
    clock = Clock()
    gate = admission(clock)
    stranger = {"user": "slack:UGUEST", "origin": "T0OTHER01"}
    first = gate.admit(inbound(**stranger))
    assert first is not None and first.reason == "stranger"
    assert first.text is not None and "DUCKLM_REQUESTERS" in first.text
    assert "slack:UGUEST" in first.text
    clock.now += 3599
    assert gate.admit(inbound(**stranger)) == Refusal("stranger", None)
    # another stranger is told separately
    other = gate.admit(inbound(user="slack:UGUEST2", origin="T0OTHER01"))
    assert other is not None and other.text is not None
    clock.now += 1
    again = gate.admit(inbound(**stranger))
    assert again is not None and again.text is not None
    # nothing was charged for any of them
    assert gate.load() == 0


def test_a_duplicate_refusal_does_not_use_up_the_hourly_answer() -> None:
    clock = Clock()
    gate = admission(clock)
    message = inbound(user="slack:UGUEST", origin="T0OTHER01")
    refusal = gate.admit(message)
    assert refusal is not None and refusal.text
    gate.cancel_refusal(message, refusal)  # the store said: already claimed, nothing sent
    retry = gate.admit(message)
    assert retry is not None and retry.text == refusal.text


def test_channels_outside_the_allow_list_are_ignored_silently() -> None:
    clock = Clock()
    policy = AccessPolicy(channels=["slack:COPS"])
    gate = admission(clock, policy)
    assert gate.admit(inbound(channel="COPS")) is None
    # silent: not even the stranger answer, the bot does not speak there at all
    assert gate.admit(inbound(channel="CRANDOM")) == Refusal("channel", None)
    assert gate.admit(inbound(channel="CRANDOM", user="slack:U9", origin="TX")) == Refusal(
        "channel", None
    )


def test_an_approver_from_another_team_is_admitted() -> None:
    gate = admission(Clock())
    assert gate.admit(inbound(user="slack:UAPPROVER", origin="T0OTHER01")) is None


# -- caps on running + queued ------------------------------------------------------------


def test_the_per_user_cap_counts_running_and_queued_until_finished() -> None:
    gate = admission(Clock())
    held = [inbound() for _ in range(3)]
    assert [gate.admit(m) for m in held] == [None, None, None]
    # (whether one runs and two wait, or all three wait: all three count)
    assert gate.load(user="slack:UALICE") == 3
    fourth = gate.admit(inbound())
    assert fourth is not None and fourth.reason == "user_busy"
    assert fourth.text is not None and "DUCKLM_USER_MAX_TASKS=3" in fourth.text
    # the rest of the burst is refused quietly
    assert gate.admit(inbound()) == Refusal("user_busy", None)
    # another user in the same channel is still served
    assert gate.admit(inbound(user="slack:UBOB")) is None
    gate.finished(held[0])
    gate.finished(held[0])  # a second call changes nothing
    assert gate.load(user="slack:UALICE") == 2
    assert gate.admit(inbound()) is None
    # a new burst gets its answer again
    refused = gate.admit(inbound())
    assert refused is not None and refused.text is not None
    assert gate.admit(inbound()) == Refusal("user_busy", None)


def test_a_long_quiet_spell_is_a_new_burst() -> None:
    clock = Clock()
    gate = admission(clock, user_max_tasks=1)
    assert gate.admit(inbound()) is None  # and it keeps running
    first = gate.admit(inbound())
    assert first is not None and first.text is not None
    clock.now += 599
    assert gate.admit(inbound()) == Refusal("user_busy", None)
    clock.now += 601  # ten minutes after the last answer: said again
    again = gate.admit(inbound())
    assert again is not None and again.text == first.text


def test_the_per_channel_cap_holds_across_users() -> None:
    gate = admission(Clock(), user_max_tasks=0, channel_max_tasks=2)  # 0: no per-user cap
    assert gate.admit(inbound(user="slack:U1")) is None
    assert gate.admit(inbound(user="slack:U2")) is None
    refused = gate.admit(inbound(user="slack:U3"))
    assert refused is not None and refused.reason == "channel_busy"
    assert refused.text is not None and "DUCKLM_CHANNEL_MAX_TASKS=2" in refused.text
    assert gate.admit(inbound(user="slack:U3", channel="CDEV")) is None
    assert gate.load(channel="slack:COPS") == 2


def test_decision_words_in_a_thread_are_never_held_back() -> None:
    gate = admission(Clock(), user_max_tasks=1, user_rate=(1, 600.0))
    assert gate.admit(inbound()) is None  # the cap and the bucket are now both spent
    for word in ("approve", "deny too risky", "always", "Approve."):
        reply = inbound(word, root="1700000000.000001")
        assert gate.admit(reply) is None
        gate.finished(reply)
    # the same word outside a thread is just a (new) question: held back
    assert gate.admit(inbound("approve")) is not None


def test_a_recorded_request_is_finished_by_its_new_key() -> None:
    gate = admission(Clock(), user_max_tasks=1)
    message = inbound()
    assert gate.admit(message) is None
    gate.rekey(message, "inbox-1")  # the service knows it by its inbox id from now on
    gate.finished(message)  # the old key no longer holds anything
    assert gate.load() == 1
    gate.finished("inbox-1")
    assert gate.load() == 0
    gate.finished("inbox-unknown")  # recovered after a restart: never admitted here
    assert gate.admit(inbound()) is None


def test_an_empty_mention_spends_a_token_but_holds_no_slot() -> None:
    gate = admission(Clock(), user_max_tasks=1, user_rate=(2, 600.0))
    assert gate.admit(inbound("")) is None  # answered with the "Ask me something" hint
    assert gate.load() == 0
    assert gate.admit(inbound()) is None
    refused = gate.admit(inbound(""))
    assert refused is not None and refused.reason == "user_rate"


# -- rates ---------------------------------------------------------------------------------


def test_the_user_rate_refuses_a_burst_and_says_when_to_retry() -> None:
    clock = Clock()
    gate = admission(clock, user_max_tasks=0, user_rate=(3, 60.0))
    for _ in range(3):
        message = inbound()
        assert gate.admit(message) is None
        gate.finished(message)  # done at once: only the rate can stop the next one
    refused = gate.admit(inbound())
    assert refused is not None and refused.reason == "user_rate"
    assert refused.text is not None
    assert "3 per 1 minute" in refused.text and "DUCKLM_USER_RATE" in refused.text
    assert "Try again in 20 seconds" in refused.text
    assert gate.admit(inbound()) == Refusal("user_rate", None)
    assert gate.admit(inbound(user="slack:UBOB")) is None
    clock.now += 20
    assert gate.admit(inbound()) is None
    assert gate.admit(inbound()) is not None


def test_the_channel_rate_spends_nothing_from_the_user_when_it_refuses() -> None:
    clock = Clock()
    gate = admission(clock, user_max_tasks=0, user_rate=(5, 600.0), channel_rate=(1, 600.0))
    first = inbound()
    assert gate.admit(first) is None
    refused = gate.admit(inbound())
    assert refused is not None and refused.reason == "channel_rate"
    assert refused.text is not None and "This channel" in refused.text
    # the refused message did not cost the user one of their five tokens
    for channel in ("C1", "C2", "C3", "C4"):
        assert gate.admit(inbound(channel=channel)) is None
    assert gate.admit(inbound(channel="C5")) is not None


def test_cancel_undoes_an_admission_whose_delivery_was_a_duplicate() -> None:
    clock = Clock()
    gate = admission(clock, user_max_tasks=1, user_rate=(1, 600.0))
    message = inbound()
    assert gate.admit(message) is None
    gate.cancel(message)  # Slack's second copy of one mention: it never became work
    assert gate.load() == 0
    assert gate.admit(inbound()) is None  # the slot and the token are back


def test_fifty_quick_requests_from_one_user_leave_room_for_another() -> None:
    clock = Clock()
    gate = admission(clock, user_max_tasks=3, channel_max_tasks=6, user_rate=(10, 600.0))
    answers = [gate.admit(inbound()) for _ in range(50)]
    assert answers[:3] == [None, None, None]
    told = [a for a in answers if a is not None and a.text]
    assert len(told) == 1  # one clear answer for the whole burst
    assert gate.load(user="slack:UALICE") == 3
    assert gate.admit(inbound(user="slack:UBOB")) is None


# -- other bots --------------------------------------------------------------------------


def test_replies_to_other_bots_are_bounded_per_thread() -> None:
    gate = admission(Clock(), bot_replies_per_thread=2)
    root = "1700000000.999999"
    for _ in range(2):
        message = inbound(user="slack:UOTHERBOT", root=root, from_bot=True)
        assert gate.admit(message) is None
        gate.finished(message)
    refused = gate.admit(inbound(user="slack:UOTHERBOT", root=root, from_bot=True))
    assert refused is not None and refused.reason == "bot_replies"
    assert refused.text is not None and "DUCKLM_BOT_REPLIES_PER_THREAD" in refused.text
    assert gate.admit(inbound(user="slack:UOTHERBOT", root=root, from_bot=True)) == Refusal(
        "bot_replies", None
    )
    # a person in the same thread, and the bot in another thread, are answered
    assert gate.admit(inbound(root=root)) is None
    assert gate.admit(inbound(user="slack:UOTHERBOT", from_bot=True)) is None


def test_a_cancelled_bot_reply_does_not_count() -> None:
    gate = admission(Clock(), bot_replies_per_thread=1)
    root = "1700000000.888888"
    message = inbound(user="slack:UOTHERBOT", root=root, from_bot=True)
    assert gate.admit(message) is None
    gate.cancel(message)
    assert gate.admit(inbound(user="slack:UOTHERBOT", root=root, from_bot=True)) is None


def test_zero_bot_replies_means_bots_are_never_answered() -> None:
    gate = admission(Clock(), bot_replies_per_thread=0)
    refused = gate.admit(inbound(user="slack:UOTHERBOT", from_bot=True))
    assert refused is not None and refused.text is not None and "=0" in refused.text


def test_defaults_come_from_the_settings() -> None:
    from runtime.settings import Settings

    settings = Settings(_env_file=None, user_rate="2/30s", channel_max_tasks=0)
    gate = Admission.from_settings(settings, AccessPolicy())
    assert gate.user_rate == (2, 30.0)
    assert gate.channel_rate == (30, 600.0)
    assert gate.user_max_tasks == 5 and gate.channel_max_tasks == 0
    assert gate.bot_replies_per_thread == 5
