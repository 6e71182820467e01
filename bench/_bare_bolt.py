"""The baseline for the Slack benchmarks: a bare slack-bolt app that only acks.

    python -m bench._bare_bolt PORT SLACK_API_URL

Same framework, same HTTP adapter (aiohttp + bolt's adapter, as bot/slack/platform.py
serves it), same signing secret; every event and every button click is acked
and nothing else happens. Prints "ready" once it listens.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET


def build(api_url: str) -> AsyncApp:
    # The same Web API as ducklm's app talks to (bolt checks the token once).
    app = AsyncApp(
        client=AsyncWebClient(token=BOT_TOKEN, base_url=api_url),
        signing_secret=SIGNING_SECRET,
        logger=logging.getLogger("bare"),
    )

    @app.event("app_mention")
    async def mention() -> None:  # events are acked by bolt itself
        return None

    @app.event("message")
    async def message() -> None:
        return None

    @app.action(re.compile(".*"))
    async def click(ack) -> None:  # type: ignore[no-untyped-def]
        await ack()

    return app


async def main(port: int, api_url: str) -> None:
    app = build(api_url)

    async def handle(request: web.Request) -> web.Response:
        response = await app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(response)

    web_app = web.Application()
    web_app.router.add_post("/slack/events", handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
