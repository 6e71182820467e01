"""Tab completion of the console (bot/console/completion.py), held to the real grammar.

The completion table is written by hand; these checks tie it to bot/commands.py:
every word it offers leads to a command `parse_command` accepts, and every
command USAGE lists can be completed.
"""

from __future__ import annotations

import pytest

from bot import commands as c
from bot.console.completion import COMMANDS, DECISION_WORDS, Tree, candidates

# What stands for free text where the table offers nothing (None).
FREE_TEXT = {
    ("run",): "echo hi",
    ("rules", "add", "exact"): "ls -l",
    ("rules", "add", "prefix"): "git pull",
    ("rules", "revoke"): "r-1",
    ("task",): "t-1",
    ("schedule", "add"): '"0 9 * * 1" check the disks',
    ("schedule", "pause"): "s-1",
    ("schedule", "resume"): "s-1",
    ("schedule", "remove"): "s-1",
}


def paths(tree: Tree, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    for word, below in tree.items():
        found += paths(below, (*prefix, word)) if below is not None else [(*prefix, word)]
    return found


# Where the table offers further words that are not optional.
INCOMPLETE = {("rules", "add")}


def test_every_completed_command_parses() -> None:
    every = paths(COMMANDS)
    assert set(FREE_TEXT) | INCOMPLETE <= set(every)
    for path in every:
        text = " ".join(path)
        if path in INCOMPLETE:
            with pytest.raises(c.CommandError, match="Usage"):
                c.parse_command(text)
            continue
        if path in FREE_TEXT:
            text += " " + FREE_TEXT[path]
        else:  # offered as complete: nothing may be missing
            assert below(path) is not None, f"{path}: free text follows, add it to FREE_TEXT"
        c.parse_command(text)  # raises CommandError if the table offered a wrong word


def below(path: tuple[str, ...]) -> Tree | None:
    level: Tree | None = COMMANDS
    for word in path:
        assert level is not None
        level = level[word]
    return level


def test_every_verb_in_usage_is_offered() -> None:
    for line in c.USAGE.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("   "):
            continue  # a continuation line, or the closing sentence
        words = line.split()
        verb = words[0]
        assert verb in COMMANDS, verb
        if len(words) > 1 and words[1] in ("add", "revoke", "list"):
            assert words[1] in (COMMANDS[verb] or {}), line


def test_completing_words() -> None:
    assert candidates("", "/d") == ["/duck"]
    assert candidates("", "") == ["/duck", "run", "help", "exit"]  # `!` forms only once typed
    assert candidates("", "!") == ["!duck", "!run"]
    assert candidates("/duck ", "ru") == ["run", "rules"]
    assert candidates("/duck ", "rul") == ["rules"]
    assert candidates("!duck ", "app") == ["approvals"]
    assert candidates("/duck rules ", "") == ["list", "add", "revoke"]
    assert candidates("/duck RULES add ", "p") == ["prefix"]  # verbs match in any case
    assert candidates("/duck schedule ", "p") == ["pause"]
    # free text follows: nothing is guessed
    assert candidates("run ", "ec") == []
    assert candidates("/duck rules add exact ", "") == []
    assert candidates("/duck task ", "") == []
    assert candidates("/duck bogus ", "") == []
    assert candidates("/duck tasks ", "") == []


def test_a_pending_approval_offers_the_decisions_first() -> None:
    assert candidates("", "", pending=True)[:3] == list(DECISION_WORDS)
    assert candidates("", "a", pending=True) == ["approve", "always"]
    assert candidates("", "a") == []
    for word in DECISION_WORDS:
        assert c.parse_decision(word, letters=True) is not None
