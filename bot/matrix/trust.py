"""DUCKLM_MATRIX_TRUST: which people's devices get the bot's room keys.

- `tofu` (the default): every device the homeserver lists for the room's members
  (trust on first use); a change of someone's device list is logged
  (bot/matrix/crypto.py). Nothing is blacklisted.
- `cross-signed`: only devices their owner cross-signed (the device keys carry a
  valid signature of the owner's self-signing key, which carries one of the owner's
  master key) — what Element's "exclude insecure devices" asks of others. Every
  other device is put on nio's blacklist, so it gets no room key; a device that
  becomes cross-signed later is taken off it.

Each device is judged before the bot first encrypts for a room it is in (the
judgement is remembered per device key), so no device gets a key unjudged.
matrix-nio does not read cross-signing keys, so the judge asks /keys/query itself
and checks the signatures with signedjson (canonical JSON + Ed25519).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

if TYPE_CHECKING:
    from nio import AsyncClient

logger = logging.getLogger("ducklm.matrix")

TOFU = "tofu"
CROSS_SIGNED = "cross-signed"
REQUEST_TIMEOUT = 30.0


def _key_of(key_object: Any, usage: str) -> tuple[str, Any] | None:
    """(key id, verify key) of a cross-signing key object of `usage`, or None."""
    if not isinstance(key_object, dict) or usage not in (key_object.get("usage") or []):
        return None
    keys = key_object.get("keys") or {}
    if len(keys) != 1:
        return None
    ((key_id, public),) = keys.items()
    algorithm, _, version = str(key_id).partition(":")
    if algorithm != "ed25519":
        return None
    try:
        return str(key_id), decode_verify_key_bytes(f"ed25519:{version}", decode_base64(public))
    except Exception:
        return None


def _signed_by(obj: dict[str, Any], user_id: str, key: tuple[str, Any]) -> bool:
    key_id, verify_key = key
    if key_id not in ((obj.get("signatures") or {}).get(user_id) or {}):
        return False
    try:
        verify_signed_json({k: v for k, v in obj.items() if k != "unsigned"}, user_id, verify_key)
    except SignatureVerifyException:
        return False
    return True


def cross_signed_devices(query: dict[str, Any], user_id: str) -> set[str]:
    """The ids of `user_id`'s devices cross-signed by their owner, per a /keys/query
    answer: device ← self-signing key ← master key, every signature checked."""
    master = _key_of((query.get("master_keys") or {}).get(user_id), "master")
    ssk_object = (query.get("self_signing_keys") or {}).get(user_id)
    ssk = _key_of(ssk_object, "self_signing")
    if master is None or ssk is None or not _signed_by(ssk_object, user_id, master):
        return set()
    devices = (query.get("device_keys") or {}).get(user_id) or {}
    return {
        device_id
        for device_id, keys in devices.items()
        if isinstance(keys, dict) and _signed_by(keys, user_id, ssk)
    }


class TrustPolicy:
    """Applies DUCKLM_MATRIX_TRUST to nio's device store."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._judged: set[tuple[str, str, str]] = set()  # (user, device, ed25519)

    async def before_send(self, client: AsyncClient, room_id: str) -> None:
        """Judge every device of the room's members not judged yet (cross-signed
        mode); nio shares the room key right after this, with the rest."""
        if self.mode != CROSS_SIGNED or client.olm is None:
            return
        room = client.rooms.get(room_id)
        if room is None or not room.encrypted:
            return
        if not room.members_synced:
            await client.joined_members(room_id)
        if client.should_query_keys:
            await client.keys_query()
        pending = {
            user
            for user in room.users
            for device in client.device_store.active_user_devices(user)
            if (user, device.id, device.ed25519) not in self._judged
        }
        if pending:
            await self._judge(client, sorted(pending))

    async def _judge(self, client: AsyncClient, users: list[str]) -> None:
        query = await _keys_query(client, users)
        for user in users:
            signed = cross_signed_devices(query, user)
            for device in client.device_store.active_user_devices(user):
                if user == client.user_id and device.id == client.device_id:
                    continue
                if device.id in signed:
                    if device.blacklisted:
                        client.unblacklist_device(device)
                        logger.info("matrix: %s's device %s is cross-signed now", user, device.id)
                elif not device.blacklisted:
                    client.blacklist_device(device)
                    logger.warning(
                        "matrix: not sharing room keys with %s's device %s: not cross-signed "
                        "by its owner (DUCKLM_MATRIX_TRUST=cross-signed)",
                        user,
                        device.id,
                    )
                self._judged.add((user, device.id, device.ed25519))

    def at_start(self, client: AsyncClient) -> None:
        """Switching back to tofu lifts what cross-signed mode put on the blacklist."""
        if self.mode != TOFU or client.olm is None:
            return
        for device in list(client.device_store):
            if device.blacklisted:
                client.unblacklist_device(device)


async def _keys_query(client: AsyncClient, users: list[str]) -> dict[str, Any]:
    url = f"{client.homeserver}/_matrix/client/v3/keys/query"
    headers = {"Authorization": f"Bearer {client.access_token}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(url, headers=headers, json={"device_keys": {u: [] for u in users}}) as response,
    ):
        data = await response.json(content_type=None)
        if response.status != 200 or not isinstance(data, dict):
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=str(data)[:200]
            )
        return data
