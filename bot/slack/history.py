"""A thread's earlier messages as chat history for the model: the newest ones,
within budget.

DuckLM's own record comes first: the tasks of a conversation keep the history
they started with, their question and their final answer, so a follow-up in a
bot thread costs no Web API call (Slack's limits on `conversations.replies`
for non-Marketplace apps are low since 2025). Only a thread the bot has no
task in yet (it was mentioned in a reply of someone else's thread) is read
from Slack, page by page with cursors: replies come oldest first and the
newest are on the last page, so every page is read and only the newest
messages are kept. A 429 is waited out by the Web client's rate-limit handler
(Retry-After); the whole read is bounded in pages and time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.parsing import ts_key
from bot.slack.text import decode_message
from runtime.store.tasks import TaskStore

logger = logging.getLogger("ducklm.slack")

MAX_HISTORY = 30  # earlier thread messages given to the model
MAX_HISTORY_CHARS = 4_000  # per message
# What we ask for per page; Slack may answer with fewer (15 for some apps).
PAGE_SIZE = 200
MAX_PAGES = 60  # at 15 per page, 900 replies; beyond that the newest are not reached
READ_BUDGET = 30.0  # seconds for the whole read, 429 waits included

# Message subtypes that carry what someone said (a person, a bot, a broadcast reply).
_SAID = {None, "file_share", "thread_broadcast", "bot_message"}

History = list[dict[str, str]]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_HISTORY_CHARS else text[:MAX_HISTORY_CHARS] + " […]"


def _newest(messages: list[dict[str, str]]) -> History:
    """The first message (what the thread is about) and the newest others."""
    if len(messages) <= MAX_HISTORY:
        return messages
    return [messages[0], *messages[-(MAX_HISTORY - 1) :]]


async def stored_history(tasks: TaskStore, conversation: str) -> History | None:
    """The thread as DuckLM recorded it, or None when it has no task there yet."""
    (latest, *_) = await tasks.list_by_conversation(conversation, limit=1) or [None]
    if latest is None:
        return None
    history = [
        {"role": m["role"], "content": _clip(m["content"])}
        for m in latest.history_messages
        if isinstance(m, dict) and m.get("role") in ("user", "assistant") and m.get("content")
    ]
    history.append({"role": "user", "content": _clip(latest.message)})
    if latest.final_response:
        history.append({"role": "assistant", "content": _clip(latest.final_response)})
    return _newest(history)


async def thread_pages(
    client: AsyncWebClient, channel: str, root: str, before: str | None = None
) -> AsyncIterator[list[Any]]:
    """The thread's messages, page by page, oldest first (cursors followed, at
    most MAX_PAGES). `before`: only messages older than that ts. Raises
    SlackApiError; the caller bounds the time."""
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        arguments: dict[str, Any] = {"channel": channel, "ts": root, "limit": PAGE_SIZE}
        if cursor:
            arguments["cursor"] = cursor
        if before:
            arguments["latest"] = before
            arguments["inclusive"] = False
        reply = await client.conversations_replies(**arguments)
        messages = reply.get("messages")
        yield messages if isinstance(messages, list) else []
        metadata = reply.get("response_metadata") or {}
        cursor = metadata.get("next_cursor") if isinstance(metadata, dict) else None
        if not reply.get("has_more") or not cursor:
            return
    logger.warning(
        "thread %s/%s has more than %d pages; its newest replies were not read",
        channel,
        root,
        MAX_PAGES,
    )


async def slack_history(
    client: AsyncWebClient,
    channel: str,
    root: str,
    before: str | None,
    *,
    bot_user_id: str | None,
    bot_id: str | None,
    skip: Collection[str] = (),
) -> History:
    """The thread's messages before `before` (a ts), read from Slack; ours are
    the assistant's. `skip`: our own status lines."""
    first: dict[str, str] | None = None
    kept: deque[dict[str, str]] = deque(maxlen=MAX_HISTORY - 1)
    try:
        async with asyncio.timeout(READ_BUDGET):
            async for page in thread_pages(client, channel, root, before):
                for message in page:
                    entry = _entry(message, before, bot_user_id, bot_id, skip)
                    if entry is None:
                        continue
                    if message.get("ts") == root:
                        first = first or entry  # the parent may head every page
                    else:
                        kept.append(entry)
    except TimeoutError:
        logger.warning("reading thread %s/%s took too long; using what was read", channel, root)
    except SlackApiError as exc:
        logger.warning("could not read thread %s/%s: %s", channel, root, exc)
    return ([first] if first else []) + list(kept)


async def find_own_message(
    client: AsyncWebClient,
    channel: str,
    root: str,
    matches: Callable[[dict[str, Any]], bool],
    *,
    bot_user_id: str | None,
    bot_id: str | None,
) -> str | None:
    """The ts of the bot's own message in the thread that `matches`, or None
    (also when the thread cannot be read in time: the caller then acts as if
    there were none)."""
    try:
        async with asyncio.timeout(READ_BUDGET):
            async for page in thread_pages(client, channel, root):
                for message in page:
                    if not isinstance(message, dict) or not isinstance(message.get("ts"), str):
                        continue
                    if _is_own(message, bot_user_id, bot_id) and matches(message):
                        return str(message["ts"])
    except TimeoutError:
        logger.warning("reading thread %s/%s took too long", channel, root)
    except SlackApiError as exc:
        logger.warning("could not read thread %s/%s: %s", channel, root, exc)
    return None


async def latest_own_text(
    client: AsyncWebClient,
    channel: str,
    root: str,
    *,
    bot_user_id: str | None,
    bot_id: str | None,
    skip: Collection[str] = (),
) -> str | None:
    """The text of the bot's newest message in the thread (`skip`: ts to pass
    over, e.g. status lines), or None when there is none or the thread cannot be
    read in time. Pages come oldest first, so the whole thread is read."""
    latest: str | None = None
    try:
        async with asyncio.timeout(READ_BUDGET):
            async for page in thread_pages(client, channel, root):
                for message in page:
                    if not isinstance(message, dict) or message.get("ts") in skip:
                        continue
                    if _is_own(message, bot_user_id, bot_id) and isinstance(
                        message.get("text"), str
                    ):
                        latest = message["text"]
    except TimeoutError:
        logger.warning("reading thread %s/%s took too long", channel, root)
        return None
    except SlackApiError as exc:
        logger.warning("could not read thread %s/%s: %s", channel, root, exc)
        return None
    return latest


def _is_own(message: dict[str, Any], bot_user_id: str | None, bot_id: str | None) -> bool:
    """Whether the bot posted `message` (as its user, or as its bot id)."""
    return (bot_user_id is not None and message.get("user") == bot_user_id) or (
        bot_id is not None and message.get("bot_id") == bot_id
    )


def _entry(
    message: Any,
    before: str | None,
    bot_user_id: str | None,
    bot_id: str | None,
    skip: Collection[str],
) -> dict[str, str] | None:
    if not isinstance(message, dict):
        return None
    ts = message.get("ts")
    if not isinstance(ts, str) or ts in skip or message.get("subtype") not in _SAID:
        return None
    if before and ts_key(ts) >= ts_key(before):
        return None
    own = _is_own(message, bot_user_id, bot_id)
    content = decode_message(message, bot_user_id=bot_user_id).text
    if not content:
        return None
    return {"role": "assistant" if own else "user", "content": _clip(content)}
