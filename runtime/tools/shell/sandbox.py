"""The bubblewrap sandbox: what a command that nobody approved may see and do.

`SandboxConfig` says when commands are sandboxed (`DUCKLM_SANDBOX`) and with
which limits; `probe` finds out, once per bwrap binary, whether bwrap really
works here (it is run, not just looked up: a container may forbid namespaces);
`command_prefix` builds the bwrap argv that wraps one command.

The profile (every command): the whole filesystem read-only, the workspace
read-only too (writable only for approved commands under `DUCKLM_SANDBOX=all`),
a private small /tmp and /dev/shm, a minimal /dev, new PID/IPC/UTS/cgroup/user
namespaces with a fresh /proc (so no process of the bot, nor its environment,
is visible), no network namespace of the host, no capabilities, a new session,
and death with the bot. Hidden: every secret location `secrets.hidden_paths`
names (for the bot's $HOME and every /home/* directory), system secret files,
the bot's own database, its directory and Matrix session files, its `.env`,
the kubeconfig and every credential file the bot's environment names
(`secrets.credential_env_paths`), the secret-named files inside the workspace
(a bounded scan, `secrets_in_workspace`), and every control socket (container
engines, D-Bus, systemd) under /run. A seccomp filter (`seccomp`) refuses unix
sockets anywhere (except to the profiles that lend one) and the kernel
keyring. A profile (`profiles`) adds exactly what its programs need.

Order matters to bwrap (later mounts cover earlier ones), so: hide everything
outside the workspace, bind the workspace back (it may lie under a hidden
directory, /tmp or /root), hide what lies inside it, then bind back the few
files a profile needs (a kubeconfig under a hidden ~/.kube).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.tools.secrets import (
    CREDENTIAL_ENV_VARS,
    credential_env_paths,
    hidden_paths,
    is_secret_name,
)
from runtime.tools.shell import cgroups, seccomp
from runtime.tools.shell.limits import ResourceLimits
from runtime.tools.shell.profiles import (
    CONTROL_SOCKETS,
    PROFILE_COMPANIONS,
    PROFILES,
    PROGRAM_PROFILES,
    Profile,
)

if TYPE_CHECKING:
    from runtime.settings import Settings

logger = logging.getLogger("ducklm.tools")

SANDBOX_MODES = ("unasked", "all", "off")
_DEFAULT_PROFILE = Profile("default", "no network, no control socket")
# Hidden directories are covered by a tiny tmpfs (writable, but empty and gone
# when the command ends).
_HIDE_SIZE = 64 * 1024
# Places the sandbox replaces anyway: nothing there needs hiding twice.
_REPLACED = ("/tmp", "/dev", "/proc")
# The fresh /proc is writable where its files' owner may write, and a root
# bot's commands run as uid 0 (caps or not, /proc/sys/* is mode 0644 root):
# `echo 1 > /proc/sys/vm/drop_caches` would reach the kernel. So the kernel's
# knobs are the host's, read-only (sysctl -a still reads them), and the sysrq
# trigger is /dev/null.
_PROC_COVERS: list[str] = [
    arg
    for sub in ("sys", "irq", "bus", "fs", "sysvipc", "tty", "acpi", "scsi", "driver")
    if os.path.isdir(f"/proc/{sub}")
    for arg in ("--ro-bind", f"/proc/{sub}", f"/proc/{sub}")
] + (
    ["--ro-bind", "/dev/null", "/proc/sysrq-trigger"]
    if os.path.exists("/proc/sysrq-trigger")
    else []
)
_SOCKET_SCAN_ROOTS = ("/run",)
_SOCKET_SCAN_MAX = 4096  # entries looked at under /run; a bigger /run is cut short
_PROBE_TIMEOUT = 15.0
# The workspace is scanned for secret-named files (`src/.env`, `deploy/id_rsa`)
# that a recursive read (`grep -rn x src`) would reach: bounded, because a
# workspace may hold a huge tree. Past the bound the classifier's name check is
# all that stands in front of them (a known limit, see docs/shell-policy.md).
_WS_SCAN_MAX = 20000  # directory entries looked at
_WS_SCAN_DEPTH = 8
# Each hidden file is one mount (~0.1 ms in bwrap): a workspace full of test
# certificates must not make every command slow. Past this many, the rest are
# left to the classifier's name check (logged once per workspace).
_WS_HIDE_MAX = 512
# Directories whose entries are never secret names a person gave (git's object
# store): not worth the scan.
_WS_SCAN_SKIP = frozenset({".git", "node_modules", "__pycache__", ".venv", ".tox"})


@dataclass(frozen=True)
class SandboxConfig:
    """When commands are sandboxed and with what. Plain values, so tests can build one."""

    mode: str = "unasked"  # unasked | all | off
    bwrap: str = "bwrap"  # a name looked up on PATH, or a path
    # The bot's own files and directories (database, its directory, Matrix
    # session files, .env): hidden like secrets.
    bot_files: tuple[str, ...] = ()
    limits: ResourceLimits = field(default_factory=ResourceLimits)

    def __post_init__(self) -> None:
        if self.mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox mode must be one of {', '.join(SANDBOX_MODES)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxConfig:
        return cls(
            mode=settings.sandbox,
            bwrap=settings.bwrap,
            bot_files=tuple(bot_files(settings)),
            limits=ResourceLimits(
                cpu_seconds=settings.sandbox_cpu_seconds,
                address_space=settings.sandbox_memory,
                file_size=settings.sandbox_file_size,
                processes=settings.sandbox_processes,
                open_files=settings.sandbox_open_files,
                tmp_size=settings.sandbox_tmp_size,
            ),
        )

    def applies(self, *, approved: bool) -> bool:
        """Whether a command (approved by a person or rule, or not) runs sandboxed."""
        if self.mode == "off":
            return False
        return self.mode == "all" or not approved

    @property
    def status(self) -> SandboxStatus:
        return probe(self.bwrap)

    @property
    def required_but_missing(self) -> bool:
        """Unasked commands must be sandboxed and cannot be: they need approval instead."""
        return self.mode != "off" and not self.status.available

    def missing_reason(self) -> str:
        return (
            f"no sandbox available ({self.status.detail}); "
            "set DUCKLM_SANDBOX=off to run read-only commands unsandboxed"
        )


@dataclass(frozen=True)
class SandboxStatus:
    available: bool
    path: str | None
    detail: str


def bot_files(settings: Settings) -> list[str]:
    """The bot's own files a command must not see: the database (its directory, its
    -wal/-shm/-journal files and the Matrix session files beside it), .env and
    the MCP config file."""
    out: list[str] = []
    db = str(settings.db)
    if "://" not in db:
        path = Path(db).absolute()
        out += [str(path.parent), str(path)]
        out += [f"{path}{suffix}" for suffix in ("-wal", "-shm", "-journal")]
        out.append(str(settings.matrix_state_dir.absolute()))
    out += [str(Path.cwd() / ".env"), str(Path(settings.workspace).absolute() / ".env")]
    if settings.mcp_config is not None:  # may hold MCP servers' tokens
        out.append(str(Path(settings.mcp_config).absolute()))
    return out


@functools.cache
def probe(bwrap: str = "bwrap") -> SandboxStatus:
    """Whether bwrap runs here with the namespaces the sandbox needs (tried once, cached)."""
    path = shutil.which(bwrap) if "/" not in bwrap else bwrap
    if path is None or not os.access(path, os.X_OK):
        return SandboxStatus(False, None, f"bwrap not found: {bwrap!r}")
    true = shutil.which("true") or "/bin/true"
    argv = [path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    argv += _namespaces(network=False)
    argv += ["--cap-drop", "ALL", "--new-session", "--die-with-parent", "--", true]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxStatus(False, path, f"{path} could not run: {exc}")
    if done.returncode != 0:
        first = (done.stderr or "").strip().splitlines()
        why = first[0] if first else f"exit status {done.returncode}"
        return SandboxStatus(False, path, f"{path} cannot create namespaces here: {why}")
    return SandboxStatus(True, path, f"bubblewrap at {path}")


def sandbox_notice(config: SandboxConfig) -> str | None:
    """The one line `ducklm run`/`console` print at start, or None when all is well."""
    if config.mode == "off":
        return (
            "Sandbox off (DUCKLM_SANDBOX=off): read-only commands run without bubblewrap, "
            "approved commands as before."
        )
    status = config.status
    if not status.available:
        return (
            f"No sandbox: {status.detail}. Every command needs approval; install bubblewrap "
            "(apt-get install bubblewrap) or set DUCKLM_SANDBOX=off to run read-only "
            "commands unsandboxed."
        )
    if not seccomp.available():
        return (
            "Sandbox on, but without its seccomp filter (libseccomp or pyseccomp missing): "
            "unix sockets outside /run and the kernel keyring stay reachable."
        )
    if os.geteuid() == 0 and not cgroups.available():
        return (
            "Sandbox on, but no pids cgroup can be made here, and RLIMIT_NPROC does not bind "
            "root: a runaway fork is stopped only by DUCKLM_SHELL_TIMEOUT."
        )
    return None


def kubeconfigs(environ: Mapping[str, str]) -> list[str]:
    """The kubeconfig files kubectl would read: $KUBECONFIG's entries, else ~/.kube/config."""
    value = environ.get("KUBECONFIG")
    if value:
        return [os.path.abspath(p) for p in value.split(":") if p]
    home = environ.get("HOME") or os.path.expanduser("~")
    return [os.path.join(home, ".kube", "config")]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _sockets_under(roots: Iterable[str]) -> list[str]:
    """Every socket file under /run (bounded): sockets pass through a read-only mount."""
    found: list[str] = []
    seen = 0
    for root in roots:
        for top, dirs, files in os.walk(root, onerror=lambda _e: None):
            seen += len(dirs) + len(files)
            if seen > _SOCKET_SCAN_MAX:
                return found
            for name in files:
                full = os.path.join(top, name)
                try:
                    if stat.S_ISSOCK(os.lstat(full).st_mode):
                        found.append(full)
                except OSError:
                    continue
    return found


