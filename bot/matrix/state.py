"""What the Matrix bot keeps on disk between runs, next to the database.

    <db-stem>-matrix/session.json   homeserver, user id, device id, access token (0600)
    <db-stem>-matrix/sync.json      the sync token (`next_batch`) after the last batch
                                    the bot finished handling, and per room the last
                                    event it handled (where a gap fill stops)

Keeping the device id means a restart does not add a new device to the account
each time; keeping the sync token means a restart resumes exactly where the bot
stopped (nothing answered twice, nothing missed). nio's own token store needs
the e2e extra and saves the token before callbacks run (platforms.md §0.7), so
the bot writes it itself, after handling each batch.

Every file is written atomically (a temporary file, fsync, rename) with mode
0600, inside a 0700 directory: the session file holds a password-equivalent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("ducklm.matrix")

SESSION_FILE = "session.json"
SYNC_FILE = "sync.json"


@dataclass(frozen=True)
class Session:
    homeserver: str
    user_id: str
    device_id: str | None = None
    access_token: str | None = None  # only a token the bot got by logging in itself


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so a crash leaves the old or the new file, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A damaged file costs a fresh login or a fresh start, not a crash.
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


class MatrixState:
    """The bot's files in `directory` (settings.matrix_state_dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def session_path(self) -> Path:
        return self.directory / SESSION_FILE

    @property
    def sync_path(self) -> Path:
        return self.directory / SYNC_FILE

    def load_session(self, homeserver: str, user_id: str) -> Session | None:
        """The saved session, if it belongs to this homeserver and account."""
        data = _read_json(self.session_path)
        if not data or data.get("user_id") != user_id:
            return None
        if _norm_url(str(data.get("homeserver", ""))) != _norm_url(homeserver):
            return None
        device_id = data.get("device_id")
        token = data.get("access_token")
        return Session(
            homeserver=homeserver,
            user_id=user_id,
            device_id=device_id if isinstance(device_id, str) and device_id else None,
            access_token=token if isinstance(token, str) and token else None,
        )

    def save_session(self, session: Session) -> None:
        atomic_write(self.session_path, json.dumps(asdict(session), indent=2) + "\n")

    def forget_access_token(self, homeserver: str, user_id: str) -> None:
        """Drop a token the server no longer accepts, keeping the device id."""
        session = self.load_session(homeserver, user_id)
        if session is not None and session.access_token:
            self.save_session(
                Session(homeserver, user_id, device_id=session.device_id, access_token=None)
            )

    def load_sync_token(self, user_id: str) -> str | None:
        data = _read_json(self.sync_path)
        if not data or data.get("user_id") != user_id:
            return None  # another account's token would resume the wrong timeline
        token = data.get("next_batch")
        return token if isinstance(token, str) and token else None

    def load_last_handled(self, user_id: str) -> dict[str, str]:
        """Room id -> the last event the bot handled there (empty for another account)."""
        data = _read_json(self.sync_path)
        if not data or data.get("user_id") != user_id:
            return {}
        rooms = data.get("rooms")
        if not isinstance(rooms, dict):
            return {}
        return {
            room: event
            for room, event in rooms.items()
            if isinstance(room, str) and isinstance(event, str) and event
        }

    def save_sync_token(
        self, user_id: str, next_batch: str, last_handled: dict[str, str] | None = None
    ) -> None:
        """The token and the per-room markers in one file, so they always agree."""
        data: dict[str, Any] = {"user_id": user_id, "next_batch": next_batch}
        if last_handled:
            data["rooms"] = dict(last_handled)
        atomic_write(self.sync_path, json.dumps(data) + "\n")


def _norm_url(url: str) -> str:
    return url.strip().rstrip("/").lower()
