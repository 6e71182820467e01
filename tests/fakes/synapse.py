"""A real Synapse homeserver for the Matrix tests, started once per test session.

Nothing is installed at run time: `matrix-synapse` comes with the project's
`test` extra. The fixture writes a config into a temporary directory (SQLite,
127.0.0.1 only, a free port, the client listener only, rate limits raised,
no trusted key servers, a registration shared secret), starts
`python -m synapse.app.homeserver` as a subprocess (it generates its own
signing key on first start), waits — bounded — for `/_matrix/client/versions`,
and stops it with SIGTERM (then SIGKILL) at the end of the session.

    def test_something(synapse: SynapseServer) -> None:
        alice = synapse.register("alice", "alice-password")   # "@alice:localhost"

Users are registered through the shared-secret admin API
(`/_synapse/admin/v1/register`, an HMAC over a server nonce), so no extra
process runs per user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from nio import (
    AsyncClient,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)

__all__ = ["ELEMENT_PICKER", "FlakyProxy", "MatrixUser", "SynapseServer", "free_port", "synapse"]

SERVER_NAME = "localhost"
START_TIMEOUT = 30.0  # a cold start takes ~2 s here; the bound only catches a broken setup
STOP_TIMEOUT = 10.0
_HTTP_TIMEOUT = 10.0

# Synapse's defaults (rc_message 0.2/s, burst 10, …) make a bot that posts a card
# and three reactions hit M_LIMIT_EXCEEDED within one test (platforms.md §2.5).
_UNLIMITED = {"per_second": 1000, "burst_count": 1000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def homeserver_config(directory: Path, port: int, shared_secret: str) -> dict[str, Any]:
    """The whole homeserver.yaml, as a dict (written as JSON, which YAML reads)."""
    return {
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                # No federation resource: this server never talks to another.
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(directory / "log.config"),
        "media_store_path": str(directory / "media_store"),
        "signing_key_path": str(directory / "signing.key"),  # generated on first start
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": "test-macaroon-secret",
        "form_secret": "test-form-secret",
        "report_stats": False,
        "trusted_key_servers": [],  # never contact matrix.org
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "enable_registration": False,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "enable_metrics": False,
        "bcrypt_rounds": 4,  # test passwords need no real hashing cost
        "rc_message": _UNLIMITED,
        "rc_registration": _UNLIMITED,
        "rc_login": {
            "address": _UNLIMITED,
            "account": _UNLIMITED,
            "failed_attempts": _UNLIMITED,
        },
        "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
        "rc_joins_per_room": _UNLIMITED,
        "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
        "rc_room_creation": _UNLIMITED,
        "rc_admin_redaction": _UNLIMITED,
    }


def log_config(directory: Path) -> dict[str, Any]:
    """Warnings and worse to a file in the temp dir (shown when start-up fails)."""
    return {
        "version": 1,
        "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "plain",
                "filename": str(directory / "homeserver.log"),
            }
        },
        "root": {"level": "WARNING", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


class SynapseServer:
    """One Synapse subprocess in `directory`; `base_url` is its client API root."""

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server_name = SERVER_NAME
        self.shared_secret = "test-registration-secret"
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: Any = None
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("Synapse is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / "homeserver.yaml"
        config_path.write_text(
            json.dumps(homeserver_config(self.directory, self.port, self.shared_secret))
        )
        (self.directory / "log.config").write_text(json.dumps(log_config(self.directory)))
        began = time.monotonic()
        self._output = (self.directory / "stdout.log").open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(config_path)],
            cwd=self.directory,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "SYNAPSE_NO_TLS": "1"},
        )
        try:
            self._wait_until_up(began + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _wait_until_up(self, deadline: float) -> None:
        assert self._process is not None
        url = f"{self.base_url}/_matrix/client/versions"
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"Synapse exited with {self._process.returncode} during start-up:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Synapse did not answer {url} within {START_TIMEOUT:.0f} s:\n"
                        + self.log_tail()
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._output is not None:
            self._output.close()
            self._output = None

    def log_tail(self, chars: int = 4000) -> str:
        text = ""
        for name in ("stdout.log", "homeserver.log"):
            path = self.directory / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-chars:]
        return text

    # -- users ---------------------------------------------------------------

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def unique(self, prefix: str) -> str:
        """A localpart nobody used yet in this session (`duck-3`)."""
        return f"{prefix}-{next(self._ids)}"

    def register(
        self, localpart: str, password: str, *, admin: bool = False, displayname: str | None = None
    ) -> str:
        """Register a user with the shared secret; returns the full user id."""
        url = f"{self.base_url}/_synapse/admin/v1/register"
        with httpx.Client(timeout=_HTTP_TIMEOUT) as http:
            nonce = http.get(url).raise_for_status().json()["nonce"]
            # Synapse's MAC: the fields joined by NUL bytes, HMAC-SHA1 with the secret.
            message = "\x00".join((nonce, localpart, password, "admin" if admin else "notadmin"))
            mac = hmac.new(self.shared_secret.encode(), message.encode(), hashlib.sha1)
            body = {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
            if displayname:
                body["displayname"] = displayname
            response = http.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"registering {localpart} failed: {response.text}")
            return str(response.json()["user_id"])


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """One homeserver for the whole session (start-up ~2 s), stopped at the end."""
    server = SynapseServer(tmp_path_factory.mktemp("synapse"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class MatrixUser:
    """A person in the tests: a real matrix-nio client with a few helpers.

    Every event the user's syncs see is kept in `events` (raw dicts, each with
    its `room_id`), and `wait_for` syncs until one matches, within a bound.
    """

    def __init__(self, server: SynapseServer, user_id: str, password: str) -> None:
        self.server = server
        self.user_id = user_id
        self.password = password
        self.client = AsyncClient(server.base_url, user_id)
        self.events: list[dict[str, Any]] = []

    @property
    def qualified(self) -> str:
        return f"matrix:{self.user_id}"

    async def login(self) -> MatrixUser:
        response = await self.client.login(self.password, device_name="test")
        assert isinstance(response, LoginResponse), response
        await self.sync(0)
        self.events.clear()  # only what happens from now on
        return self

    async def close(self) -> None:
        await self.client.close()

    async def sync(self, timeout_ms: int = 500) -> None:
        response = await self.client.sync(timeout=timeout_ms)
        assert isinstance(response, SyncResponse), response
        for room_id, info in response.rooms.join.items():
            for event in info.timeline.events:
                self.events.append({**event.source, "room_id": room_id})

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        what: str = "an event",
        within: float = 20.0,
    ) -> dict[str, Any]:
        """The first event (seen so far or arriving) for which `predicate` is true."""
        deadline = time.monotonic() + within
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                seen = "\n".join(json.dumps(e)[:300] for e in self.events[-15:])
                raise AssertionError(f"{self.user_id} saw no {what} in {within:.0f} s:\n{seen}")
            await self.sync()

    async def create_room(
        self,
        invite: Sequence[str] = (),
        *,
        name: str | None = "test room",
        encrypted: bool = False,
        direct: bool = False,
    ) -> str:
        initial_state = []
        if encrypted:
            initial_state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        response = await self.client.room_create(
            name=None if direct else name,
            invite=list(invite),
            is_direct=direct,
            initial_state=initial_state,
        )
        assert isinstance(response, RoomCreateResponse), response
        return str(response.room_id)

    async def join(self, room_id: str) -> None:
        response = await self.client.join(room_id)
        assert isinstance(response, JoinResponse), response

    async def invite(self, room_id: str, user_id: str) -> None:
        response = await self.client.room_invite(room_id, user_id)
        assert isinstance(response, RoomInviteResponse), response

    async def send_event(self, room_id: str, kind: str, content: dict[str, Any]) -> str:
        response = await self.client.room_send(room_id, kind, content)
        assert isinstance(response, RoomSendResponse), response
        return str(response.event_id)

    async def say(
        self,
        room_id: str,
        body: str,
        *,
        mention: str | None = None,
        thread: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """An m.text message; `mention` adds a pill and m.mentions, `thread` a thread relation."""
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if mention:
            content["body"] = f"{mention}: {body}"
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = (
                f'<a href="https://matrix.to/#/{mention}">{mention}</a>: {body}'
            )
            content["m.mentions"] = {"user_ids": [mention]}
        if thread:
            content["m.relates_to"] = {
                "rel_type": "m.thread",
                "event_id": thread,
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": thread},
            }
        elif reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return await self.send_event(room_id, "m.room.message", content)

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        return await self.send_event(
            room_id,
            "m.reaction",
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}},
        )

    # -- as Element sends it ---------------------------------------------------
    # The shapes below follow Element Web (matrix-react-sdk's SendMessageComposer,
    # EditMessageComposer and the emoji picker): intentional mentions on every
    # message, thread replies that fall back to a reply to the thread's newest
    # event, rich replies with a quoted fallback, picker keys with U+FE0F.

    async def element_say(
        self,
        room_id: str,
        body: str,
        *,
        pills: Sequence[tuple[str, str]] = (),
        thread: str | None = None,
        reply_to: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """`pills` are (user id, display name) chips typed before `body`, as
        Element's composer builds them: the name in `body`, a matrix.to link in
        `formatted_body`, the ids in `m.mentions` (always present, maybe empty)."""
        plain = "".join(f"{name}: " if i == 0 else f"{name} " for i, (_, name) in enumerate(pills))
        html_pills = "".join(
            f'<a href="https://matrix.to/#/{user}">{name}</a>' + (": " if i == 0 else " ")
            for i, (user, name) in enumerate(pills)
        )
        mentioned = [user for user, _ in pills]
        content: dict[str, Any] = {"msgtype": "m.text", "body": plain + body}
        if pills:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = html_pills + html.escape(body, quote=False)
        if reply_to is not None:
            # A rich reply mentions the replied-to sender and quotes it (the
            # fallback older clients read); a thread reply does neither.
            sender = str(reply_to.get("sender"))
            if sender != self.user_id and sender not in mentioned:
                mentioned.append(sender)
            quoted = str((reply_to.get("content") or {}).get("body", "")).split("\n")
            fallback = "\n".join(
                [f"> <{sender}> {quoted[0]}"] + [f"> {line}" for line in quoted[1:]]
            )
            content["body"] = f"{fallback}\n\n{content['body']}"
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = (
                f'<mx-reply><blockquote><a href="https://matrix.to/#/{room_id}/'
                f'{reply_to["event_id"]}">In reply to</a> <a href="https://matrix.to/#/'
                f'{sender}">{sender}</a><br>{html.escape(quoted[0], quote=False)}'
                "</blockquote></mx-reply>"
                + content.get("formatted_body", html.escape(plain + body, quote=False))
            )
        content["m.mentions"] = {"user_ids": mentioned} if mentioned else {}
        if thread:
            relates: dict[str, Any] = {"rel_type": "m.thread", "event_id": thread}
            if reply_to is not None:
                relates |= {
                    "is_falling_back": False,
                    "m.in_reply_to": {"event_id": reply_to["event_id"]},
                }
            else:
                relates |= {
                    "is_falling_back": True,
                    "m.in_reply_to": {"event_id": self.latest_in_thread(room_id, thread)},
                }
            content["m.relates_to"] = relates
        elif reply_to is not None:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to["event_id"]}}
        content |= extra or {}
        return await self.send_event(room_id, "m.room.message", content)

    def latest_in_thread(self, room_id: str, root: str) -> str:
        """The thread's newest event this user has seen (Element's reply fallback target)."""
        latest = root
        for event in self.events:
            relates = (event.get("content") or {}).get("m.relates_to") or {}
            if (
                event.get("room_id") == room_id
                and relates.get("rel_type") == "m.thread"
                and relates.get("event_id") == root
            ):
                latest = str(event["event_id"])
        return latest

    async def element_react(self, room_id: str, event_id: str, name: str) -> str:
        """A reaction picked in Element's emoji picker, by shortcode (`white_check_mark`)."""
        return await self.react(room_id, event_id, ELEMENT_PICKER[name])

    async def element_edit(self, room_id: str, original: str, new_body: str) -> str:
        """An edit as Element's EditMessageComposer sends it: a `* ` body for
        clients without edits, the new text in `m.new_content`, mentions in both.
        An edit in a thread never repeats the thread relation (the server keeps it)."""
        new_content = {"msgtype": "m.text", "body": new_body, "m.mentions": {}}
        content: dict[str, Any] = {
            "msgtype": "m.text",
            "body": f" * {new_body}",
            "m.new_content": new_content,
            "m.mentions": {},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        }
        return await self.send_event(room_id, "m.room.message", content)

    async def element_start_dm(self, bot_id: str, first_message: str) -> tuple[str, str]:
        """Element's "start DM on first message": the room is created with the
        bot invited, and the first message is sent at once, before the bot joined.
        Returns (room id, event id of the first message)."""
        response = await self.client.room_create(
            invite=[bot_id],
            is_direct=True,
            preset=RoomPreset.trusted_private_chat,
        )
        assert isinstance(response, RoomCreateResponse), response
        room_id = str(response.room_id)
        event_id = await self.element_say(room_id, first_message)
        return room_id, event_id


