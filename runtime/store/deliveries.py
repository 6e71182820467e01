"""Deliveries already seen from chat platforms (SQL only).

Slack retries an event it thinks we missed, and a Matrix sync can replay one;
claiming its id here first makes handling idempotent across restarts and
processes.
"""

from __future__ import annotations

from runtime.store.db import Database, now

# Slack retries for about five minutes and Matrix replays within a sync window;
# a week is far beyond both and keeps the table small.
DEFAULT_KEEP_SECONDS = 7 * 24 * 3600


class DeliveryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(self, key: str) -> bool:
        """True the first time `key` is claimed, False for every later claim."""
        return bool(
            await self.db.execute(
                "INSERT INTO deliveries (key, claimed_at) VALUES (?, ?) "
                "ON CONFLICT (key) DO NOTHING RETURNING 1",
                (key, now()),
            )
        )

    async def prune(self, older_than: float = DEFAULT_KEEP_SECONDS) -> int:
        """Forget deliveries claimed more than `older_than` seconds ago (off the loop:
        a busy week can be a lot of rows)."""
        return await self.db.background_delete(
            "DELETE FROM deliveries WHERE claimed_at < ?", (now() - older_than,)
        )
