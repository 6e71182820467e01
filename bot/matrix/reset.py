"""`ducklm matrix reset-crypto`: start the bot's encryption over cleanly.

What it does (and prints): deletes the crypto store (Olm account, sessions, the
cross-signing keys) and its snapshot in the database (issue #19), forgets the
device id and access token in the database and session.json (the
sync position stays, so nothing old is answered again), and with MATRIX_PASSWORD
deletes the old device on the homeserver, so people's clients stop listing it. The
next `ducklm run` logs in as a new device, makes new keys, and replaces the
account's cross-signing keys (with the password: the homeserver asks for it).

People's clients then show that the bot's identity changed (Element: "identity
reset"); messages encrypted for the old device cannot be read any more. Stop the
bot first (every replica): a running bot would keep using the deleted files.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from bot.matrix.crypto import CryptoStore
from bot.matrix.state import MatrixState, Session, SharedMatrixState
from runtime.store import open_stores

if TYPE_CHECKING:
    from runtime.settings import Settings

REQUEST_TIMEOUT = 30.0


async def reset_crypto(settings: Settings) -> list[str]:
    """Does the reset; returns one line per thing done, for the operator."""
    homeserver = (settings.matrix_homeserver or "").strip().rstrip("/")
    user_id = (settings.matrix_user_id or "").strip()
    state = MatrixState(settings.matrix_state_dir)
    store = CryptoStore(settings.matrix_state_dir, settings.matrix_store_passphrase)
    done: list[str] = []
    # The session and the crypto store's snapshot live in the database (#19).
    stores = await open_stores(settings.db)
    try:
        shared = SharedMatrixState(stores.state, stores.leases, state, user_id, "reset-crypto")
        saved = await shared.load_session(homeserver) if homeserver and user_id else None
        if await shared.forget_crypto():
            done.append("deleted the crypto store's snapshot in the database")
        if saved is not None and saved.device_id:
            await shared.save_session(Session(homeserver, user_id))
    finally:
        await stores.close()
    if store.directory.exists():
        shutil.rmtree(store.directory)
        done.append(f"deleted the crypto store {store.directory} (keys, sessions, cross-signing)")
    else:
        done.append(f"no crypto store at {store.directory}")
    if saved is not None and saved.device_id:
        old = saved.device_id
        done.append(
            f"forgot device {old} in the database and {state.session_path}; the next start "
            "is a new device"
        )
        if settings.matrix_password:
            done.append(await _delete_device(homeserver, user_id, settings.matrix_password, old))
        else:
            done.append(
                f"device {old} is still listed on the homeserver (set MATRIX_PASSWORD to "
                "delete it here, or remove it in a client's session list)"
            )
    done.append(
        "next `ducklm run`: new device keys and new cross-signing keys (people's clients "
        "will show that the bot's identity changed)"
    )
    return done


async def _delete_device(homeserver: str, user_id: str, password: str, device_id: str) -> str:
    """DELETE /devices/{id}: log in for a token, then answer the password UIA."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    api = f"{homeserver}/_matrix/client/v3"
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            identifier = {"type": "m.id.user", "user": user_id}
            login = {"type": "m.login.password", "identifier": identifier, "password": password}
            async with http.post(f"{api}/login", json=login) as response:
                answer: Any = await response.json(content_type=None)
                if response.status != 200:
                    return f"could not log in to delete device {device_id}: {answer}"
            token = answer["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            url = f"{api}/devices/{quote(device_id)}"
            async with http.delete(url, headers=headers, json={}) as response:
                first: Any = await response.json(content_type=None)
                status = response.status
            if status == 401:
                auth = {**login, "session": first.get("session")}
                async with http.delete(url, headers=headers, json={"auth": auth}) as response:
                    status, first = response.status, await response.json(content_type=None)
            # The login made a device of its own: log it out again.
            async with http.post(f"{api}/logout", headers=headers, json={}):
                pass
    except (aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as exc:
        return f"could not delete device {device_id} on the homeserver ({exc})"
    if status == 200:
        return f"deleted device {device_id} on the homeserver"
    if status == 404:
        return f"device {device_id} was already gone from the homeserver"
    return f"the homeserver did not delete device {device_id}: {json.dumps(first)}"
