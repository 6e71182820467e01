"""Issue #15: a bounded randomized kill test of `ducklm run`.

Per seed, three lives of a real `ducklm run` (Slack over HTTP, the fake model
taking a little time per answer) on one database. Each life is planned from a
seeded RNG before it starts: mentions (reads, writes that need an approval,
questions that hang), the `message` copy Slack sends of each mention, Slack
retries (X-Slack-Retry-Num, also of events the dead process had acknowledged),
decisions typed in a card's thread, clicks on cards (double clicks, and two
approvers approving and denying at once, also on cards already decided), each
at a random moment. Two lives end by SIGKILL: from a random crash point
(`DUCKLM_CRASH_AT`), or from outside a few milliseconds after the n-th ack,
click or card post, or at a random moment. The last life, without kills,
delivers every mention once more (a retry), decides most of the cards still
open, waits until everything owed is done, and stops cleanly. Then the
invariants over the store and FakeSlack's record (see `check_invariants`).

DUCKLM_KILL_SEEDS sets the number of seeds (default 10, as CI runs it),
DUCKLM_KILL_SEED_FIRST the first one (default 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY
from tests.crash_harness import (
    APPROVERS,
    CHANNEL,
    Card,
    DuckRun,
    Mention,
    ModelScript,
    answers,
    buttons,
    card_buttons_now,
    cards,
    click,
    events_of,
    mention,
    rows,
    said,
    tasks_of,
    thread_reply,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.test_faults import assert_consistent

# Ten seeds in CI; more, or others, to hunt (DUCKLM_KILL_SEED_FIRST=100 DUCKLM_KILL_SEEDS=50).
FIRST_SEED = int(os.environ.get("DUCKLM_KILL_SEED_FIRST", "0"))
SEEDS = int(os.environ.get("DUCKLM_KILL_SEEDS", "10"))
CRASH_POINTS = (
    "message_recorded",
    "waiting_recorded",
    "decision_recorded",
    "execution_claimed",
    "command_spawned",
)
LIFE_SECONDS = (0.3, 2.0)  # when the outside SIGKILL lands, after the run listens
KILLED_LIVES = 2  # each start costs a second or two: ten seeds stay under two minutes
LAST_LIFE_SECONDS = 60.0  # bound on the last life's wait for everything owed

pytestmark = pytest.mark.timeout(120)

# How a resolved card's text begins, per decision (bot/slack/blocks.py).
SHOWN_AS = {"approve": "Approved", "always": "Approved", "deny": "Denied", "expired": "Expired"}

# What the bot says in a thread whose task ended without an answer (any case).
NOTICE_OF = {"interrupted": "interrupted", "failed": "could not finish"}


@dataclass
class World:
    """What the test did, to check the end state against."""

    mentions: list[Mention] = field(default_factory=list)
    left_pending: set[str] = field(default_factory=set)  # approval ids the last life leaves open
    decided_last: set[str] = field(default_factory=set)  # approval ids clicked in the last life
    log: list[str] = field(default_factory=list)  # the plan as it ran, for failure messages
    t0: float = field(default_factory=time.monotonic)
    kill_after: dict[str, int] = field(default_factory=dict)  # "ack"/"click" -> how many more

    def note(self, bot: DuckRun, what: str) -> None:
        """An ack or a click got its 200: SIGKILL now if it was the one to kill after."""
        if what in self.kill_after:
            self.kill_after[what] -= 1
            if self.kill_after[what] <= 0:
                self.kill_after = {}
                self.log.append(f"  SIGKILL right after that {what}")
                bot.kill_now()


@pytest_asyncio.fixture
async def bot(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer
) -> AsyncIterator[DuckRun]:
    # The flood limits (issue #22) would rightly refuse some of a burst of
    # mentions; refusals are not what this test is about.
    run = DuckRun(
        tmp_path,
        slack,
        model_server,
        DUCKLM_USER_MAX_TASKS="0",
        DUCKLM_CHANNEL_MAX_TASKS="0",
        DUCKLM_USER_RATE="off",
        DUCKLM_CHANNEL_RATE="off",
        # The periodic recovery runs beside live work all the time (it must not
        # redo what a live job is doing), and repairs what an outage left.
        DUCKLM_RECOVERY_INTERVAL="0.5",
    )
    try:
        yield run
    finally:
        await run.close()


# -- one life ------------------------------------------------------------------


def plan_life(rng: random.Random, life: int) -> list[tuple[float, str, Any]]:
    """(delay, operation, argument) for one life, drawn before it starts."""
    plan: list[tuple[float, str, Any]] = []
    for n in range(rng.randint(2, 5)):
        kind = rng.choices(("read", "approve", "hang"), weights=(4, 5, 1))[0]
        tag = f"{kind}-{life}{n}" if kind != "read" else f"q{life}{n}"
        plan.append((rng.uniform(0, 1.0), "mention", (tag, rng.random(), rng.random())))
    for _ in range(rng.randint(2, 6)):
        how = rng.choices(("approve", "deny", "double", "race"), weights=(4, 1, 2, 2))[0]
        plan.append((rng.uniform(0.15, 1.8), "click", (rng.random(), how)))
    for _ in range(rng.randint(0, 2)):
        plan.append((rng.uniform(0, 1.2), "retry", rng.random()))
    for _ in range(rng.randint(0, 2)):  # a decision typed in the card's thread
        word = rng.choice(("approve", "deny not now"))
        plan.append((rng.uniform(0.2, 1.8), "reply", (rng.random(), word, rng.random())))
    return sorted(plan, key=lambda step: step[0])


async def deliver(bot: DuckRun, world: World, envelope: dict[str, Any], retry: int) -> None:
    """Deliver an event as Slack does; a 200 may be the moment to kill."""
    if await bot.post_event(envelope, retry_num=retry) == 200:
        world.note(bot, "ack")


async def do_step(bot: DuckRun, slack: FakeSlack, world: World, op: str, arg: Any) -> None:
    if op == "mention":
        tag, copy, retry = arg
        text = f"please run {tag}" if tag.startswith("approve-") else f"what about {tag}?"
        m = mention(slack, text)
        world.mentions.append(m)
        jobs = [deliver(bot, world, m.envelope, 0)]
        if copy < 0.6:  # the same message as a `message` event
            jobs.append(deliver(bot, world, m.copy, 0))
        if retry < 0.3:  # Slack retries at once (it thought the ack was slow)
            jobs.append(deliver(bot, world, m.envelope, 1))
        await asyncio.gather(*jobs)
    elif op == "retry" and world.mentions:
        m = world.mentions[int(arg * len(world.mentions))]
        await deliver(bot, world, m.envelope, 2)
    elif op == "reply":
        pick, word, who = arg
        found = [c for c in cards(slack) if c.thread_ts]
        if found:
            card = found[int(pick * len(found))]
            user = APPROVERS[int(who * len(APPROVERS))]
            envelope = thread_reply(slack, str(card.thread_ts), word, user=user)
            await deliver(bot, world, envelope, 0)
    elif op == "click":
        pick, how = arg
        found = cards(slack)
        if not found:
            return
        card = found[int(pick * len(found))]
        if how == "approve":
            clicks = [click(slack, card)]
        elif how == "deny":
            clicks = [click(slack, card, action_id=ACTION_DENY)]
        elif how == "double":  # one approver, two quick clicks
            clicks = [click(slack, card), click(slack, card)]
        else:  # two approvers at once, opposite decisions
            clicks = [
                click(slack, card, user=APPROVERS[0]),
                click(slack, card, user=APPROVERS[1], action_id=ACTION_DENY),
            ]
        for status in await asyncio.gather(*(bot.post_interaction(c) for c in clicks)):
            if status == 200:
                world.note(bot, "click")


async def run_steps(
    bot: DuckRun, slack: FakeSlack, world: World, plan: list[tuple[float, str, Any]]
) -> None:
    started = time.monotonic()
    jobs: list[asyncio.Task[None]] = []
    for delay, op, arg in plan:
        # The plan's own timing (this is the "random moment"); a dead run ends it.
        if await bot.exited(max(0.0, started + delay - time.monotonic())) is not None:
            break
        world.log.append(f"{time.monotonic() - started:.2f}s {op} {arg}")
        jobs.append(asyncio.ensure_future(do_step(bot, slack, world, op, arg)))
    await asyncio.gather(*jobs)


def card_posts(slack: FakeSlack) -> int:
    """Cards the bot has started to post (counted when the call arrives, before
    FakeSlack answers it: a kill then lands between the post and its record)."""
    return sum(
        1
        for call in slack.calls_to("chat.postMessage")
        if any(b.get("action_id") == ACTION_APPROVE for b in buttons(call.params.get("blocks")))
    )


async def killed_life(
    rng: random.Random, bot: DuckRun, slack: FakeSlack, world: World, life: int
) -> None:
    point = None
    if rng.random() < 0.4:
        point = f"{rng.choice(CRASH_POINTS)}:{rng.randint(1, 2)}"
    # The outside kill lands at a random moment, or a few milliseconds after the
    # n-th ack, click or new card of this life (what the report did),
    # and at the latest at `kill_at`.
    trigger = rng.choice(("time", "ack", "click", "card"))
    count = rng.randint(1, 3)
    kill_at = rng.uniform(*LIFE_SECONDS)
    plan = plan_life(rng, life)
    world.log.append(
        f"life {life} at {time.monotonic() - world.t0:.1f}s: crash point {point}, "
        f"kill after {count} {trigger} or at {kill_at:.2f}s"
    )
    await bot.start(crash_at=point, ready=False)
    if not await bot.listening():  # died in its start-up recovery: a kill all the same
        world.log.append("  died while starting")
        return
    world.kill_after = {trigger: count} if trigger in ("ack", "click") else {}
    steps = asyncio.ensure_future(run_steps(bot, slack, world, plan))
    if trigger == "card":
        posted = card_posts(slack)
        with contextlib.suppress(AssertionError):
            await slack.wait_for(
                lambda: card_posts(slack) >= posted + count or not bot.running,
                within=kill_at,
                what="a new card",
            )
    code = await bot.exited(0 if trigger == "card" else kill_at)
    if code is None:
        await bot.kill()
    elif code != -9 or point is not None:
        world.log.append(f"  died: {code}")
        assert code == -9, f"exit {code}:\n{bot.stderr()}"
    world.kill_after = {}
    with contextlib.suppress(Exception):
        await asyncio.wait_for(steps, 20)  # the rest of the plan meets a dead port


# -- the last life -------------------------------------------------------------


def terminal(bot: DuckRun, slack: FakeSlack, world: World, m: Mention) -> bool:
    """Has this mention got everything it is owed (as far as the test can see)?"""
    found = tasks_of(bot.db, m.conversation)
    if len(found) != 1:
        return False
    task_id, status = found[0]
    if status == "completed":
        return bool(answers(slack, m.ts))
    if status in NOTICE_OF:
        return bool(said(slack, m.ts, NOTICE_OF[status]))
    if status == "waiting_for_approval":
        pending = rows(
            bot.db,
            "SELECT approval_id FROM approvals WHERE task_id = ? AND decision IS NULL",
            (task_id,),
        )
        shown = {c.approval_id for c in cards(slack, m.ts) if card_buttons_now(slack, c)}
        return bool(pending) and all(a in world.left_pending and a in shown for (a,) in pending)
    return False


async def last_life(rng: random.Random, bot: DuckRun, slack: FakeSlack, world: World) -> None:
    world.log.append(f"last life at {time.monotonic() - world.t0:.1f}s")
    await bot.start()
    # Slack retries every mention once more, acknowledged before or not.
    results = await asyncio.gather(
        *(bot.post_event(m.envelope, retry_num=3) for m in world.mentions)
    )
    assert all(r == 200 for r in results), (results, bot.stderr())

    def open_cards() -> list[Card]:
        return [
            c
            for c in cards(slack)
            if c.approval_id not in world.decided_last | world.left_pending
            and card_buttons_now(slack, c)
        ]

    def done() -> bool:
        return all(terminal(bot, slack, world, m) for m in world.mentions) and not rows(
            bot.db, "SELECT 1 FROM inbox WHERE done_at IS NULL"
        )

    deadline = time.monotonic() + LAST_LIFE_SECONDS
    while not done():
        clicks: list[Coroutine[Any, Any, int | None]] = []
        for card in open_cards():
            choice = rng.choices(("approve", "deny", "leave"), weights=(6, 2, 2))[0]
            world.log.append(f"  {choice} {card.approval_id}")
            if choice == "leave":
                world.left_pending.add(card.approval_id)
                continue
            world.decided_last.add(card.approval_id)
            action = ACTION_APPROVE if choice == "approve" else ACTION_DENY
            clicks.append(bot.post_interaction(click(slack, card, action_id=action)))
        assert all(r == 200 for r in await asyncio.gather(*clicks)), bot.stderr()
        try:
            # Re-checked on every Slack call and at least every 0.2 s.
            await slack.wait_for(
                lambda: done() or open_cards(),
                within=max(0.0, deadline - time.monotonic()),
                what="everything owed",
            )
        except AssertionError:
            owed = [
                (m.text, tasks_of(bot.db, m.conversation), said(slack, m.ts))
                for m in world.mentions
                if not terminal(bot, slack, world, m)
            ]
            raise AssertionError(
                f"still owed after {LAST_LIFE_SECONDS} s: {owed}\n"
                + "\n".join(world.log)
                + f"\n{bot.stderr()}"
            ) from None
    await bot.stop()
    world.log.append(f"stopped at {time.monotonic() - world.t0:.1f}s")


# -- the invariants -------------------------------------------------------------

_TAG = re.compile(r"\bapprove-\d+\b")


def check_invariants(bot: DuckRun, slack: FakeSlack, world: World) -> None:
    db = bot.db
    context = "\n".join(world.log)
    assert_consistent(db)  # intact, no task running, events 1..n from task_created
    assert rows(db, "SELECT COUNT(*) FROM inbox WHERE done_at IS NULL") == [(0,)], context
    refused = rows(db, "SELECT payload FROM events WHERE event_type = 'request_refused'")
    assert refused == [], refused

    effects = bot.effects()
    ran: dict[str, int] = {}
    for line in effects:
        ran[line] = ran.get(line, 0) + 1

    posted_cards: dict[str, list[Card]] = {}
    for card in cards(slack):
        posted_cards.setdefault(card.approval_id, []).append(card)

    seen_tags: set[str] = set()
    for m in world.mentions:
        where = f"{m.text!r} ({m.conversation})"
        # Every mention (all were acknowledged by the last life at the latest)
        # became exactly one task ...
        found = tasks_of(db, m.conversation)
        assert len(found) == 1, (where, found, context)
        task_id, status = found[0]
        events = events_of(db, task_id)
        kinds = [kind for _, kind, _ in events]
        # ... and got exactly one final answer, or a clear notice.
        final = answers(slack, m.ts)
        if status == "completed":
            assert len(final) == 1, (where, said(slack, m.ts), context)
            assert kinds[-1] == "task_completed", (where, kinds)
        elif status in NOTICE_OF:
            assert final == [], (where, final)
            end = "task_interrupted" if status == "interrupted" else "task_failed"
            assert kinds[-1] == end, (where, kinds)
            told = said(slack, m.ts, NOTICE_OF[status])
            assert len(told) == 1, (where, said(slack, m.ts), context)
        else:
            assert status == "waiting_for_approval", (where, status, context)
            assert final == [], (where, final)

        approvals = rows(
            db,
            "SELECT approval_id, decision, executed_at, card_ref, card_state, "
            "replaces_approval_id FROM approvals WHERE task_id = ?",
            (task_id,),
        )
        spent = {a for a, decision, executed_at, *_ in approvals if executed_at is not None}
        reissued = [p for _, kind, p in events if kind == "approval_reissued"]
        # A cut-short run is offered again once, linked to its spent approval, and
        # the thread is told once per offer.
        replaced = [(a, old) for a, *_, old in approvals if old is not None]
        assert sorted((p["approval_id"], p["replaces"]) for p in reissued) == sorted(replaced), (
            where,
            reissued,
            replaced,
        )
        assert all(old in spent for _, old in replaced), (where, replaced, spent)
        told = said(slack, m.ts, "did not start") + said(slack, m.ts, "may have started")
        assert len(told) == len(reissued), (where, told, reissued, context)
        claimed = 0
        for approval_id, decision, executed_at, card_ref, card_state, _ in approvals:
            shown = posted_cards.get(approval_id, [])
            # A card is posted once per approval, never twice.
            assert len(shown) <= 1, (where, approval_id, shown)
            if decision is None:
                # Every pending approval has a posted card with working buttons.
                assert card_state == "posted" and card_ref, (where, approval_id, card_state)
                assert len(shown) == 1 and card_buttons_now(slack, shown[0]), (where, approval_id)
            else:
                # Every decided approval's card shows its decision.
                if shown:
                    assert card_buttons_now(slack, shown[0]) == [], (where, approval_id, decision)
                    assert card_state == "resolved", (where, approval_id, card_state)
                    # ... the decision that won, when two clicks raced.
                    now = slack.message(CHANNEL, shown[0].ts)
                    label = SHOWN_AS.get(decision, decision)
                    assert now and now["text"].startswith(label), (where, decision, now)
            if decision in ("approve", "always") and executed_at is not None:
                claimed += 1
        finished = sum(
            1
            for _, kind, payload in events
            if kind == "command_audit" and payload.get("approved") and payload.get("ok")
        )
        tags = set(_TAG.findall(m.text))
        for tag in tags:
            seen_tags.add(tag)
            # No approved run twice, nothing unapproved: at most one line per approval
            # whose execution was claimed, and at least one per run that finished.
            assert finished <= ran.get(tag, 0) <= claimed, (
                where,
                tag,
                ran.get(tag, 0),
                finished,
                claimed,
                context,
            )
    # Nothing ran that no mention asked for.
    assert set(ran) <= seen_tags, (ran, seen_tags)


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
async def test_random_kills_keep_every_promise(
    seed: int, bot: DuckRun, slack: FakeSlack, model_server: FakeModelServer
) -> None:
    rng = random.Random(seed)
    # Its own generator: model calls interleave with the plan's draws.
    timing = random.Random(-seed - 1)
    script = ModelScript(model_server, latency=lambda: timing.uniform(0.02, 0.2))
    world = World()
    for life in range(KILLED_LIVES):
        await killed_life(rng, bot, slack, world, life)
    script.hang = False  # the last life must be able to finish what is still owed
    await last_life(rng, bot, slack, world)
    print("\n".join(world.log))  # shown with -s, and by pytest on a failure
    check_invariants(bot, slack, world)
