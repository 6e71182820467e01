"""A pids cgroup per command: the process limit RLIMIT_NPROC cannot give root.

The kernel never applies RLIMIT_NPROC to processes whose real user is root
(in a user namespace too, when uid 0 maps to root), so a fork bomb run by a
bot that runs as root would fill the host's process table. A cgroup's
`pids.max` stops it for any user. When the bot may create cgroups (root on a
host with the pids controller, cgroup v2 or v1), each command gets its own
cgroup, joined by the child before it execs, so everything it starts is
counted; otherwise the caller falls back on RLIMIT_NPROC alone (which does
hold for a non-root bot).

Memory: RLIMIT_AS binds each process, so a command's N processes could hold N
times the limit together. Where the memory controller can be used (cgroup v2:
the same cgroup, `memory.max` and `memory.swap.max=0`; v1: a second cgroup in
the memory hierarchy, `memory.limit_in_bytes`), a sandboxed command's
processes share one bound; the kernel's OOM killer ends the command when it is
reached. Elsewhere the per-process limit is all there is (a known limit).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("ducklm.tools")

_PREFIX = "ducklm-cmd-"
_counter = itertools.count()


@dataclass(frozen=True)
class PidsCgroup:
    """One command's cgroup. `join` runs in the child; the rest in the bot."""

    path: Path
    unified: bool  # cgroup v2 (has cgroup.kill) rather than v1
    # The v1 memory hierarchy's cgroup (v2 keeps memory in `path` itself).
    memory: Path | None = None
    memory_bound: bool = False  # whether a shared memory limit is set

    @property
    def paths(self) -> list[Path]:
        """The command's cgroups: one per hierarchy it was made in."""
        return [self.path] + ([self.memory] if self.memory is not None else [])

    @property
    def procs_files(self) -> list[Path]:
        """Every `cgroup.procs` the command must join (one per hierarchy)."""
        return [path / "cgroup.procs" for path in self.paths]

    def join(self) -> None:  # pragma: no cover - runs in the child before exec
        for procs in self.procs_files:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    def limit_hit(self) -> bool:
        """Whether a fork was refused because the cgroup was full."""
        try:
            for line in (self.path / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max" and value.strip() not in ("", "0"):
                    return True
        except OSError:
            pass
        return False

    def kill_all(self) -> None:
        """SIGKILL whatever is still in the cgroup (bounded: a fork bomb is full at its limit)."""
        kill_file = self.path / "cgroup.kill"
        if self.unified and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
            return
        for _ in range(20):
            pids = self._pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self, wait: float = 2.0) -> None:
        """Remove the cgroup once it is empty; leave it (logged) if it never empties."""
        deadline = time.monotonic() + wait
        for path in self.paths:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        logger.warning("could not remove cgroup %s", path)
                        break
                    self.kill_all()
                    time.sleep(0.01)

    def memory_limit_hit(self) -> bool:
        """Whether the shared memory bound was reached (the OOM killer or a failed charge)."""
        try:
            if self.unified:
                events = (self.path / "memory.events").read_text().split()
                counts = dict(zip(events[::2], events[1::2], strict=False))
                return counts.get("oom_kill", "0") != "0" or counts.get("max", "0") != "0"
            if self.memory is not None:
                # v1: `oom_kill N` in memory.oom_control (failcnt stays 0 on new kernels)
                for line in (self.memory / "memory.oom_control").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip() not in ("", "0"):
                        return True
                return (self.memory / "memory.failcnt").read_text().strip() not in ("", "0")
        except OSError:
            pass
        return False

    def _pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((fields[4].replace("\\040", " "), tail[0], tail[2]))
    return out


def _usable(parent: Path, unified: bool) -> bool:
    """Whether a child cgroup with its own pids.max can be made under `parent`."""
    if unified:
        try:
            if "pids" not in (parent / "cgroup.controllers").read_text().split():
                return False
            control = parent / "cgroup.subtree_control"
            if "pids" not in control.read_text().split():
                control.write_text("+pids")
        except OSError:
            return False
    probe = parent / f"{_PREFIX}probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        (probe / "pids.max").write_text("1")
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