# Reaction keys exactly as Element's emoji picker sends them: the `unicode` of
# emojibase-data 17's compact.json (as shipped by matrix-org/emojibase-bindings),
# which appends U+FE0F to every emoji that can take a variation selector.
ELEMENT_PICKER = {
    "white_check_mark": "\u2705\ufe0f",  # ✅
    "x": "\u274c\ufe0f",  # ❌
    "infinity": "\u267e\ufe0f",  # ♾️
    "+1": "\U0001f44d\ufe0f",  # 👍 (also Element's first quick reaction)
    "-1": "\U0001f44e\ufe0f",  # 👎
    "heavy_check_mark": "\u2714\ufe0f",  # ✔️
    "ballot_box_with_check": "\u2611\ufe0f",  # ☑️
    "heavy_multiplication_x": "\u2716\ufe0f",  # ✖️
    "negative_squared_cross_mark": "\u274e\ufe0f",  # ❎
}


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of the homeserver that the test can cut:
    `cut()` drops every open connection and every new one until `restore()`.
    It simulates a homeserver restart or a network outage for the bot only.
    `drop_requests(marker, n)` drops the connection of the next `n` requests
    whose bytes contain `marker` (e.g. `/messages?`): one endpoint failing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.down = False
        self.refused = 0  # connections dropped while down
        self._drop_marker: bytes | None = None
        self._drops_left = 0
        self.dropped = 0  # requests dropped by drop_requests
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), STOP_TIMEOUT)
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def cut(self) -> None:
        self.down = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    def drop_requests(self, marker: str, times: int) -> None:
        self._drop_marker, self._drops_left = marker.encode(), times

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self.down:  # cut while this connection was being set up: it must not get through
            self.refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for source, sink, upwards in ((reader, up_writer, True), (up_reader, writer, False)):
            pump = asyncio.get_running_loop().create_task(self._pump(source, sink, upwards))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, upwards: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if upwards and self._drops_left > 0 and self._drop_marker in data:
                    self._drops_left -= 1
                    self.dropped += 1
                    break  # the request never reaches the homeserver; the finally drops both
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(sink)
            sink.transport.abort()
