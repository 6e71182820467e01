"""Tab completion for the console: the words of the `/duck` grammar (bot/commands.py).

A pure function of the words before the cursor, so it is tested without a
terminal; bot/console/reader.py hands it to readline. tests/test_console_completion.py
checks every path here against `parse_command`, so the table cannot drift from
the grammar unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping

# Each level maps a word to what may follow it: another level, or None where
# free text (a command, an id, a cron expression) follows and nothing is offered.
Tree = Mapping[str, "Tree | None"]

COMMANDS: Tree = {
    "help": {},
    "run": None,
    "rules": {
        "list": {"all": {}},
        "add": {"exact": None, "prefix": None},
        "revoke": None,
    },
    "approvals": {},
    "tasks": {},
    "policy": {},
    "task": None,
    "schedule": {"add": None, "list": {}, "pause": None, "resume": None, "remove": None},
}

# What a line may start with at the console (bot/console/terminal.py), and the
# replies to a pending approval (bot/commands.py parse_decision).
FIRST_WORDS: Tree = {
    "/duck": COMMANDS,
    "!duck": COMMANDS,
    "run": None,
    "!run": None,
    "help": {},
    "exit": {},
}
DECISION_WORDS = ("approve", "deny", "always")


def candidates(before: str, word: str, *, pending: bool = False) -> list[str]:
    """The words that complete `word`, given the text `before` it on the line.

    `pending`: an approval is waiting, so the decision words are offered first.
    """
    level: Tree | None = FIRST_WORDS
    for typed in before.split():
        if level is None:
            return []
        # Words are matched as the parser matches them (`/duck RULES` works).
        level = level.get(typed if typed.startswith(("/", "!")) else typed.lower())
    if level is None:
        return []
    options = list(level)
    if level is FIRST_WORDS:
        # `!duck` and `!run` are the Matrix spellings: offered once a `!` is typed.
        options = [o for o in options if not o.startswith("!") or word.startswith("!")]
        if pending:
            options = [*DECISION_WORDS, *options]
    return [option for option in options if option.startswith(word)]
