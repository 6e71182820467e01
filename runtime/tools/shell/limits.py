"""Size and depth limits of the shell classifier.

Kept apart because the classifier, the tool's argument check and the rule
matcher (`runtime.tools.shell_rules`) all enforce the same numbers.
"""

from __future__ import annotations

MAX_COMMAND_CHARS = 10_000
# Beyond this we do not even hand the text to the parser (it is not linear).
MAX_PARSE_CHARS = 20_000
MAX_NESTING = 6  # bash -c "bash -c '…'" and substitutions, before we give up