_warned: set[str] = set()


def _warn_once(workspace: str, what: str) -> None:
    if workspace not in _warned:
        _warned.add(workspace)
        logger.warning(
            "workspace %s has %s: the sandbox hides the first ones only, the classifier's "
            "name check stands in front of the rest",
            workspace,
            what,
        )


def secrets_in_workspace(workspace: str) -> list[str]:
    """Secret-named files and credential directories inside the workspace (bounded scan).

    Symlinks are not followed nor listed: what they point to outside is hidden
    by the outer scan, and a target inside is found by its own name.
    """
    found: list[str] = []
    seen = 0
    stack: list[tuple[str, int]] = [(workspace, 0)]
    while stack:
        top, depth = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > _WS_SCAN_MAX:
                _warn_once(workspace, f"more than {_WS_SCAN_MAX} entries")
                return found
            if entry.is_symlink():
                continue
            if is_secret_name(entry.name) or is_secret_name(entry.name.lower()):
                found.append(entry.path)
                if len(found) >= _WS_HIDE_MAX:
                    _warn_once(workspace, f"more than {_WS_HIDE_MAX} secret-named files")
                    return found
                continue  # a hidden directory covers what lies below it
            if depth + 1 < _WS_SCAN_DEPTH and entry.name not in _WS_SCAN_SKIP:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, depth + 1))
                except OSError:
                    continue
    return found


