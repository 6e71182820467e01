"""A person using Element, for the Matrix tests: matrix-js-sdk (the library Element is
built on) run by Node.js from tests/element/client.mjs, driven over JSON lines.

    async def test_x(element: OpenElement, synapse: SynapseServer) -> None:
        alice = await element(synapse.register("alice-1", "pw"), "pw")
        room = await alice.create_room([bot_id])
        question = await alice.say(room, "what does the duck say?", mention=bot_id)
        answer = await alice.wait_for(lambda e: ..., "the answer")

The pinned packages (tests/element/package-lock.json) are installed once per test
session with `npm ci` into tests/element/node_modules, under a file lock so parallel
runs do not collide, and skipped when that lock file was already installed. npm keeps
its cache, so later installs work offline. Without Node.js 20+ and npm the tests that
need this client fail with a message saying so; they never skip.

Every event the client syncs arrives here as it happens (`events`), so `wait_for` with a
Python predicate waits on them without polling; `wait_for` with a dict asks the client to
match the event as a subset (see client.mjs). Each call is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.synapse import SynapseServer

__all__ = ["ElementUser", "OpenElement", "element", "element_packages", "install_packages"]

ELEMENT_DIR = Path(__file__).parent / "element"
CLIENT = ELEMENT_DIR / "client.mjs"
NODE_MODULES = ELEMENT_DIR / "node_modules"
STAMP = NODE_MODULES / ".ducklm-installed"  # the lock file's hash, written after npm ci
MIN_NODE = 20
INSTALL_TIMEOUT = 300.0  # a cold install takes a few seconds; the bound catches a hung npm
START_TIMEOUT = 30.0  # login and the first sync
# A send the SDK's scheduler retries (a dropped connection on a loaded machine) takes up
# to 2+4+8+16 s before it gives up: wait past that.
REQUEST_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

Predicate = Callable[[dict[str, Any]], bool]


class NodeMissing(RuntimeError):
    """Node.js or npm is not installed (or too old) on this machine."""


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise NodeMissing(
            "the Element tests need Node.js "
            f"{MIN_NODE}+ and npm (Debian: apt-get install nodejs npm; .ci/run installs "
            "them when it runs as root)"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    found = re.match(r"v(\d+)\.", version)
    if not found or int(found.group(1)) < MIN_NODE:
        raise NodeMissing(f"the Element tests need Node.js {MIN_NODE}+, found {version}")
    return node, npm


def _lock_hash() -> str:
    return hashlib.sha256((ELEMENT_DIR / "package-lock.json").read_bytes()).hexdigest()


def install_packages() -> str:
    """Installs tests/element's pinned packages unless already there; returns `node`."""
    node, npm = _tools()
    wanted = _lock_hash()
    # One lock per checkout, outside the tree (nothing to git-ignore): two pytest runs
    # on the same checkout install once, the second waits and finds the stamp.
    tag = hashlib.sha256(str(ELEMENT_DIR.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"ducklm-element-{tag}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if STAMP.exists() and STAMP.read_text().strip() == wanted:
                return node
            # --prefer-offline: from npm's cache when it has the tarballs, so a second
            # install (or a fresh clone on the same machine) needs no network.
            command = [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"]
            try:
                result = subprocess.run(
                    command,
                    cwd=ELEMENT_DIR,
                    capture_output=True,
                    text=True,
                    timeout=INSTALL_TIMEOUT,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired as timeout:
                raise RuntimeError(
                    f"{' '.join(command)} took over {INSTALL_TIMEOUT:.0f} s"
                ) from timeout
            if result.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command)} in {ELEMENT_DIR} failed ({result.returncode}):\n"
                    + (result.stdout + result.stderr)[-4000:]
                )
            STAMP.write_text(wanted + "\n")
            return node
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ElementUser:
    """One running client.mjs: a logged-in person, with async methods mirroring its
    commands. `events` holds every event its syncs saw since it started."""

    def __init__(self, process: asyncio.subprocess.Process, user_id: str, password: str) -> None:
        self.process = process
        self.user_id = user_id
        self.password = password
        self.device_id = ""
        self.events: list[dict[str, Any]] = []
        # Encrypted events this client could not decrypt (with ELEMENT_CRYPTO), as
        # {"event_id", "room_id", "reason"}; retried by the SDK as keys arrive.
        self.undecryptable: list[dict[str, Any]] = []
        self._ids = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Condition()
        self._stderr: deque[str] = deque(maxlen=60)
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]
        self.stopped = False

    @property
    def qualified(self) -> str:
        return f"matrix:{self.user_id}"

    # -- process plumbing -------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        node: str,
        homeserver: str,
        user_id: str,
        password: str,
        *,
        crypto: bool = False,
        only_signed: bool = False,
        cross_sign: bool = True,
    ) -> ElementUser:
        """`crypto`: Element's end-to-end encryption (Rust crypto, own device
        cross-signed unless not `cross_sign`); `only_signed`: also Element's
        "exclude insecure devices"."""
        env = {
            **os.environ,
            "ELEMENT_HOMESERVER": homeserver,
            "ELEMENT_USER_ID": user_id,
            "ELEMENT_PASSWORD": password,
            "ELEMENT_CRYPTO": "1" if crypto or only_signed else "0",
            "ELEMENT_ISOLATION": "only_signed" if only_signed else "all",
            "ELEMENT_CROSS_SIGN": "1" if cross_sign else "0",
        }
        process = await asyncio.create_subprocess_exec(
            node,
            str(CLIENT),
            cwd=ELEMENT_DIR,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,  # one line per event; a long event must fit
        )
        user = cls(process, user_id, password)
        try:
            ready = await asyncio.wait_for(asyncio.shield(user._ready), START_TIMEOUT)
        except BaseException:
            await user.stop()
            raise
        user.device_id = str(ready.get("device_id") or "")
        return user

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    self._stderr.append(f"(stdout, not JSON) {line!r}")
                    continue
                if "event" in message:
                    async with self._changed:
                        self.events.append(message["event"])
                        self._changed.notify_all()
                elif "undecryptable" in message:
                    async with self._changed:
                        self.undecryptable.append(message["undecryptable"])
                        self._changed.notify_all()
                elif message.get("ready"):
                    if not self._ready.done():
                        self._ready.set_result(message)
                else:
                    future = self._pending.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        if message.get("ok"):
                            future.set_result(message.get("result"))
                        else:
                            future.set_exception(ElementError(str(message.get("error"))))
        finally:
            code = await self.process.wait()
            with contextlib.suppress(TimeoutError):  # its last words, for the message
                await asyncio.wait_for(asyncio.shield(self._readers[1]), STOP_TIMEOUT)
            failure = ElementError(f"the Element client exited ({code}):\n{self.stderr_tail()}")
            if not self._ready.done():
                self._ready.set_exception(failure)
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)
            self._pending.clear()
            async with self._changed:
                self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self._stderr.append(line.decode(errors="replace").rstrip())

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    async def request(self, cmd: str, *, within: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        """Sends one command and returns its result within `within` seconds; raises
        ElementError on failure."""
        if self.process.returncode is not None or self.process.stdin is None:
            raise ElementError(f"the Element client is not running:\n{self.stderr_tail()}")
        self._ids += 1
        request_id = self._ids
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        line = json.dumps({"id": request_id, "cmd": cmd, **args}) + "\n"
        self.process.stdin.write(line.encode())
        await self.process.stdin.drain()
        try:
            return await asyncio.wait_for(future, within)
        except TimeoutError:
            raise ElementError(
                f"{cmd} got no answer within {within:.0f} s; client log:\n{self.stderr_tail()}"
            ) from None
        finally:
            self._pending.pop(request_id, None)

    async def stop(self) -> None:
        """Stops the client (a `stop` command, then SIGTERM, then SIGKILL); idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.returncode is None:
            with contextlib.suppress(ElementError, ConnectionError, OSError):
                await self.request("stop", within=STOP_TIMEOUT)
            with contextlib.suppress(OSError):
                if self.process.stdin is not None:
                    self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()
                try:
                    await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await self.process.wait()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(reader, STOP_TIMEOUT)

    # -- what a person does ---------------------------------------------------------------

    async def create_room(
        self, invite: Iterable[str] = (), *, name: str | None = None, encrypted: bool = False
    ) -> str:
        """A private room from Element's dialog; `invite` is invited afterwards."""
        result = await self.request(
            "create_room", invite=list(invite), name=name, encrypted=encrypted
        )
        return str(result["room_id"])

    async def start_dm(
        self, user_id: str, text: str, *, encrypted: bool = False
    ) -> tuple[str, str]:
        """Element's "start DM on first message": the room and the first message at once, before
        the other side joined; returns (room id, event id of the message)."""
        result = await self.request("start_dm", user_id=user_id, text=text, encrypted=encrypted)
        return str(result["room_id"]), str(result["event_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request("invite", room_id=room_id, user_id=user_id)

    async def join(self, room_id: str) -> None:
        await self.request("join", room_id=room_id)

    async def say(
        self,
        room_id: str,
        text: str,
        *,
        mention: str | Iterable[str] | None = None,
        thread: str | None = None,
        reply_to: str | None = None,
        fallback: bool = False,
        emote: bool = False,
    ) -> str:
        """A message from the composer: `mention` puts pills in front; `thread` sends it
        in that thread (is_falling_back, m.in_reply_to the latest reply); `reply_to`
        makes it a reply (with the legacy quoted fallback when `fallback`)."""
        result = await self.request(
            "send",
            room_id=room_id,
            text=text,
            pills=_users(mention),
            thread=thread,
            reply_to=reply_to,
            fallback=fallback,
            emote=emote,
        )
        return str(result["event_id"])

    async def edit(
        self, room_id: str, event_id: str, text: str, *, mention: str | Iterable[str] | None = None
    ) -> str:
        """Element's edit of `event_id`: "* text" and m.new_content."""
        result = await self.request(
            "edit", room_id=room_id, event_id=event_id, text=text, pills=_users(mention)
        )
        return str(result["event_id"])

    async def react(
        self, room_id: str, event_id: str, emoji: str | None = None, *, key: str | None = None
    ) -> str:
        """`emoji` picked in Element's picker (sent as the picker sends it, e.g. ✅ with
        U+FE0F); or exactly `key`."""
        args: dict[str, Any] = {"room_id": room_id, "event_id": event_id}
        if key is not None:
            args["key"] = key
        else:
            args["emoji"] = emoji
        result = await self.request("react", **args)
        return str(result["event_id"])

    async def enable_encryption(self, room_id: str) -> None:
        """Room settings → Security → Encrypted, in a room that was not."""
        await self.request("enable_encryption", room_id=room_id)

    async def device_status(self, user_id: str, device_id: str) -> dict[str, Any]:
        """How this client's crypto sees the device: known, signed_by_owner,
        cross_signing_verified, locally_verified."""
        return dict(await self.request("device_status", user_id=user_id, device_id=device_id))

    async def refresh_devices(self, user_id: str) -> None:
        await self.request("refresh_devices", user_id=user_id)

    async def room_events(self, room_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The room's events as the server has them, oldest first."""
        return list(await self.request("events", room_id=room_id, limit=limit))

    async def wait_for(
        self,
        match: Predicate | dict[str, Any],
        what: str = "an event",
        within: float = 20.0,
    ) -> dict[str, Any]:
        """The first event (seen so far or arriving) matching a predicate, or a subset
        pattern matched by the client itself; fails after `within` seconds."""
        if isinstance(match, dict):
            try:
                event = await self.request(
                    "wait_for", pattern=match, timeout_ms=int(within * 1000), within=within + 10
                )
            except ElementError as error:
                raise AssertionError(f"{self.user_id} saw no {what}: {error}") from None
            return dict(event)
        deadline = time.monotonic() + within
        checked = 0
        async with self._changed:
            while True:
                for event in self.events[checked:]:
                    if match(event):
                        return event
                checked = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.returncode is not None:
                    seen = "\n".join(json.dumps(e)[:300] for e in self.events[-15:])
                    raise AssertionError(
                        f"{self.user_id} saw no {what} in {within:.0f} s:\n{seen}\n"
                        f"client log:\n{self.stderr_tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)


class ElementError(RuntimeError):
    """The client answered a command with an error, or is not running."""


def _users(mention: str | Iterable[str] | None) -> list[str]:
    if mention is None:
        return []
    if isinstance(mention, str):
        return [mention]
    return list(mention)


OpenElement = Callable[..., Awaitable[ElementUser]]


@pytest.fixture(scope="session")
def element_packages() -> str:
    """Installs the pinned Node packages once per session; the path of `node`.
    Fails (never skips) when Node.js or npm is missing."""
    try:
        return install_packages()
    except NodeMissing as missing:
        pytest.fail(str(missing), pytrace=False)


@pytest_asyncio.fixture
async def element(element_packages: str, synapse: SynapseServer) -> AsyncIterator[OpenElement]:
    """Logs people in with the Element client; every client started is stopped after."""
    started: list[ElementUser] = []

    async def open_user(
        user_id: str,
        password: str,
        *,
        homeserver: str | None = None,
        crypto: bool = False,
        only_signed: bool = False,
        cross_sign: bool = True,
    ) -> ElementUser:
        user = await ElementUser.start(
            element_packages,
            homeserver or synapse.base_url,
            user_id,
            password,
            crypto=crypto,
            only_signed=only_signed,
            cross_sign=cross_sign,
        )
        started.append(user)
        return user

    try:
        yield open_user
    finally:
        for user in reversed(started):
            await user.stop()