@functools.cache
def _parent() -> tuple[Path, bool] | None:
    """Where per-command cgroups go: the first usable pids hierarchy (v2 first), or None."""
    if os.geteuid() != 0:
        return None  # a non-root bot has RLIMIT_NPROC, which the kernel enforces for it
    mounts = _mounts()
    candidates = [(Path(m), True) for m, kind, _ in mounts if kind == "cgroup2"]
    candidates += [
        (Path(m), False)
        for m, kind, opts in mounts
        if kind == "cgroup" and "pids" in opts.split(",")
    ]
    for parent, unified in candidates:
        if _usable(parent, unified):
            # Cgroups a crashed bot left behind: removed if empty, else left alone.
            # Only those of dead processes: another live DuckLM process (a CLI, a
            # second bot) may have just made one and not yet moved its child in.
            for stale in parent.glob(f"{_PREFIX}*"):
                if _owner_alive(stale.name):
                    continue
                with contextlib.suppress(OSError):
                    stale.rmdir()
            return parent, unified
    return None


def _owner_alive(name: str) -> bool:
    """Whether the process that made cgroup `name` (`ducklm-cmd-<pid>-<n>` or
    `ducklm-cmd-probe-<pid>`) still runs. Unknown names count as alive: kept."""
    fields = name[len(_PREFIX) :].split("-")
    digits = [field for field in fields if field.isdigit()]
    if not digits:
        return True
    pid = int(fields[-1] if fields[0] == "probe" else digits[0])
    if pid == os.getpid():
        return False  # ours from before a fork or a reused pid: not in use by a live owner
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def available() -> bool:
    """Whether commands get a pids cgroup on this host."""
    return _parent() is not None


@functools.cache
def _memory_parent() -> tuple[Path, bool] | None:
    """Where a command's memory bound goes: (directory, unified), or None.

    v2: the pids parent itself, with the memory controller enabled for its
    children; v1: the memory hierarchy's root.
    """
    found = _parent()
    if found is None:
        return None
    parent, unified = found
    if unified:
        try:
            if "memory" not in (parent / "cgroup.controllers").read_text().split():
                return None
            control = parent / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")
        except OSError:
            return None
        return parent, True
    for mount, kind, opts in _mounts():
        if kind == "cgroup" and "memory" in opts.split(","):
            root = Path(mount)
            if (root / "memory.limit_in_bytes").exists() and os.access(root, os.W_OK):
                return root, False
    return None


def _bound_memory(path: Path, memory: Path | None, unified: bool, limit: int) -> bool:
    """Set the shared memory limit (swap included); False when the kernel refused it."""
    try:
        if unified:
            (path / "memory.max").write_text(str(limit))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
            return True
        if memory is None:
            return False
        (memory / "memory.limit_in_bytes").write_text(str(limit))
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # swap accounting on: memory plus swap, the same bound
            memsw.write_text(str(limit))
        return True
    except OSError as exc:
        logger.warning("could not bound the memory of cgroup %s: %s", path, exc)
        return False


def create(max_pids: int, max_memory: int | None = None) -> PidsCgroup | None:
    """A fresh cgroup allowing at most `max_pids` processes (and, given
    `max_memory`, that many bytes for all of them together where the memory
    controller can be used), or None where none can be made."""
    found = _parent()
    if found is None:
        return None
    parent, unified = found
    name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
    path = parent / name
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
    except OSError as exc:
        logger.warning("could not create cgroup %s: %s", path, exc)
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    memory: Path | None = None
    bound = False
    mem_parent = _memory_parent() if max_memory is not None else None
    if mem_parent is not None and max_memory is not None:
        if not mem_parent[1]:  # v1: a cgroup of its own in the memory hierarchy
            memory = mem_parent[0] / name
            try:
                memory.mkdir()
            except OSError as exc:
                logger.warning("could not create cgroup %s: %s", memory, exc)
                memory = None
        if unified or memory is not None:
            bound = _bound_memory(path, memory, unified, max_memory)
        if not bound and memory is not None:
            with contextlib.suppress(OSError):
                memory.rmdir()
            memory = None
    return PidsCgroup(path, unified, memory, bound)
