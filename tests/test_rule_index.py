"""Rules matched through an index (issue #23): parsed once when made, looked up by key.

What must hold:
- the verdicts are exactly those of `rule_covers` (issue #13's semantics), for
  every case tests/test_shell_rules.py pins and for generated commands;
- a stored pattern is never parsed again (changing its text in the store
  changes nothing: matching reads the stored parsed form);
- rules from before schema v6 are filled once, on the first check;
- a rule added or revoked by another process (the CLI beside a running bot) is
  seen by the next check;
- a check reads only the few rules a command could name, however many exist.
"""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from runtime.approvals import SHELL_TOOL, ApprovalService, rule_keys
from runtime.store import Stores, open_stores
from runtime.store.migrations import MIGRATIONS
from runtime.store.rules import KEYS_PER_QUERY
from runtime.tools.shell_rules import (
    compile_rule,
    lookup_command,
    prefix_keys,
    rule_covers,
)
from tests import test_shell_rules as pinned
from tests.postgres import raw_execute, raw_rows
from tests.test_console import ducklm

pytestmark = pytest.mark.backends("sqlite", "postgres")

Rule = pinned.Rule


def shell(command: str) -> dict[str, Any]:
    return {"tool": SHELL_TOOL, "args": {"command": command}, "reason": "test"}


def cases_of(test: Any) -> list[tuple[str, bool]]:
    """The (command, covered) table a pinned test is parametrized with."""
    for mark in test.pytestmark:
        if mark.name == "parametrize":
            return [tuple(case) for case in mark.args[1]]
    raise AssertionError(f"{test.__name__} is not parametrized")


async def store_with(
    target: str, rules: list[Rule], *, made: bool = True
) -> tuple[Stores, ApprovalService]:
    """Stores holding `rules` as shell rules: parsed when made (`made`), or inserted
    bare as an older DuckLM (or a hand) would have, to be filled by the first check."""
    stores = await open_stores(target)
    for rule in rules:
        keys = rule_keys(SHELL_TOOL, rule.kind, rule.pattern) if made else None
        await stores.rules.insert(SHELL_TOOL, rule.kind, rule.pattern, "test", keys=keys)
    return stores, ApprovalService.from_stores(stores)


rows, write = raw_rows, raw_execute  # the raw database, bypassing the store


# -- the same verdicts as rule_covers -------------------------------------------

FORGED = [
    Rule("exact", "rm -rf /"),
    Rule("prefix", "rm"),
    Rule("prefix", "sudo"),
    Rule("prefix", "bash -c"),
    Rule("prefix", "python3 -c"),
    Rule("prefix", "kubectl exec"),
    Rule("prefix", "cd"),
    Rule("prefix", "git -c"),
    Rule("prefix", "ls 'x"),
    Rule("exact", "ls 'x"),
    Rule("prefix", "$X"),
]
CD_RULES = [
    pinned.exact("make build"),
    pinned.prefix("rm -rf build"),
    pinned.prefix("git pull"),
    pinned.exact("cd app && git pull && make build"),
]


