"""What the sandbox stopped: a best-effort reading of a sandboxed command's outcome.

The kernel does not tell a parent *why* its child failed, so this reads the
signs: the exit status (128 + signal through bwrap or a shell, or a negative
status), the pids cgroup's own counter, and the standard error messages
programs print for a read-only filesystem, a missing network, a failed
allocation or a full file. A hostile program can hide all of these (exit 0,
print nothing); the refusal itself still happened, only the audit misses it.
Callers say so (`docs/shell-policy.md`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable
from pathlib import Path

# (kind, pattern over stdout+stderr)
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("read-only filesystem", re.compile(r"Read-only file system|\bEROFS\b")),
    (
        "network",
        re.compile(
            r"Network is unreachable|Connection refused|Temporary failure in name resolution"
            r"|Could not resolve host|Name or service not known|No address associated"
            r"|Cannot assign requested address|\bENETUNREACH\b"
        ),
    ),
    (
        "memory limit",
        re.compile(
            r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory"
            r"|memory exhausted|\bENOMEM\b",
            re.I,
        ),
    ),
    ("file size limit", re.compile(r"File too large|File size limit exceeded|\bEFBIG\b")),
    ("CPU time limit", re.compile(r"CPU time limit exceeded")),
    # The only writable places are the small private /tmp and /dev/shm.
    ("tmp space limit", re.compile(r"No space left on device|\bENOSPC\b")),
    (
        "process limit",
        re.compile(
            r"fork: retry|fork: Resource temporarily unavailable|Cannot fork|\bEAGAIN\b.*fork"
        ),
    ),
)
_SIGNALS = {
    signal.SIGXCPU: "CPU time limit",
    signal.SIGXFSZ: "file size limit",
    signal.SIGKILL: "killed (CPU time hard limit or timeout)",
}
# Another process's /proc entry: in its own PID namespace the command sees only
# its own processes, so the bot's environment is out of reach.
_OTHER_PROC = re.compile(
    r"/proc/(?:\$\{?\w+\}?|\d+|\*)/(?:environ|cmdline|mem|maps|fd|root|cwd|exe|status)"
)


def _signal_of(returncode: int | None) -> int | None:
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + 65:
        return returncode - 128
    return None


def _mentions_hidden(words: Iterable[str], workspace: Path, hidden: Iterable[str]) -> list[str]:
    roots = [h.rstrip("/") for h in hidden]
    found: list[str] = []
    for word in words:
        if not word or word.startswith("-") or "\x00" in word:
            continue
        candidate = os.path.expanduser(word) if word.startswith("~") else word
        full = os.path.normpath(os.path.join(workspace, candidate))
        for root in roots:
            if full == root or full.startswith(root + "/"):
                if full not in found:
                    found.append(full)
                break
    return found


def detect(
    *,
    command: str,
    words: Iterable[str],
    returncode: int | None,
    output: str,
    stderr: str,
    timed_out: bool,
    process_limit_hit: bool,
    workspace: Path,
    memory_limit_hit: bool = False,
    hidden: Iterable[str],
    network: bool,
) -> list[str]:
    """The refusals a sandboxed command's outcome shows, e.g. ["read-only filesystem"]."""
    found: list[str] = []
    ok = returncode == 0 and not timed_out
    # A failed command: anything it printed; a successful one (whose last part
    # succeeded): its error output only, so a `grep` of a log is not a refusal.
    text = stderr if ok else output
    for kind, pattern in _PATTERNS:
        if kind == "network" and network:
            continue  # a profile with network: a refused connection is the server's
        if pattern.search(text):
            found.append(kind)
    if not ok:
        sig = _signal_of(returncode)
        if sig in _SIGNALS and not (sig == signal.SIGKILL and timed_out):
            kind = _SIGNALS[signal.Signals(sig)]
            if kind not in found:
                found.append(kind)
    if process_limit_hit and "process limit" not in found:
        found.append("process limit")
    if memory_limit_hit and "memory limit" not in found:
        found.append("memory limit")
    for path in _mentions_hidden(words, workspace, hidden):
        found.append(f"hidden path {path}")
    if _OTHER_PROC.search(command):
        found.append("another process's /proc entry (own PID namespace)")
    return found
