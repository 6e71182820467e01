"""Cross-signing of the bot's own device, so clients that share room keys only with
devices cross-signed by their owner (Element's "exclude insecure devices", MSC4153)
talk to the bot.

    master key ──signs──▶ self-signing key ──signs──▶ the bot's device keys
    (the account's identity: kept stable, a new one looks like an identity reset
     to every Element user)

At each start: ask the homeserver for the account's keys (/keys/query); if it has
no master key, or not ours, upload ours (/keys/device_signing/upload — Synapse takes
a first upload without interactive auth, MSC3967; a replacement needs the bot's
password, m.login.password UIA); then sign the device if its keys do not carry our
self-signing key's signature yet (/keys/signatures/upload). matrix-nio has no
cross-signing API; the signatures are signedjson's (canonical JSON + PyNaCl's
Ed25519, what Synapse itself uses) — no primitive is written here.

The user-signing key (master ──signs──▶ user-signing key) is made and uploaded
too, so the account has the full set clients expect, though the bot signs no
other user with it (it verifies nobody; research/matrix-e2ee.md). The private
keys live in crypto/cross_signing.json (0600), their seeds encrypted with the
store's pickle key (Argon2id-derived key, XSalsa20-Poly1305 SecretBox).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nacl.pwhash
import nacl.secret
import nacl.utils
from signedjson.key import (
    decode_signing_key_base64,
    encode_signing_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json

from bot.matrix.state import atomic_write

logger = logging.getLogger("ducklm.matrix")

KEYS_FILE = "cross_signing.json"
REQUEST_TIMEOUT = 30.0


class CrossSigningError(RuntimeError):
    """The homeserver refused the keys or signatures (the message says why)."""


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 cross-signing key (signedjson's, its version the public key)."""

    seed: str  # unpadded base64 of the 32-byte seed

    @property
    def key(self) -> Any:
        probe = decode_signing_key_base64("ed25519", "probe", self.seed)
        public = encode_verify_key_base64(get_verify_key(probe))
        return decode_signing_key_base64("ed25519", public, self.seed)

    @property
    def public(self) -> str:
        return str(self.key.version)

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.public}"

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(encode_signing_key_base64(generate_signing_key("new")))


@dataclass(frozen=True)
class CrossSigningKeys:
    master: SigningKey
    self_signing: SigningKey
    user_signing: SigningKey

    @classmethod
    def generate(cls) -> CrossSigningKeys:
        return cls(SigningKey.generate(), SigningKey.generate(), SigningKey.generate())


def _box(pickle_key: str, salt: bytes) -> nacl.secret.SecretBox:
    key = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        pickle_key.encode(),
        salt,
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
    )
    return nacl.secret.SecretBox(key)


def save_keys(directory: Path, user_id: str, keys: CrossSigningKeys, pickle_key: str) -> None:
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    secret = json.dumps(
        {
            "master": keys.master.seed,
            "self_signing": keys.self_signing.seed,
            "user_signing": keys.user_signing.seed,
        }
    )
    sealed = _box(pickle_key, salt).encrypt(secret.encode())
    data = {
        "user_id": user_id,
        "master_public": keys.master.public,
        "self_signing_public": keys.self_signing.public,
        "user_signing_public": keys.user_signing.public,
        "salt": base64.b64encode(salt).decode(),
        "sealed": base64.b64encode(bytes(sealed)).decode(),
    }
    atomic_write(directory / KEYS_FILE, json.dumps(data, indent=2) + "\n")


def load_keys(directory: Path, user_id: str, pickle_key: str) -> CrossSigningKeys | None:
    """The saved keys, or None (none saved, another account's, or unreadable: a
    wrong MATRIX_STORE_PASSPHRASE is said in the log)."""
    path = directory / KEYS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.error("matrix: cannot read %s (%s)", path, exc)
        return None
    if not isinstance(data, dict) or data.get("user_id") != user_id:
        return None
    try:
        salt = base64.b64decode(data["salt"])
        opened = _box(pickle_key, salt).decrypt(base64.b64decode(data["sealed"]))
        seeds = json.loads(opened)
        return CrossSigningKeys(
            SigningKey(seeds["master"]),
            SigningKey(seeds["self_signing"]),
            SigningKey(seeds["user_signing"]),
        )
    except Exception as exc:  # nacl's CryptoError for a wrong key, or a damaged file
        logger.error(
            "matrix: cannot open the cross-signing keys in %s (%s: wrong MATRIX_STORE_PASSPHRASE?)",
            path,
            type(exc).__name__,
        )
        return None


def signed_key(
    user_id: str, key: SigningKey, usage: str, by: SigningKey | None = None
) -> dict[str, Any]:
    """A cross-signing key object as /keys/device_signing/upload wants it."""
    body: dict[str, Any] = {
        "user_id": user_id,
        "usage": [usage],
        "keys": {key.key_id: key.public},
    }
    return sign_json(body, user_id, by.key) if by is not None else body