@pytest.mark.parametrize("made", [True, False], ids=["parsed-when-made", "filled-later"])
@pytest.mark.parametrize(
    ("rules", "table"),
    [
        (pinned.RULES, "test_rule_covers"),
        (CD_RULES, "test_cd_context_is_part_of_what_a_rule_names"),
        (pinned.RULES + CD_RULES + FORGED, "test_rule_covers"),
        (pinned.RULES + CD_RULES + FORGED, "test_cd_context_is_part_of_what_a_rule_names"),
    ],
    ids=["rules", "cd", "all-rules", "all-cd"],
)
async def test_the_index_gives_the_pinned_verdicts(
    tmp_path: Path, db_target: str, rules: list[Rule], table: str, made: bool
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    stores, service = await store_with(db_target, rules, made=made)
    try:
        for command, covered in cases_of(getattr(pinned, table)):
            expected = rule_covers(command, rules, ws)
            if rules is pinned.RULES or rules is CD_RULES:
                assert expected is covered, command  # the table itself, unchanged
            assert await service.is_allowed_forever(shell(command), str(ws)) is expected, command
    finally:
        await stores.close()


@pytest.mark.parametrize("made", [True, False], ids=["parsed-when-made", "filled-later"])
async def test_the_index_agrees_with_rule_covers_on_generated_commands(
    tmp_path: Path, db_target: str, made: bool
) -> None:
    """Three hundred commands built from rule words, operands and joiners: the store's
    answer is rule_covers' answer for every one (covered or not)."""
    ws = tmp_path / "ws"
    (ws / "logs").mkdir(parents=True)
    rules = pinned.RULES + CD_RULES + FORGED + [pinned.prefix("truncate -s 0 logs/app.log")]
    heads = [
        "git pull", "rm -rf build", "systemctl restart nginx", "sudo systemctl restart nginx",
        "chmod 644", "git add", "make build", "ls > listing.txt", "echo hi > out.txt",
        "truncate -s 0 logs/app.log", "rm", "cd app", "git status", "ls -la", "bash -c true",
        "kubectl exec web", "cat README.md", "rm -rf /", "git -c x=y log", "$X",
    ]  # fmt: skip
    operands = ["", "", "", " dist", " x.log", " --now", " ../x", " /etc", " $(id)", " 'a b'"]
    joins = [" && ", "; ", " | ", " || "]
    rng = random.Random(23)
    commands = set()
    while len(commands) < 300:
        parts = [
            rng.choice(heads) + "".join(rng.choice(operands) for _ in range(rng.randint(0, 2)))
            for _ in range(rng.randint(1, 3))
        ]
        command = parts[0]
        for part in parts[1:]:
            command += rng.choice(joins) + part
        commands.add(command)
    stores, service = await store_with(db_target, rules, made=made)
    try:
        covered = 0
        for command in sorted(commands):
            expected = rule_covers(command, rules, ws)
            assert await service.is_allowed_forever(shell(command), str(ws)) is expected, command
            covered += expected
        # Both answers occur often enough for the comparison to mean something.
        assert 20 <= covered <= 280, covered
    finally:
        await stores.close()


# -- parsed once ------------------------------------------------------------------


async def test_a_stored_pattern_is_not_parsed_again(tmp_path: Path, db_target: str) -> None:
    """Matching reads the form stored when the rule was made: rewriting the pattern
    text in the store (which nothing but a hand does) changes no verdict."""
    ws = tmp_path / "ws"
    ws.mkdir()
    stores, service = await store_with(
        db_target, [pinned.prefix("rm -rf build"), pinned.exact("systemctl restart nginx")]
    )
    db = db_target
    try:
        assert await service.is_allowed_forever(shell("rm -rf build x.log"), str(ws))
        write(db, "UPDATE rules SET pattern = 'git push --force' || rule_id")
        assert await service.is_allowed_forever(shell("rm -rf build x.log"), str(ws))
        assert await service.is_allowed_forever(shell("systemctl restart nginx"), str(ws))
        assert not await service.is_allowed_forever(shell("git push --force"), str(ws))
        # The stored form is what decides: damage it and the rule covers nothing.
        write(db, "UPDATE rules SET parsed = '{not json' WHERE kind = 'prefix'")
        assert not await service.is_allowed_forever(shell("rm -rf build x.log"), str(ws))
    finally:
        await stores.close()


async def test_a_key_collision_is_checked_against_the_stored_words(db_target: str) -> None:
    """The match key only finds candidates; the stored words decide. A row whose key
    says `git pull` but whose words say `git push` covers neither."""
    stores, service = await store_with(db_target, [pinned.prefix("git push")])
    db = db_target
    try:
        write(db, "UPDATE rules SET match_key = ?", (prefix_keys(["git", "pull"])[-1],))
        assert not await service.is_allowed_forever(shell("git pull"))
        assert not await service.is_allowed_forever(shell("git push"))  # its key is gone
    finally:
        await stores.close()


def test_prefix_keys_extend_word_by_word() -> None:
    words = ["rm", "-rf", "build", "'a b'", "x"]
    keys = prefix_keys(words)
    assert [prefix_keys(words[: k + 1])[-1] for k in range(len(words))] == keys
    assert len(set(keys)) == len(keys)
    # Word boundaries count: ["ab", "c"] is not ["a", "bc"].
    assert prefix_keys(["ab", "c"])[-1] != prefix_keys(["a", "bc"])[-1]


def test_compile_rule_stores_what_matching_needs() -> None:
    made = compile_rule("prefix", "sudo  systemctl restart 'nginx'")
    assert made.normalized == "sudo systemctl restart nginx"
    assert (made.program, made.words) == ("sudo", 4)
    assert made.match_key == prefix_keys(["sudo", "systemctl", "restart", "nginx"])[-1]
    exact = compile_rule("exact", "cd app && git pull")
    assert (exact.normalized, exact.program, exact.words, exact.parsed) == (
        "cd app && git pull",
        "cd",
        0,
        None,
    )
    lookup = lookup_command("cd app  &&  git pull")
    assert lookup is not None and exact.match_key in lookup.keys({})
    # What can cover nothing is stored without a key: no lookup ever finds it.
    for kind, pattern in [("exact", "ls 'x"), ("prefix", "ls 'x"), ("prefix", "a | b")]:
        assert compile_rule(kind, pattern).match_key is None, pattern
    assert compile_rule("prefix", "$X y").match_key is None


# -- rules from before the index ---------------------------------------------------


def _index_version() -> int:
    """The schema version that added the match columns (the one to upgrade across)."""
    for version, statements in enumerate(MIGRATIONS, start=1):
        if any("ADD COLUMN match_key" in s for s in statements):
            return version
    raise AssertionError("no migration adds rules.match_key")


@pytest.mark.backends(
    "sqlite", reason="a SQLite file from before v6; PostgreSQL starts at the current schema"
)
async def test_rules_made_before_the_index_are_filled_once_and_keep_their_meaning(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "ducklm.db")
    before = _index_version() - 1
    conn = sqlite3.connect(db)
    try:
        for statements in MIGRATIONS[:before]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {before}")
        old = [
            ("r-1", SHELL_TOOL, "prefix", "rm -rf build", None),
            ("r-2", SHELL_TOOL, "exact", "systemctl  restart nginx", None),  # not normalized
            ("r-3", SHELL_TOOL, "prefix", "bash -c", None),  # refused today: covers nothing
            ("r-4", SHELL_TOOL, "exact", "make deploy", 1.0),  # revoked
            ("r-5", "read_file", "exact", '{"path": "a.log"}', None),
        ]
        for rule_id, tool, kind, pattern, revoked_at in old:
            conn.execute(
                "INSERT INTO rules (rule_id, tool, kind, pattern, created_by, created_at, "
                "revoked_by, revoked_at) VALUES (?, ?, ?, ?, 'admin', 1.0, ?, ?)",
                (rule_id, tool, kind, pattern, "admin" if revoked_at else None, revoked_at),
            )
        conn.commit()
    finally:
        conn.close()

    ws = tmp_path / "ws"
    ws.mkdir()
    async with await open_stores(db) as stores:
        assert rows(db, "SELECT COUNT(*) FROM rules WHERE normalized IS NULL") == [(5,)]
        service = ApprovalService.from_stores(stores)
        assert await service.is_allowed_forever(shell("rm -rf build dist"), str(ws))
        assert rows(db, "SELECT COUNT(*) FROM rules WHERE normalized IS NULL") == [(0,)]
        assert await service.is_allowed_forever(shell("systemctl restart nginx"))
        assert not await service.is_allowed_forever(shell("bash -c 'touch x'"))
        assert not await service.is_allowed_forever(shell("make deploy"))
        assert await service.is_allowed_forever({"tool": "read_file", "args": {"path": "a.log"}})
        assert rows(db, "SELECT rule_id, normalized, program, words FROM rules ORDER BY 1") == [
            ("r-1", "rm -rf build", "rm", 3),
            ("r-2", "systemctl restart nginx", "systemctl", 0),
            ("r-3", "bash -c", "bash", 2),
            ("r-4", "make deploy", "make", 0),
            ("r-5", '{"path": "a.log"}', None, 0),
        ]
        # Filled once: from now on the stored form decides, the pattern is not read.
        write(db, "UPDATE rules SET pattern = 'x'")
        assert await service.is_allowed_forever(shell("rm -rf build dist"), str(ws))
        assert await service.is_allowed_forever(shell("systemctl restart nginx"))


async def test_a_rule_inserted_without_its_keys_counts_at_the_next_check(
    db_target: str,
) -> None:
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)
        await stores.rules.insert(SHELL_TOOL, "exact", "make build", "test")
        assert not await service.is_allowed_forever(shell("make test"))
        # Another bare row after the first fill: seen too (the probe runs every check).
        await stores.rules.insert(SHELL_TOOL, "exact", "make test", "test")
        assert await service.is_allowed_forever(shell("make test"))
        assert await service.is_allowed_forever(shell("make build"))


