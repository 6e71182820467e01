"""Limits: the classifier's size and depth limits, and what a running command may use.

Kept apart because the classifier, the tool's argument check and the rule
matcher (`runtime.tools.shell_rules`) all enforce the same numbers, and the
execution and the sandbox share the resource limits.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_COMMAND_CHARS = 10_000
# Beyond this we do not even hand the text to the parser (it is not linear).
MAX_PARSE_CHARS = 20_000
MAX_NESTING = 6  # bash -c "bash -c '…'" and substitutions, before we give up


# -- what a running command may use ----------------------------------------

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class ResourceLimits:
    """Per-command resource limits (setrlimit in the child, plus a pids cgroup).

    Each is a `DUCKLM_SANDBOX_*` knob (`runtime.settings`). The wall-clock
    timeout and the output caps are the shell tool's own knobs.
    """

    cpu_seconds: int = 30  # RLIMIT_CPU: SIGXCPU, then SIGKILL
    address_space: int = GIB  # RLIMIT_AS: allocations beyond it fail (ENOMEM)
    file_size: int = GIB  # RLIMIT_FSIZE: SIGXFSZ / EFBIG
    processes: int = 256  # pids cgroup when one can be made, and RLIMIT_NPROC
    open_files: int = 1024  # RLIMIT_NOFILE
    tmp_size: int = 64 * MIB  # the sandbox's private /tmp (tmpfs, counts as memory)
