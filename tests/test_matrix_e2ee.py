"""DuckLM in end-to-end encrypted Matrix rooms (issue #18): the real bot (matrix-nio with
vodozemac) against the real Synapse, and people played by matrix-js-sdk with its Rust
crypto (tests/element/client.mjs with ELEMENT_CRYPTO=1: the crypto Element uses, the
person's device cross-signed at login as Element does).

What is asserted on the wire is read back from the server (/messages, raw): the bot's
answers there are m.room.encrypted; what people see is the decrypted event.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from nio import AsyncClient, AsyncClientConfig, JoinResponse, LoginResponse
from nio.crypto.sessions import OutboundGroupSession
from nio.store import SqliteMemoryStore
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import sign_json, verify_signed_json

from bot.backend import PlatformStartError
from bot.cli import main as cli_main
from bot.matrix import events as events_module
from bot.matrix.crosssign import CrossSigningKeys, signed_key
from bot.matrix.crypto import CRYPTO_DIR, crypto_status
from bot.matrix.events import AUDIT_EVENT
from bot.matrix.reset import reset_crypto
from bot.matrix.state import MatrixState, Session
from bot.matrix.trust import cross_signed_devices
from tests import element_client, test_matrix
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.element_client import ElementUser, OpenElement
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.synapse import MatrixUser, SynapseServer
from tests.test_matrix import (
    NO_ACTIONS,
    PASSWORD,
    StartBot,
    body,
    bot_notice,
    content_answers,
    edit_of,
    joined,
    poll,
)

pytestmark = pytest.mark.timeout(150)

bots = test_matrix.bots
duck = test_matrix.duck
people = test_matrix.people
element_packages = element_client.element_packages
element = element_client.element

# Rust crypto's first key exchange on a loaded 2-core box takes a few seconds.
E2EE_WAIT = 60.0


@pytest.fixture
async def alice(element: OpenElement, people: dict[str, str]) -> ElementUser:
    """The approver, in Element with encryption (own device cross-signed)."""
    return await element(people["alice"], PASSWORD, crypto=True)


async def encrypted_room(owner: ElementUser, duck: str) -> str:
    """A room as Element creates it by default (encrypted), with the bot and a third
    member's seat taken by nobody: two members, so every message is for the bot."""
    room = await owner.create_room([duck], encrypted=True)
    await owner.wait_for(joined(duck, room), "the bot joining", within=E2EE_WAIT)
    return room


def wire_event(events: list[dict[str, Any]], event_id: str) -> dict[str, Any]:
    (found,) = [e for e in events if e.get("event_id") == event_id]
    return found