async def test_filling_many_older_rules_lets_the_loop_run_and_checks_wait_for_it(
    db_target: str,
) -> None:
    async with await open_stores(db_target) as stores:
        async with stores.db.transaction():
            for i in range(300):
                await stores.rules.insert(SHELL_TOOL, "exact", f"touch stamp-{i}", "test")
        service = ApprovalService.from_stores(stores)
        turns = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        try:
            first, late, missing = await asyncio.gather(
                service.is_allowed_forever(shell("touch stamp-0")),
                service.is_allowed_forever(shell("touch stamp-299")),  # in the second batch
                service.is_allowed_forever(shell("touch stamp-300")),
            )
        finally:
            done.set()
            await tick
        assert (first, late, missing) == (True, True, False)
        # The loop got a turn after each rule parsed (inline SQLite alone never yields).
        assert turns >= 300, turns
        unfilled = "SELECT COUNT(*) FROM rules WHERE normalized IS NULL"
        assert rows(db_target, unfilled) == [(0,)]


# -- another process's rules ----------------------------------------------------------


async def test_a_rule_the_cli_adds_beside_a_running_service_counts_at_once(
    tmp_path: Path, db_target: str
) -> None:
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)  # the running bot's
        await service.add_rule(SHELL_TOOL, "exact", "make build", "admin")
        assert not await service.is_allowed_forever(shell("git pull"))

        code, out, err = await ducklm(
            tmp_path, "rules", "add", "prefix", "git", "pull", DUCKLM_DB=db_target
        )
        assert code == 0 and "Added rule" in out, (out, err)
        assert await service.is_allowed_forever(shell("git pull"))

        found = re.search(r"`(r-[0-9a-f]{8})`", out)
        assert found is not None, out
        code, out, err = await ducklm(
            tmp_path, "rules", "revoke", found.group(1), DUCKLM_DB=db_target
        )
        assert code == 0, (out, err)
        assert not await service.is_allowed_forever(shell("git pull"))
        assert await service.is_allowed_forever(shell("make build"))


