"""The schema, one version at a time.

Each entry of MIGRATIONS takes the schema from the previous version to this
one; a database records the version it is at (SQLite: PRAGMA user_version).
Append new versions; never edit a released one.

A statement is SQL that runs unchanged on every backend DuckLM supports. Up to
v9 the list is SQLite's own history (written before DuckLM had a second
backend); from v10 on, write each statement so it runs on SQLite and on
PostgreSQL alike (TEXT, BIGINT, DOUBLE PRECISION for times, INTEGER 0/1 for
flags, partial indexes), or give it per backend as a `Dialects` value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialects:
    """One migration step written differently per backend."""

    sqlite: str
    postgres: str


Statement = str | Dialects

MIGRATIONS: list[tuple[Statement, ...]] = [
    (
        """
        CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            message TEXT NOT NULL,
            workspace TEXT,
            debug INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            conversation TEXT,
            requested_by TEXT,
            history_messages TEXT NOT NULL DEFAULT '[]',
            final_response TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX tasks_created_at ON tasks (created_at)",
        "CREATE INDEX tasks_conversation ON tasks (conversation, created_at)",
        "CREATE INDEX tasks_status ON tasks (status, created_at)",
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_id TEXT REFERENCES tasks (task_id),
            seq INTEGER NOT NULL,
            event_type TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX events_task_seq ON events (task_id, seq)",
        # NULLs are distinct in a unique index, so global events need their own.
        "CREATE UNIQUE INDEX events_global_seq ON events (seq) WHERE task_id IS NULL",
        "CREATE INDEX events_type ON events (event_type, id)",
        """
        CREATE TABLE approvals (
            approval_id TEXT PRIMARY KEY,
            task_id TEXT NOT NULL REFERENCES tasks (task_id),
            idx INTEGER NOT NULL DEFAULT 1,
            action TEXT NOT NULL,
            tool TEXT NOT NULL,
            command TEXT,
            risk_level TEXT,
            action_type TEXT,
            reason TEXT,
            requested_by TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            decision TEXT,
            decided_by TEXT,
            decided_at REAL,
            decision_note TEXT,
            executed_at REAL,
            reminded_at REAL,
            card_ref TEXT
        )
        """,
        "CREATE INDEX approvals_pending ON approvals (created_at) WHERE decision IS NULL",
        "CREATE INDEX approvals_task ON approvals (task_id)",
        """
        CREATE TABLE rules (
            rule_id TEXT PRIMARY KEY,
            tool TEXT NOT NULL,
            kind TEXT NOT NULL,
            pattern TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            source_approval_id TEXT,
            revoked_by TEXT,
            revoked_at REAL
        )
        """,
        "CREATE INDEX rules_active ON rules (tool) WHERE revoked_at IS NULL",
    ),
    (
        # v2: platform deliveries already seen (Slack event ids, Matrix event ids),
        # so a retry or a replay after a restart never starts a second task.
        """
        CREATE TABLE deliveries (
            key TEXT PRIMARY KEY,
            claimed_at REAL NOT NULL
        )
        """,
        "CREATE INDEX deliveries_claimed_at ON deliveries (claimed_at)",
        # Matrix reactions name the card's event; find its approval without a scan.
        "CREATE INDEX approvals_card_ref ON approvals (card_ref) WHERE card_ref IS NOT NULL",
    ),
    (
        # v3: scheduled prompts (`/duck schedule add "<cron>" <prompt>`).
        """
        CREATE TABLE schedules (
            schedule_id TEXT PRIMARY KEY,
            cron TEXT NOT NULL,
            timezone TEXT NOT NULL,
            prompt TEXT NOT NULL,
            conversation TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            paused INTEGER NOT NULL DEFAULT 0,
            last_run_at REAL
        )
        """,
        "CREATE INDEX schedules_conversation ON schedules (conversation)",
        "CREATE INDEX tasks_finished ON tasks (updated_at) "
        "WHERE status IN ('completed', 'failed', 'expired', 'interrupted')",
    ),
    (
        # v4: the part of a conversation key before its first "|" (the chat
        # channel, for keys like "slack:C1|1700.1"), so the newest tasks of one
        # channel come from an index instead of sorting every task it ever had.
        "ALTER TABLE tasks ADD COLUMN conversation_group TEXT",
        "UPDATE tasks SET conversation_group = "
        "substr(conversation, 1, instr(conversation, '|') - 1) WHERE instr(conversation, '|') > 0",
        "CREATE INDEX tasks_conversation_group ON tasks (conversation_group, created_at) "
        "WHERE conversation_group IS NOT NULL",
    ),
    (
        # v5 (issue #15, the outbox): every person's message is recorded in the
        # transaction that claims its deliveries, and stays open until it became a
        # task (same commit as the task row) or was answered without one.
        """
        CREATE TABLE inbox (
            inbox_id TEXT PRIMARY KEY,
            conversation TEXT NOT NULL,
            user TEXT NOT NULL,
            text TEXT NOT NULL,
            message_id TEXT,
            in_thread INTEGER NOT NULL DEFAULT 0,
            from_bot INTEGER NOT NULL DEFAULT 0,
            origin TEXT,
            late INTEGER NOT NULL DEFAULT 0,
            deliveries TEXT NOT NULL DEFAULT '[]',
            received_at REAL NOT NULL,
            owner TEXT,
            claimed_at REAL,
            done_at REAL,
            outcome TEXT,
            task_id TEXT
        )
        """,
        "CREATE INDEX inbox_open ON inbox (received_at) WHERE done_at IS NULL",
        "CREATE INDEX inbox_done ON inbox (done_at) WHERE done_at IS NOT NULL",
        "CREATE INDEX inbox_task ON inbox (task_id) WHERE task_id IS NOT NULL",
        # What each approval's card shows; recovery posts or resolves the lagging ones.
        "ALTER TABLE approvals ADD COLUMN card_state TEXT NOT NULL DEFAULT 'unposted'",
        # Cards of decided approvals from before v5 were resolved by the old code
        # (or its crash is long past): not re-sent on upgrade.
        "UPDATE approvals SET card_state = CASE WHEN card_ref IS NULL THEN 'unposted' "
        "WHEN decision IS NULL THEN 'posted' ELSE 'resolved' END",
        # A lease: the process posting or resolving a card right now.
        "ALTER TABLE approvals ADD COLUMN card_claimed_at REAL",
        # An approval offered again after its approved action's run was cut short.
        "ALTER TABLE approvals ADD COLUMN replaces_approval_id TEXT",
        "CREATE UNIQUE INDEX approvals_replaces ON approvals (replaces_approval_id) "
        "WHERE replaces_approval_id IS NOT NULL",
        "CREATE INDEX approvals_card_lag ON approvals (created_at) "
        "WHERE (decision IS NULL AND card_state = 'unposted') "
        "OR (decision IS NOT NULL AND card_state = 'posted')",
        # A finished task owes its thread the answer (or the interruption note)
        # until answered_at is set, after the post succeeded; answer_claimed_at
        # is the lease of the process posting it. Tasks finished before v5 were
        # answered by the old code.
        "ALTER TABLE tasks ADD COLUMN answer_claimed_at REAL",
        "ALTER TABLE tasks ADD COLUMN answered_at REAL",
        "UPDATE tasks SET answered_at = updated_at "
        "WHERE status IN ('completed', 'failed', 'expired', 'interrupted')",
        "CREATE INDEX tasks_unanswered ON tasks (updated_at) WHERE answered_at IS NULL "
        "AND status IN ('completed', 'failed', 'interrupted')",
    ),
    (
        # v6 (issue #23): rules are parsed once, when made, and looked up by key
        # instead of every rule being parsed on every check. Filling these needs
        # the shell parser (Python), so rules from before v6 keep NULLs here and
        # are filled once, on the first check that finds them (rules_unfilled).
        "ALTER TABLE rules ADD COLUMN normalized TEXT",  # the pattern, normalized
        "ALTER TABLE rules ADD COLUMN program TEXT",  # the program a prefix rule names
        # What a covering command looks up (a hash); NULL: the rule covers nothing.
        "ALTER TABLE rules ADD COLUMN match_key TEXT",
        "ALTER TABLE rules ADD COLUMN words INTEGER NOT NULL DEFAULT 0",  # a prefix's length
        "ALTER TABLE rules ADD COLUMN parsed TEXT",  # a prefix rule's parsed words (JSON)
        "CREATE INDEX rules_match ON rules (tool, match_key) "
        "WHERE revoked_at IS NULL AND match_key IS NOT NULL",
        # The longest prefix rule per program bounds the keys a command looks up.
        "CREATE INDEX rules_program ON rules (tool, program, words) "
        "WHERE revoked_at IS NULL AND kind = 'prefix' AND match_key IS NOT NULL",
        "CREATE INDEX rules_unfilled ON rules (created_at) WHERE normalized IS NULL",
    ),
    (
        # v7 (issue #23): timers come from the store. Each pending approval has
        # the time the scheduler must next look at it (its reminder or its
        # expiry, whichever is first; NULL: nothing is due), each schedule its
        # next fire time; one timer waits for the earliest of each, found
        # through these indexes, and every fire is claimed by compare-and-set on
        # the old value. 0 means "not planned yet": what an approval is inserted
        # with (the column default, so the insert needs no change) and what
        # existing rows start with; the scheduler plans those first (a resumed
        # schedule gets -1: planned from the time it resumed, see schedules.py).
        "ALTER TABLE approvals ADD COLUMN due_at REAL DEFAULT 0",
        "UPDATE approvals SET due_at = NULL WHERE decision IS NOT NULL",
        "CREATE INDEX approvals_due ON approvals (due_at) "
        "WHERE decision IS NULL AND due_at IS NOT NULL",
        "ALTER TABLE schedules ADD COLUMN next_fire_at REAL DEFAULT 0",
        "CREATE INDEX schedules_due ON schedules (next_fire_at) "
        "WHERE paused = 0 AND next_fire_at IS NOT NULL",
        # next_fire_at is derived from last_run_at: a write of last_run_at that
        # does not also move next_fire_at (an older code path, a hand edit)
        # sends the schedule back to planning instead of leaving it stale.
        "CREATE TRIGGER schedules_replan AFTER UPDATE OF last_run_at ON schedules "
        "WHEN NEW.next_fire_at IS OLD.next_fire_at "
        "BEGIN UPDATE schedules SET next_fire_at = 0 WHERE rowid = NEW.rowid; END",
    ),
    (
        # v8 (issue #21): the audit chain. Each event's hash chains it to the
        # previous event of its task (runtime/store/chain.py; `ducklm_chain` is
        # the SQL function every connection registers). Events from before v8
        # are chained here, in seq order from seq 1: the chain proves they were
        # not changed after the upgrade, not before it. A task whose stored
        # events do not start at 1 or have a gap keeps NULL hashes from the gap
        # on, which `ducklm audit verify` reports.
        "ALTER TABLE events ADD COLUMN hash TEXT",
        "WITH RECURSIVE c (id, task_id, seq, hash) AS ("
        " SELECT id, task_id, seq, ducklm_chain(NULL, task_id, seq, event_type, payload,"
        " created_at) FROM events WHERE seq = 1"
        " UNION ALL"
        " SELECT e.id, e.task_id, e.seq, ducklm_chain(c.hash, e.task_id, e.seq, e.event_type,"
        " e.payload, e.created_at) FROM c JOIN events e"
        " ON e.task_id IS c.task_id AND e.seq = c.seq + 1)"
        " UPDATE events SET hash = c.hash FROM c WHERE events.id = c.id",
        # Rules with a scope and a lifetime: scope NULL is global, else the
        # channel (a conversation group such as "slack:C1") the rule is used in;
        # expires_at NULL never expires. last_used_at/use_count: what `rules`
        # and `rules review` show.
        "ALTER TABLE rules ADD COLUMN scope TEXT",
        "ALTER TABLE rules ADD COLUMN expires_at REAL",
        "ALTER TABLE rules ADD COLUMN last_used_at REAL",
        "ALTER TABLE rules ADD COLUMN use_count INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # v9 (issue #23): recovery pages through the approvals whose card lags
        # (keyset on created_at); approvals_card_lag lacks the third case (decided
        # while a post was under way), so the query could not use it and scanned
        # every approval each page. This one's condition is the query's, exactly.
        "CREATE INDEX approvals_card_lagging ON approvals (created_at) "
        "WHERE (decision IS NULL AND card_state = 'unposted') "
        "OR (decision IS NOT NULL AND card_state = 'posted') "
        "OR (decision IS NOT NULL AND card_state = 'unposted' AND card_claimed_at IS NOT NULL)",
        # ... and replaces it: nothing else reads the narrower one.
        "DROP INDEX approvals_card_lag",
    ),
    (
        # v10 (issue #19): several replicas on one database. The first version
        # written for both backends: every statement here runs on SQLite and on
        # PostgreSQL unchanged.
        # Each `ducklm run`/`ducklm console` process registers itself and
        # heartbeats; a replica is dead when its heartbeat is older than
        # DUCKLM_REPLICA_TIMEOUT or it marked itself stopped on a clean exit.
        """
        CREATE TABLE replicas (
            replica_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            stopped_at DOUBLE PRECISION
        )
        """,
        # The replica a running task belongs to: recovery interrupts only the
        # tasks of dead owners. NULL: created before v10 (or by a tool that runs
        # no replica), judged by age as before.
        "ALTER TABLE tasks ADD COLUMN owner TEXT",
        "CREATE INDEX tasks_running_owner ON tasks (owner, created_at) WHERE status = 'running'",
        # Named leases (the Matrix sync lease): taken and renewed by
        # compare-and-set on holder and expires_at, one statement each.
        """
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )
        """,
        # What replicas must share instead of keeping it on local disk: the
        # Matrix session and sync token, per-room last events, the crypto store
        # snapshot, the once-a-day housekeeping claims. `version` grows by one
        # on every write, so a compare-and-set can name what it read.
        """
        CREATE TABLE shared_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            version BIGINT NOT NULL DEFAULT 1,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
    ),
    (
        # v11 (issue #20): quorum, approve with an edit, escalation. Both backends.
        # One row per person's approval of one revision of an approval: the
        # key (`<approval_id>/<revision>/<voter>`) counts two clicks of one
        # person (or two at once) once; one column, so `db copy` pages by it.
        # `revision` is the approval's at the time of the vote: an edit starts
        # a new revision, and votes for the old command do not approve the new.
        """
        CREATE TABLE approval_votes (
            vote_id TEXT PRIMARY KEY,
            approval_id TEXT NOT NULL,
            revision INTEGER NOT NULL,
            voter TEXT NOT NULL,
            vote TEXT NOT NULL,
            task_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX approval_votes_approval ON approval_votes (approval_id, revision)",
        "CREATE INDEX approval_votes_task ON approval_votes (task_id)",
        # Edits: the approval's action is replaced in place (what runs is the
        # edited command); the first command proposed and the last editor stay.
        "ALTER TABLE approvals ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE approvals ADD COLUMN original_command TEXT",
        "ALTER TABLE approvals ADD COLUMN edited_by TEXT",
        # Escalation, timed like due_at: 0 = to be planned (the channel's
        # escalate_after is read then), a time = due, NULL = nothing (more) due.
        "ALTER TABLE approvals ADD COLUMN escalate_at DOUBLE PRECISION DEFAULT 0",
        "ALTER TABLE approvals ADD COLUMN escalated_at DOUBLE PRECISION",
        "UPDATE approvals SET escalate_at = NULL WHERE decision IS NOT NULL",
        "CREATE INDEX approvals_escalate ON approvals (escalate_at) "
        "WHERE decision IS NULL AND escalate_at IS NOT NULL",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