class CrossSigner:
    """Makes sure the bot's master, self-signing and user-signing keys are on the homeserver and
    its device is signed; run once per start, after the device keys are uploaded."""

    def __init__(
        self,
        homeserver: str,
        user_id: str,
        directory: Path,
        pickle_key: str,
        password: str | None,
    ) -> None:
        self.homeserver = homeserver.rstrip("/")
        self.user_id = user_id
        self.directory = directory
        self.pickle_key = pickle_key
        self.password = password

    async def ensure(self, access_token: str, device_id: str) -> str:
        """Returns what it did, for the log; raises CrossSigningError."""
        headers = {"Authorization": f"Bearer {access_token}"}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            self._http = http
            own = await self._query()
            keys = load_keys(self.directory, self.user_id, self.pickle_key)
            server_master = _public_of(own.get("master_keys", {}).get(self.user_id))
            server_user_signing = _public_of(own.get("user_signing_keys", {}).get(self.user_id))
            done = []
            if keys is not None and server_master == keys.master.public:
                if server_user_signing != keys.user_signing.public:
                    # Ours, but without the user-signing key (or with another one):
                    # upload the same master and self-signing keys with it.
                    await self._upload_keys(keys, replacing=True)
                    done.append("uploaded the user-signing key")
            if keys is None or server_master != keys.master.public:
                replacing = server_master is not None
                keys = CrossSigningKeys.generate()
                await self._upload_keys(keys, replacing)
                save_keys(self.directory, self.user_id, keys, self.pickle_key)
                done.append("replaced the cross-signing keys" if replacing else "uploaded keys")
                own = await self._query()
            device = own.get("device_keys", {}).get(self.user_id, {}).get(device_id)
            if not isinstance(device, dict):
                raise CrossSigningError(f"the homeserver has no keys for device {device_id}")
            signatures = device.get("signatures", {}).get(self.user_id, {})
            if keys.self_signing.key_id not in signatures:
                await self._sign_device(device, keys)
                done.append(f"signed device {device_id}")
            return ", ".join(done) or "already cross-signed"

    async def _request(self, method: str, path: str, body: dict[str, Any]) -> Any:
        url = f"{self.homeserver}/_matrix/client/v3{path}"
        async with self._http.request(method, url, json=body) as response:
            data = await response.json(content_type=None)
            return response.status, data

    async def _query(self) -> dict[str, Any]:
        status, data = await self._request(
            "POST", "/keys/query", {"device_keys": {self.user_id: []}}
        )
        if status != 200 or not isinstance(data, dict):
            raise CrossSigningError(f"/keys/query answered {status}: {data}")
        return data

    async def _upload_keys(self, keys: CrossSigningKeys, replacing: bool) -> None:
        body: dict[str, Any] = {
            "master_key": signed_key(self.user_id, keys.master, "master"),
            "self_signing_key": signed_key(
                self.user_id, keys.self_signing, "self_signing", by=keys.master
            ),
            "user_signing_key": signed_key(
                self.user_id, keys.user_signing, "user_signing", by=keys.master
            ),
        }
        status, data = await self._request("POST", "/keys/device_signing/upload", body)
        if status == 401 and isinstance(data, dict) and "flows" in data:
            # Interactive auth (a replacement, or a server without MSC3967).
            if not self.password:
                raise CrossSigningError(
                    "the homeserver wants the bot's password to "
                    + ("replace its cross-signing keys" if replacing else "upload them")
                    + "; set MATRIX_PASSWORD"
                )
            body["auth"] = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.user_id},
                "password": self.password,
                "session": data.get("session"),
            }
            status, data = await self._request("POST", "/keys/device_signing/upload", body)
        if status != 200:
            raise CrossSigningError(f"/keys/device_signing/upload answered {status}: {data}")

    async def _sign_device(self, device: dict[str, Any], keys: CrossSigningKeys) -> None:
        # The signature covers the device_keys object as /keys/query returns it,
        # minus `unsigned` (sign_json leaves out unsigned and signatures).
        signed = sign_json(
            {k: v for k, v in device.items() if k != "unsigned"},
            self.user_id,
            keys.self_signing.key,
        )
        device_id = str(device.get("device_id"))
        status, data = await self._request(
            "POST", "/keys/signatures/upload", {self.user_id: {device_id: signed}}
        )
        failures = data.get("failures") if isinstance(data, dict) else None
        if status != 200 or failures:
            raise CrossSigningError(f"/keys/signatures/upload answered {status}: {data}")


def _public_of(key_object: Any) -> str | None:
    """The public key of a cross-signing key object (its only `keys` value)."""
    if not isinstance(key_object, dict):
        return None
    values = list((key_object.get("keys") or {}).values())
    return str(values[0]) if len(values) == 1 else None