# -- a check reads only what a command could name ---------------------------------------


async def test_a_check_reads_the_same_few_rules_among_thousands(
    tmp_path: Path, db_target: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)
        specs = [("prefix", f"rm -rf build-{i}") for i in range(1200)]  # one program
        specs += [("exact", f"systemctl restart svc-{i}") for i in range(1200)]
        async with stores.db.transaction():
            for kind, pattern in specs:
                keys = rule_keys(SHELL_TOOL, kind, pattern)
                await stores.rules.insert(SHELL_TOOL, kind, pattern, "test", keys=keys)

        async def candidates(command: str) -> list[str]:
            lookup = lookup_command(command)
            assert lookup is not None
            longest = await stores.rules.longest_prefix(SHELL_TOOL, sorted(lookup.programs()))
            found = await stores.rules.matching(SHELL_TOOL, lookup.keys(longest))
            return sorted(rule.pattern for rule in found)

        assert await candidates("rm -rf build-517 x.log") == ["rm -rf build-517"]
        assert await candidates("systemctl restart svc-9 && rm -rf build-3") == [
            "rm -rf build-3",
            "systemctl restart svc-9",
        ]
        assert await candidates("rm -rf build-5000") == []
        assert await candidates("ls -la") == []

        assert await service.is_allowed_forever(shell("rm -rf build-517 x.log"), str(ws))
        assert not await service.is_allowed_forever(shell("rm -rf build-517 /etc"), str(ws))
        assert await service.is_allowed_forever(shell("systemctl restart svc-1199"))
        assert not await service.is_allowed_forever(shell("systemctl restart svc-1200"))
        assert not await service.is_allowed_forever(shell("systemctl restart svc-1 svc-2"))