def _concrete(paths: Iterable[str]) -> list[str]:
    """Resolved, existing, deduplicated; never the root itself."""
    out: list[str] = []
    for raw in paths:
        for candidate in glob.glob(raw) if glob.has_magic(raw) else [raw]:
            real = os.path.realpath(candidate)
            if real != "/" and os.path.exists(real) and real not in out:
                out.append(real)
    return out


def hidden_for(
    config: SandboxConfig,
    profile: Profile,
    environ: Mapping[str, str],
    workspace: str | None = None,
) -> list[str]:
    """Every concrete path this profile hides on this host, right now.

    With `workspace`, the secret-named files inside it are hidden too.
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    # System secrets come with `hidden_paths` (secrets.SYSTEM_SECRETS); the
    # credential files the bot's environment names are hidden too, except the
    # kubeconfig a kubernetes profile lends to kubectl.
    extra = list(config.bot_files)
    extra += credential_env_paths(environ, skip=("KUBECONFIG",) if profile.kubeconfig else ())
    if not profile.kubeconfig:
        extra += kubeconfigs(environ)
    candidates = hidden_paths(home, extra)
    try:
        homes = sorted(e.path for e in os.scandir("/home") if e.is_dir(follow_symlinks=False))
    except OSError:
        homes = []
    for other in homes:
        candidates += hidden_paths(other)
    kept = set(_concrete(profile.sockets))
    sockets = _concrete(list(CONTROL_SOCKETS) + _sockets_under(_SOCKET_SCAN_ROOTS))
    candidates += [s for s in sockets if s not in kept]
    if workspace is not None:
        candidates += secrets_in_workspace(workspace)
    return _concrete(candidates)


def _namespaces(*, network: bool) -> list[str]:
    """New PID, IPC, UTS, cgroup (and network) namespaces; a user namespace too
    unless the bot is root. A root bot's user namespace would map only uid 0, so
    every other owner would show as `nobody` (`ls -l`, `ps`); root gains nothing
    from it that `--cap-drop ALL` (bounding set included) and bwrap's read-only
    /proc/sys do not already give. Unprivileged bwrap needs one anyway."""
    if os.geteuid() != 0:
        return ["--unshare-all"] + (["--share-net"] if network else [])
    out = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    return out + ([] if network else ["--unshare-net"])


# The hidden set of a (profile, environment) is reused for a moment: scanning
# $HOME, /home/* and /run costs a few milliseconds, and commands come in bursts.
# A secret created in that moment is still refused by the classifier's names.
_HIDDEN_TTL = 1.0
_hidden_cache: dict[tuple[object, ...], tuple[float, list[str]]] = {}


def _hidden_cached(
    config: SandboxConfig,
    profile: Profile,
    environ: Mapping[str, str],
    *,
    rescan: bool,
    workspace: str | None = None,
) -> list[str]:
    key = (
        workspace,
        config.bot_files,
        profile.name,
        environ.get("HOME"),
        *(environ.get(name) for name in CREDENTIAL_ENV_VARS),
    )
    now = time.monotonic()
    hit = _hidden_cache.get(key)
    if hit is not None and now - hit[0] < _HIDDEN_TTL and not rescan:
        # What vanished since is dropped (bwrap cannot cover a missing path).
        return [p for p in hit[1] if os.path.lexists(p)]
    hidden = hidden_for(config, profile, environ, workspace)
    if len(_hidden_cache) > 64:
        _hidden_cache.clear()
    _hidden_cache[key] = (now, hidden)
    return hidden


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths inside another hidden directory (already covered), shallow ones first."""
    dirs = [p for p in paths if os.path.isdir(p)]
    kept = [p for p in paths if not any(d != p and _inside(p, d) for d in dirs)]
    return sorted(kept, key=lambda p: p.count("/"))