async def test_a_question_in_an_encrypted_room_is_answered_encrypted(
    bots: StartBot,
    alice: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "ducklm.matrix")
    bot = await bots()
    assert bot.platform.connection.encrypting
    content_answers(model_server)
    room = await encrypted_room(alice, duck)

    question = await alice.say(room, "what does the duck say?")
    answer = await alice.wait_for(
        bot_notice(duck, question, "answer to: what does the duck say?"),
        "the decrypted answer",
        within=E2EE_WAIT,
    )
    assert answer["content"]["msgtype"] == "m.notice"

    on_the_wire = await alice.room_events(room)
    assert wire_event(on_the_wire, question)["type"] == "m.room.encrypted"
    sent = wire_event(on_the_wire, answer["event_id"])
    assert sent["type"] == "m.room.encrypted"
    assert "answer to" not in str(sent["content"])
    # The thread relation stays in the clear, as Element's does (research/matrix-e2ee.md).
    assert sent["content"]["m.relates_to"]["event_id"] == question
    # No "I can't read encrypted messages" notice any more.
    assert not [e for e in alice.events if "can't read" in str(e.get("content"))]

    # Trust on first use: the log says whose devices the bot now encrypts for.
    assert any(
        f"device list of {alice.user_id} changed" in r.getMessage()
        and alice.device_id in r.getMessage()
        for r in caplog.records
    )
    # The crypto store is beside the bot's state, private to it.
    store = bot.runtime.settings.matrix_state_dir / CRYPTO_DIR
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    files = [p for p in store.iterdir() if p.is_file()]
    assert any(p.suffix == ".db" for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files


async def device_status_of(
    person: ElementUser, user_id: str, device_id: str, within: float = E2EE_WAIT
) -> dict[str, Any]:
    """How the person's client sees the device once it knows it cross-signed (the SDK
    can answer before its own view has the signature: ask again, to a deadline)."""
    deadline = time.monotonic() + within
    while True:
        status = await person.device_status(user_id, device_id)
        if status.get("signed_by_owner") or time.monotonic() > deadline:
            return status
        await person.refresh_devices(user_id)
        await asyncio.sleep(0.5)


async def test_the_bot_cross_signs_its_device_and_talks_to_an_only_signed_client(
    bots: StartBot,
    synapse: SynapseServer,
    element: OpenElement,
    people: dict[str, str],
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """Element with "exclude insecure devices" (MSC4153) shares room keys only with
    devices cross-signed by their owner and reads only messages from such devices."""
    bot = await bots()
    device = bot.platform.device_id
    assert device
    strict = await element(people["alice"], PASSWORD, only_signed=True)
    content_answers(model_server)
    room = await encrypted_room(strict, duck)

    status = await device_status_of(strict, duck, device)
    assert status["signed_by_owner"] is True, status
    assert status["locally_verified"] is False  # nobody verified it by hand: not needed
    await assert_full_cross_signing_set(bot, synapse, duck)

    question = await strict.say(room, "are you signed?")
    await strict.wait_for(
        bot_notice(duck, question, "answer to: are you signed?"),
        "the answer, readable in only-signed mode",
        within=E2EE_WAIT,
    )
    # A first failure is retried by the SDK as keys arrive: what stays unread counts.
    assert not unread(strict, room), unread(strict, room)


async def assert_full_cross_signing_set(bot: Any, synapse: SynapseServer, duck: str) -> None:
    """The account's own /keys/query (only the owner sees its user-signing key) has
    a master, a self-signing and a user-signing key, the last two signed by the master."""
    token = bot.platform.connection.require_client().access_token
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{synapse.base_url}/_matrix/client/v3/keys/query",
            json={"device_keys": {duck: []}},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200
            own = await response.json()
    master = own["master_keys"][duck]
    ((master_id, master_public),) = master["keys"].items()
    raw = base64.b64decode(master_public + "=" * (-len(master_public) % 4))  # unpadded
    verify_key = decode_verify_key_bytes(master_id, raw)
    for kind, usage in (
        ("self_signing_keys", "self_signing"),
        ("user_signing_keys", "user_signing"),
    ):
        key = own[kind][duck]
        assert key["usage"] == [usage], key
        verify_signed_json(key, duck, verify_key)  # raises unless the master signed it


def unread(person: ElementUser, room: str) -> list[dict[str, Any]]:
    """Events of `room` the person's client failed to decrypt and never decrypted
    after (other rooms of the account hold history this new device has no keys for)."""
    read = {e.get("event_id") for e in person.events}
    return [u for u in person.undecryptable if u["room_id"] == room and u["event_id"] not in read]


async def test_cards_in_an_encrypted_room_decide_by_reaction_and_by_reply_across_a_restart(
    bots: StartBot, alice: ElementUser, duck: str, model_server: FakeModelServer, tmp_path: Path
) -> None:
    """The card is encrypted, the ✅ on it is not (Matrix sends reactions in the clear;
    the relation decides); a restart keeps the device and its sessions, so the old
    card still works, by an encrypted `approve` in its thread."""
    first = await bots()
    device = first.platform.device_id
    room = await encrypted_room(alice, duck)

    model_server.reply(ACTION, Text(directive(shell("touch one.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Created one.txt."))
    question = await alice.say(room, "please run touch one.txt")
    card = await alice.wait_for(
        bot_notice(duck, question, "Approval needed"), "the card", within=E2EE_WAIT
    )
    reaction = await alice.react(room, card["event_id"], "✅")
    await alice.wait_for(edit_of(card["event_id"], "Approved"), "the card's edit")
    await alice.wait_for(bot_notice(duck, question, "Created one.txt"), "the answer")
    assert (tmp_path / "workspace" / "one.txt").exists()

    model_server.reply(ACTION, Text(directive(shell("touch two.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Created two.txt."))
    later = await alice.say(room, "please run touch two.txt")
    card_two = await alice.wait_for(
        bot_notice(duck, later, "Approval needed"), "the second card", within=E2EE_WAIT
    )
    await first.stop()

    second = await bots()
    assert second.platform.device_id == device  # the same device, its store reloaded
    assert second.platform.connection.encrypting
    reply = await alice.say(room, "approve", thread=later)
    await alice.wait_for(edit_of(card_two["event_id"], "Approved"), "the old card's edit")
    await alice.wait_for(bot_notice(duck, later, "Created two.txt"), "the answer after it")
    assert (tmp_path / "workspace" / "two.txt").exists()

    wire = await alice.room_events(room)
    assert wire_event(wire, card["event_id"])["type"] == "m.room.encrypted"
    assert wire_event(wire, card_two["event_id"])["type"] == "m.room.encrypted"
    assert wire_event(wire, reaction)["type"] == "m.reaction"
    assert wire_event(wire, reply)["type"] == "m.room.encrypted"
    edits = [e for e in wire if e.get("sender") == duck and e["type"] == "m.room.message"]
    assert not [e for e in edits if "Approved" in str(e)]  # the edits were encrypted too

    audit = {
        e.payload["event_id"]: e.payload
        for e in await second.runtime.stores.events.list_by_type(AUDIT_EVENT)
    }
    assert audit[question]["encrypted"] is True
    assert audit[question]["device_id"] == alice.device_id
    assert audit[reaction]["encrypted"] is False  # the ✅: in the clear, decided by relation
    assert audit[reply]["encrypted"] is True
    assert audit[reply]["device_id"] == alice.device_id


async def test_a_room_that_turns_encryption_on_after_the_bot_joined(
    bots: StartBot, alice: ElementUser, duck: str, model_server: FakeModelServer
) -> None:
    await bots()
    content_answers(model_server)
    room = await alice.create_room([duck])  # not encrypted at first
    await alice.wait_for(joined(duck, room), "the bot joining", within=E2EE_WAIT)
    clear = await alice.say(room, "in the clear?")
    await alice.wait_for(bot_notice(duck, clear, "answer to: in the clear?"), "the clear answer")

    await alice.enable_encryption(room)
    # Element encrypts once its sync has shown the room's new encryption state.
    await alice.wait_for({"room_id": room, "type": "m.room.encryption"}, "the encryption state")
    secret = await alice.say(room, "and now?")
    answer = await alice.wait_for(
        bot_notice(duck, secret, "answer to: and now?"), "the encrypted answer", within=E2EE_WAIT
    )
    wire = await alice.room_events(room)
    assert wire_event(wire, secret)["type"] == "m.room.encrypted"
    assert wire_event(wire, answer["event_id"])["type"] == "m.room.encrypted"
    # Nothing said "I can't read encrypted messages" when encryption came on.
    assert not [e for e in alice.events if "can't read" in str(e.get("content"))]


async def test_a_message_the_bot_cannot_decrypt_gets_one_notice_in_its_thread(
    bots: StartBot,
    alice: ElementUser,
    duck: str,
    synapse: SynapseServer,
    people: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message whose room key never reaches the bot (here: a made-up Megolm session,
    sent raw by a plain client) is tried again as keys come in, then answered once."""
    monkeypatch.setattr(events_module, "UNDECRYPTABLE_WAIT", 3.0)  # the wait, not the logic
    bot = await bots()
    room = await encrypted_room(alice, duck)
    bob = await MatrixUser(synapse, people["bob"], PASSWORD).login()
    try:
        await alice.invite(room, bob.user_id)
        await bob.join(room)
        await alice.wait_for(joined(bob.user_id, room), "bob joining")
        lost = await bob.send_event(room, "m.room.encrypted", made_up_megolm())
        notice = await alice.wait_for(
            bot_notice(duck, lost, "could not decrypt"), "the notice", within=E2EE_WAIT
        )
        assert "did not get its key" in body(notice)
        assert bot.platform.device_id in body(notice)  # names the device to allow or verify
        await bob.send_event(room, "m.room.encrypted", made_up_megolm())
        # Both retries over: no message waits for its key any more.
        await poll(lambda: not bot.platform.events._undecryptable, "the retries to end")
    finally:
        await bob.close()
    notices = [
        e
        for e in await alice.room_events(room)
        if e.get("sender") == duck and e.get("type") in ("m.room.encrypted", "m.room.message")
    ]
    # Once per room per interval, not once per message (nor a room of notices).
    assert len(notices) == 1, notices


def made_up_megolm() -> dict[str, Any]:
    """An m.room.encrypted content of a Megolm session nobody shared."""
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
        "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
        "session_id": secrets.token_urlsafe(32),
        "device_id": "NOSUCHDEVICE",
    }


async def test_reset_crypto_starts_over_with_a_new_cross_signed_device(
    bots: StartBot, alice: ElementUser, duck: str, model_server: FakeModelServer
) -> None:
    first = await bots()
    old_device = first.platform.device_id
    settings = first.runtime.settings
    await first.stop()

    said = await reset_crypto(settings)
    assert any("deleted the crypto store" in line for line in said), said
    assert any(f"deleted device {old_device}" in line for line in said), said
    assert not (settings.matrix_state_dir / CRYPTO_DIR).exists()

    second = await bots()
    new_device = second.platform.device_id
    assert new_device and new_device != old_device
    content_answers(model_server)
    room = await encrypted_room(alice, duck)
    status = await device_status_of(alice, duck, new_device)
    assert status["signed_by_owner"] is True, status  # the replaced keys sign the new one
    question = await alice.say(room, "who are you now?")
    await alice.wait_for(
        bot_notice(duck, question, "answer to: who are you now?"), "the answer", within=E2EE_WAIT
    )
    gone = await alice.device_status(duck, str(old_device))
    assert gone["known"] is False  # the old device is no longer listed


async def test_trust_cross_signed_shares_keys_only_with_cross_signed_devices(
    bots: StartBot,
    alice: ElementUser,
    element: OpenElement,
    people: dict[str, str],
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """DUCKLM_MATRIX_TRUST=cross-signed: alice's cross-signed device reads the answer;
    bob's device, which he never cross-signed, gets no room key for it."""
    await bots(matrix_trust="cross-signed")
    bob = await element(people["bob"], PASSWORD, crypto=True, cross_sign=False)
    content_answers(model_server)
    room = await alice.create_room([duck, bob.user_id], encrypted=True)
    await bob.wait_for({"room_id": room, "type": "m.room.member", "state_key": bob.user_id})
    await bob.join(room)
    await alice.wait_for(joined(duck, room), "the bot joining", within=E2EE_WAIT)
    await alice.wait_for(joined(bob.user_id, room), "bob joining")

    question = await alice.say(room, "for signed eyes only?", mention=duck)
    answer = await alice.wait_for(
        bot_notice(duck, question, "answer to: for signed eyes only?"),
        "the answer, for alice",
        within=E2EE_WAIT,
    )
    await poll(
        lambda: answer["event_id"] in {u["event_id"] for u in bob.undecryptable},
        "bob failing to decrypt the answer",
    )
    assert answer["event_id"] not in {e.get("event_id") for e in bob.events}


async def test_a_changed_store_passphrase_stops_the_start_with_a_clear_error(
    bots: StartBot, duck: str
) -> None:
    first = await bots(matrix_store_passphrase="one passphrase")
    device = first.platform.device_id
    await first.stop()
    with pytest.raises(PlatformStartError, match="MATRIX_STORE_PASSPHRASE"):
        await bots(matrix_store_passphrase="another one")
    # Nothing was overwritten: the right passphrase opens the same device again.
    again = await bots(matrix_store_passphrase="one passphrase")
    assert again.platform.device_id == device
    assert again.platform.connection.encrypting


# -- without a homeserver --------------------------------------------------------------


def test_encryption_off_says_why(tmp_path: Path) -> None:
    off = crypto_status(make_settings(tmp_path, "http://127.0.0.1:9", matrix_encryption=False))
    assert not off.enabled and "DUCKLM_MATRIX_ENCRYPTION" in off.reason
    on = crypto_status(make_settings(tmp_path, "http://127.0.0.1:9"))
    assert on.enabled, on.reason  # vodozemac is a dependency: it loads here


def test_only_a_valid_signature_chain_makes_a_device_cross_signed() -> None:
    """device <- self-signing key <- master key, each signature checked: a device
    signed by a self-signing key the master did not sign, or with a signature over
    other keys, is not cross-signed."""
    user = "@alice:example.org"
    keys = CrossSigningKeys.generate()
    device_keys = {
        "user_id": user,
        "device_id": "GOOD",
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {"ed25519:GOOD": "x" * 43, "curve25519:GOOD": "y" * 43},
    }
    good = sign_json(dict(device_keys), user, keys.self_signing.key)
    tampered = {**good, "device_id": "EVIL", "keys": {"ed25519:EVIL": "z" * 43}}
    unsigned = {**device_keys, "device_id": "PLAIN"}
    query = {
        "master_keys": {user: signed_key(user, keys.master, "master")},
        "self_signing_keys": {
            user: signed_key(user, keys.self_signing, "self_signing", by=keys.master)
        },
        "device_keys": {user: {"GOOD": good, "EVIL": tampered, "PLAIN": unsigned}},
    }
    assert cross_signed_devices(query, user) == {"GOOD"}

    stranger = CrossSigningKeys.generate()  # a self-signing key the master never signed
    forged = dict(query)
    forged["self_signing_keys"] = {
        user: signed_key(user, keys.self_signing, "self_signing", by=stranger.master)
    }
    assert cross_signed_devices(forged, user) == set()
    assert cross_signed_devices({"device_keys": query["device_keys"]}, user) == set()


async def test_an_encrypted_dm_started_on_the_first_message_is_answered(
    bots: StartBot, alice: ElementUser, duck: str, model_server: FakeModelServer
) -> None:
    """Element's new DM: encrypted, the first message sent (and its key shared with the
    invited bot's device) before the bot has joined."""
    await bots()
    content_answers(model_server)
    room, hello = await alice.start_dm(duck, "hello duck, encrypted?", encrypted=True)
    answer = await alice.wait_for(
        bot_notice(duck, hello, "answer to: hello duck, encrypted?"),
        "the answer to the first message",
        within=E2EE_WAIT,
    )
    wire = await alice.room_events(room)
    assert wire_event(wire, hello)["type"] == "m.room.encrypted"
    assert wire_event(wire, answer["event_id"])["type"] == "m.room.encrypted"


async def test_in_an_encrypted_thread_the_bot_reads_the_history_and_hints_at_edits(
    bots: StartBot, alice: ElementUser, duck: str, model_server: FakeModelServer
) -> None:
    """The thread so far (fetched from the server, encrypted) is decrypted for the
    model, and an edit of an answered question (its original fetched, encrypted)
    gets the one hint, as in a clear room."""
    await bots()
    content_answers(model_server)
    room = await encrypted_room(alice, duck)
    question = await alice.say(room, "what is the first thing?")
    answer = await alice.wait_for(
        bot_notice(duck, question, "answer to: what is the first thing?"),
        "the answer",
        within=E2EE_WAIT,
    )
    follow_up = await alice.say(room, "and the second?", thread=question)
    await alice.wait_for(bot_notice(duck, question, "answer to: and the second?"), "the reply")
    asked = [r for r in model_server.requests_for(THINKER) if "and the second?" in str(r.body)]
    history = str(asked[0].body["messages"])
    assert "what is the first thing?" in history
    assert body(answer) in history  # the bot's own encrypted answer, as the assistant's turn

    await alice.edit(room, follow_up, "and the third?")
    hint = await alice.wait_for(
        lambda e: bot_notice(duck, question)(e) and "edit" in body(e).lower(), "the edit hint"
    )
    assert "not run again" in body(hint)


async def test_a_message_whose_key_comes_late_is_answered_when_it_arrives(
    bots: StartBot,
    alice: ElementUser,
    duck: str,
    synapse: SynapseServer,
    people: dict[str, str],
    model_server: FakeModelServer,
) -> None:
    """A sender whose client sends the message before the room key (here: matrix-nio
    with vodozemac, told to share its Megolm session only once the bot has failed to
    decrypt): the bot retries as the key arrives and answers; no "could not decrypt"."""
    bot = await bots()
    content_answers(model_server)
    room = await encrypted_room(alice, duck)
    config = AsyncClientConfig(store=SqliteMemoryStore, encryption_enabled=True)
    late = AsyncClient(synapse.base_url, people["bob"], config=config)
    try:
        assert isinstance(await late.login(PASSWORD, device_name="late sharer"), LoginResponse)
        await late.keys_upload()
        await alice.invite(room, people["bob"])
        assert isinstance(await late.join(room), JoinResponse)
        await late.sync(timeout=0, full_state=True)
        await late.joined_members(room)

        # A Megolm session nobody has the key of yet, and a message in it.
        assert late.olm is not None
        late.olm.create_outbound_group_session(room)
        # The session as it is before its first message (index 0): what it shares later.
        before = late.olm.outbound_group_sessions[room].pickle("")
        late.olm.outbound_group_sessions[room].shared = True  # let it encrypt first
        payload = {
            "type": "m.room.message",
            "content": {
                "msgtype": "m.text",
                "body": f"{duck}: did my key come?",
                "m.mentions": {"user_ids": [duck]},
            },
        }
        encrypted = late.olm.group_encrypt(room, payload)
        message = await send_raw(late, room, "m.room.encrypted", encrypted)
        await poll(
            lambda: message in bot.platform.events._undecryptable, "the bot waiting for the key"
        )

        # Now the key: the session is shared with the room's devices (the bot's too).
        late.olm.outbound_group_sessions[room] = OutboundGroupSession.from_pickle(before, "")
        await late.keys_query()
        await late.share_group_session(room, ignore_unverified_devices=True)
        await alice.wait_for(
            bot_notice(duck, message, "answer to: did my key come?"),
            "the answer once the key came",
            within=E2EE_WAIT,
        )
    finally:
        await late.close()
    assert not [e for e in alice.events if "could not decrypt" in str(e.get("content"))]


async def send_raw(client: AsyncClient, room: str, kind: str, content: dict[str, Any]) -> str:
    """PUT /send as it is (nio's room_send would encrypt an encrypted room's event again)."""
    url = (
        f"{client.homeserver}/_matrix/client/v3/rooms/{quote(room)}/send/{kind}/"
        f"{secrets.token_hex(8)}"
    )
    headers = {"Authorization": f"Bearer {client.access_token}"}
    async with aiohttp.ClientSession() as http, http.put(url, json=content, headers=headers) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["event_id"])


def test_the_reset_crypto_command_says_what_it_does(
    tmp_path: Path,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`ducklm matrix reset-crypto` without a password: the store goes, the device id
    is forgotten (the sync position stays), and it says the old device is still listed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DUCKLM_DB", str(tmp_path / "bot.db"))
    monkeypatch.setenv("MATRIX_HOMESERVER", "http://127.0.0.1:9")
    monkeypatch.setenv("MATRIX_USER_ID", "@duck:example.org")
    state = MatrixState(tmp_path / "bot-matrix")
    state.save_session(Session("http://127.0.0.1:9", "@duck:example.org", "OLDDEVICE", "tok"))
    state.save_sync_token("@duck:example.org", "s123")
    (state.directory / CRYPTO_DIR).mkdir()
    (state.directory / CRYPTO_DIR / "store.db").write_text("keys")

    assert cli_main(["matrix", "reset-crypto"]) == 0
    said = capsys.readouterr().out
    assert "deleted the crypto store" in said
    assert "forgot device OLDDEVICE" in said
    assert "still listed on the homeserver" in said and "MATRIX_PASSWORD" in said
    assert not (state.directory / CRYPTO_DIR).exists()
    session = state.load_session("http://127.0.0.1:9", "@duck:example.org")
    assert session is not None and session.device_id is None and session.access_token is None
    assert state.load_sync_token("@duck:example.org") == "s123"