async def test_hostile_commands_stay_bounded(tmp_path: Path, db_target: str) -> None:
    """A part with thousands of words looks up only as many prefixes as the longest
    rule of its program has; hundreds of parts are looked up in chunks below
    SQLite's limits, with the same verdicts."""
    ws = tmp_path / "ws"
    ws.mkdir()
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)
        await service.add_rule(SHELL_TOOL, "prefix", "git pull", "admin")
        await service.add_rule(SHELL_TOOL, "prefix", "rm -rf build", "admin")
        long = "git " + "pull " * 1900
        lookup = lookup_command(long)
        assert lookup is not None
        keys = lookup.keys(await stores.rules.longest_prefix(SHELL_TOOL, ["git"]))
        assert len(keys) == 3  # the command (its one part), `git`, `git pull`
        assert not await service.is_allowed_forever(shell(long))

        many = "; ".join(f"rm -rf build f{i}" for i in range(500))
        lookup = lookup_command(many)
        assert lookup is not None
        # More than one statement; the prefix keys ("p…") sort after the exact ones
        # ("e…"), so the covering rule is found only if the second chunk is asked too.
        assert len(lookup.keys({"rm": 3})) > KEYS_PER_QUERY
        assert await service.is_allowed_forever(shell(many), str(ws))
        assert await service.is_allowed_forever(shell(many + "; git pull"), str(ws))
        assert not await service.is_allowed_forever(shell(many + "; git pull x"), str(ws))


async def test_lookups_see_only_active_rules_of_the_tool(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)
        short = await service.add_rule(SHELL_TOOL, "prefix", "git pull", "admin")
        long = await service.add_rule(SHELL_TOOL, "prefix", "git pull origin main", "admin")
        await service.add_rule(SHELL_TOOL, "exact", "git status --short", "admin")
        await service.add_rule("read_file", "exact", '{"path": "git"}', "admin")
        assert await stores.rules.longest_prefix(SHELL_TOOL, ["git", "ls"]) == {"git": 4}
        assert await stores.rules.longest_prefix("read_file", ["git"]) == {}

        assert await service.revoke_rule(long.rule_id, "admin")
        assert await stores.rules.longest_prefix(SHELL_TOOL, ["git"]) == {"git": 2}
        assert not await service.is_allowed_forever(shell("git pull origin main"))
        assert await service.is_allowed_forever(shell("git pull"))

        assert await service.revoke_rule(short.rule_id, "admin")
        assert await stores.rules.longest_prefix(SHELL_TOOL, ["git"]) == {}
        assert not await service.is_allowed_forever(shell("git pull"))
        assert await service.is_allowed_forever(shell("git status --short"))
        # Another tool's rule with the same text is not a shell rule.
        assert not await service.is_allowed_forever(shell('{"path": "git"}'))