def _hide(path: str) -> list[str]:
    if os.path.isdir(path):
        return ["--size", str(_HIDE_SIZE), "--tmpfs", path]
    return ["--ro-bind", "/dev/null", path]


@dataclass(frozen=True)
class SandboxPlan:
    """How one command is wrapped: bwrap's argv (ending with `--`), what to add to
    the command's environment, and what is hidden (for the refusal audit)."""

    argv: list[str]
    env: dict[str, str]
    hidden: list[str]
    profile: str
    network: bool
    # Refusals decided before the run (a profile withheld), for the audit.
    notes: list[str] = field(default_factory=list)
    # Descriptors bwrap reads (the seccomp program): passed to the child, and
    # closed by the caller once it has started.
    fds: tuple[int, ...] = ()


_EXPANSION_CHARS = frozenset("$`*?[~{")


# Redirections that touch no file: merging stderr into stdout, discarding output.
_HARMLESS_REDIRECTION = re.compile(r"(?<![<>&\w])(?:[12]?>&[12]|(?:[12]|&)?>\s*/dev/null)(?![\w/])")


def profile_withheld(
    profile: str, commands: Sequence[Sequence[str]], workspace: Path, command: str = ""
) -> str | None:
    """Why this command may not have the profile's extra rights, or None.

    The classifier names the profile for the command as a whole; the rights
    (network, a kubeconfig, a socket) must still go only to the programs that
    need them. So every other part must be a plain filter (`PROFILE_COMPANIONS`)
    whose words name no existing file and expand to nothing unknown, and the
    command may redirect nothing but stderr into stdout or output to /dev/null
    (`cat < kubeconfig`, `> /dev/tcp/…` would use the rights through the shell).
    """
    rest = _HARMLESS_REDIRECTION.sub(" ", command)
    if "<" in rest or ">" in rest:
        return "a redirection beside its programs"
    for argv in commands:
        if not argv:
            continue
        program = os.path.basename(argv[0])
        if PROGRAM_PROFILES.get(program) == profile:
            continue
        if program not in PROFILE_COMPANIONS:
            return f"`{program}` would share its {profile} profile"
        for word in argv[1:]:
            if _EXPANSION_CHARS.intersection(word):
                return f"`{program} {word}` may expand to a file"
            candidates = {word, word.partition("=")[2], word.lstrip("-")}
            for candidate in filter(None, candidates):
                if os.path.lexists(os.path.join(workspace, os.path.expanduser(candidate))):
                    return f"`{program}` names a file ({candidate})"
    return None


def command_prefix(
    config: SandboxConfig,
    *,
    workspace: Path,
    profile: str | None,
    writable: bool,
    environ: Mapping[str, str],
    rescan: bool = False,
    commands: Sequence[Sequence[str]] = (),
    command: str = "",
) -> SandboxPlan:
    """The sandbox for one command in `workspace` under `profile`.

    `environ` is the bot's own environment (for $HOME and $KUBECONFIG); the
    command's environment is built by the caller.
    """
    status = config.status
    if not status.available or status.path is None:
        raise RuntimeError(config.missing_reason())
    notes: list[str] = []
    if profile and (why := profile_withheld(profile, commands, workspace, command)):
        notes.append(f"{profile} profile withheld: {why}")
        profile = None
    chosen = PROFILES.get(profile or "", _DEFAULT_PROFILE)
    ws = os.path.realpath(workspace)
    tmp = str(config.limits.tmp_size)
    argv = [status.path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # Only uid 0 may write the kernel's knobs (mode 0644 root): a non-root bot's
    # commands skip those ten mounts (about a millisecond).
    argv += _PROC_COVERS if os.geteuid() == 0 else []
    argv += ["--size", tmp, "--tmpfs", "/tmp", "--size", tmp, "--tmpfs", "/dev/shm"]
    # bwrap's /dev is an unbounded tmpfs the command's uid owns: read-only (its
    # devices still work, /dev/shm above stays the one bounded writable place).
    argv += ["--remount-ro", "/dev"]
    argv += _namespaces(network=chosen.network)
    argv += ["--cap-drop", "ALL", "--new-session", "--die-with-parent"]
    # An approved command (writable workspace) keeps its workspace as the
    # person saw it; an unasked one does not see the secret-named files in it.
    hidden = _hidden_cached(
        config, chosen, environ, rescan=rescan, workspace=None if writable else ws
    )
    inside = [p for p in hidden if _inside(p, ws) and p != ws]
    outside = [p for p in hidden if p not in inside and not any(_inside(p, r) for r in _REPLACED)]
    for path in _outermost(outside):
        argv += _hide(path)
    argv += ["--bind" if writable else "--ro-bind", ws, ws]
    for path in _outermost(inside):
        argv += _hide(path)
    env: dict[str, str] = {}
    if chosen.kubeconfig:
        files = [p for p in kubeconfigs(environ) if os.path.isfile(p)]
        for path in files:
            argv += ["--ro-bind", path, path]
        if environ.get("KUBECONFIG") and files:
            env["KUBECONFIG"] = ":".join(files)
        # kubectl's discovery cache would go to ~/.kube/cache, a tiny hidden tmpfs.
        env["KUBECACHEDIR"] = "/tmp/.kube-cache"
    fds: tuple[int, ...] = ()
    # Unix sockets off unless the profile lends one; the keyring always off.
    fd = seccomp.descriptor(unix_sockets=bool(chosen.sockets))
    if fd is not None:
        argv += ["--seccomp", str(fd)]
        fds = (fd,)
    argv += ["--chdir", ws, "--"]
    return SandboxPlan(argv, env, hidden, chosen.name, chosen.network, notes, fds)
