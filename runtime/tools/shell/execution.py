"""Execution: run a classified command, hardened.

A simple command runs as argv (no shell), anything else with `bash -c`,
always in the workspace, with stdin closed, a scrubbed environment
(`scrubbed_env`), resource limits, capped output and a timeout that kills the
whole process group. The command is classified again here, and a blocked one
is refused whatever the caller passed in.

A command that needs no approval (it runs unasked) runs in the bubblewrap
sandbox (`sandbox`); with no working bwrap it is refused unless the operator
turned the sandbox off. A command that needed approval reached here because a
person or a rule approved it: it runs as before, unless `DUCKLM_SANDBOX=all`
puts it in the sandbox too, with the workspace writable. Every command gets a
pids cgroup where one can be made (`cgroups`), since root ignores
RLIMIT_NPROC.

(Named `execution`, not `execute`, so the module does not shadow the function
the package re-exports.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from runtime.tools.base import ToolResult
from runtime.tools.shell import cgroups, refusals
from runtime.tools.shell.classifier import classify
from runtime.tools.shell.limits import ResourceLimits
from runtime.tools.shell.sandbox import SandboxConfig, SandboxPlan, command_prefix
from runtime.tools.shell.verdict import Classification

ENV_ALLOWLIST = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR",
     "PWD", "COLUMNS", "LINES", "NO_COLOR"}
)  # fmt: skip
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)
_NEVER_PREFIXES = ("SLACK_", "MATRIX_", "DUCKLM_", "OPENAI_", "AWS_")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def scrubbed_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a command gets: an allow-list, never anything secret-looking.

    PATH keeps only absolute directories, so a file in the workspace named `ls`
    cannot stand in for the real one.
    """
    source = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name, value in source.items():
        if not (name in ENV_ALLOWLIST or name.startswith("LC_")):
            continue
        if name.startswith(_NEVER_PREFIXES) or _SECRET_NAME.search(name):
            continue
        if not isinstance(value, str) or "\x00" in value:
            continue
        out[name] = value
    path = [p for p in out.get("PATH", DEFAULT_PATH).split(":") if p.startswith("/")]
    out["PATH"] = ":".join(path) or DEFAULT_PATH
    return out


# Added for every command (unasked, rule-approved or approved by a person): no
# pager, no prompts, and git must not start a filesystem monitor named in the
# repository's config. Nothing runs with a terminal, so nobody loses anything.
_AUTO_RUN_ENV = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "SYSTEMD_PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "core.fsmonitor",
    "GIT_CONFIG_VALUE_0": "false",
}

_BWRAP_EXEC_FAILED = re.compile(r"^bwrap: execvp (\S+): No such file or directory", re.M)
_BWRAP_SETUP_FAILED = re.compile(r"\A\[stderr\]\nbwrap: (?:Can't|Failed|Creating)", re.M)
_PRLIMIT_EXEC_FAILED = re.compile(r"\Aprlimit: failed to execute (\S+): (.+)$", re.M)
_GRACE_SECONDS = 2.0
_DRAIN_AFTER_EXIT = 2.0


def _rlimits(limits: ResourceLimits, *, sandboxed: bool) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for a command. CPU time and address space only bind
    sandboxed commands: an approved one (a build, a migration) may need more, and a
    person approved exactly it."""
    import resource

    out = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, limits.file_size, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_NPROC, limits.processes, limits.processes),
    ]
    if sandboxed:
        # SIGXCPU at the soft limit, SIGKILL a little later for a program ignoring it.
        out.append((resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5))
        out.append((resource.RLIMIT_AS, limits.address_space, limits.address_space))
    return out


# `sh -c SCRIPT join procs... -- argv`: joins every cgroup named before `--`
# (pids, and the v1 memory hierarchy's), then execs; a failed join runs nothing.
_JOIN_THEN_EXEC = 'for f do shift; [ "$f" = -- ] && exec "$@"; echo $$ > "$f" || exit 126; done'

_PRLIMIT_NAMES = {"RLIMIT_CORE": "core", "RLIMIT_FSIZE": "fsize", "RLIMIT_NOFILE": "nofile",
                  "RLIMIT_NPROC": "nproc", "RLIMIT_CPU": "cpu", "RLIMIT_AS": "as"}  # fmt: skip


@functools.cache
def _system_tool(name: str) -> str | None:
    return shutil.which(name, path=DEFAULT_PATH)


def _launcher(
    rlimits: list[tuple[int, int, int]], cgroup: cgroups.PidsCgroup | None
) -> list[str] | None:
    """An argv prefix that joins the cgroup (sh) and sets the limits (prlimit), then
    execs the command; None where those tools are missing (then a preexec_fn does it).

    Why not always a preexec_fn: it makes Python fork the whole bot instead of
    using vfork, which costs several milliseconds per command in a big process.
    """
    import resource

    prlimit, sh = _system_tool("prlimit"), _system_tool("sh")
    if prlimit is None or sh is None:
        return None
    names = {getattr(resource, attr): opt for attr, opt in _PRLIMIT_NAMES.items()}
    options = []
    for limit, soft, hard in rlimits:
        _cur_soft, cur_hard = resource.getrlimit(limit)
        if cur_hard != resource.RLIM_INFINITY:  # a limit can only be lowered
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        options.append(f"--{names[limit]}={soft}:{hard}")
    prefix = [prlimit, *options, "--"]
    if cgroup is not None:
        # A command that could not join its cgroups does not run at all (exit 126).
        procs = [str(p) for p in cgroup.procs_files]
        prefix = [sh, "-c", _JOIN_THEN_EXEC, "ducklm-join", *procs, "--", *prefix]
    return prefix


def _child_setup(
    rlimits: list[tuple[int, int, int]], cgroup: cgroups.PidsCgroup | None
) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child, before exec
        import resource

        for limit, soft, hard in rlimits:
            _cur_soft, cur_hard = resource.getrlimit(limit)
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            try:
                resource.setrlimit(limit, (soft, hard))
            except (ValueError, OSError):
                resource.setrlimit(limit, (min(soft, cur_hard), cur_hard))
        if cgroup is not None:
            cgroup.join()  # raises: the command does not start outside its cgroup

    return setup


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _drain(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, int]:
    """Read everything (so the child never blocks on a full pipe), keep the first `cap` bytes."""
    if stream is None:
        return b"", 0
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
            dropped += max(0, len(chunk) - room)
        else:
            dropped += len(chunk)
    return bytes(kept), dropped


def _render(data: bytes, dropped: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[… output truncated: {dropped} bytes dropped]"
    return text


def _refusal(command: str, c: Classification, error: str, *, sandboxed: bool = False) -> ToolResult:
    return ToolResult(
        ok=False,
        error=error,
        metadata={
            "command": command,
            "action_type": c.action_type,
            "risk_level": c.risk_level,
            "requires_approval": c.requires_approval,
            "blocked": c.blocked,
            "returncode": None,
            "reason": c.reason,
            "duration_ms": 0,
            "truncated": False,
            "timed_out": False,
            "sandboxed": sandboxed,
        },
    )


def _prepare(
    command: str, fresh: Classification, workspace: Path
) -> ToolResult | tuple[list[str], str, dict[str, str]]:
    """argv, the program to run and its environment; or a refusal."""
    if not workspace.is_dir():
        return _refusal(command, fresh, f"workspace {str(workspace)!r} is not a directory")
    env = scrubbed_env()
    root = workspace.resolve()
    env["PWD"] = str(root)
    # A PATH entry inside the workspace would let a file there stand in for `ls`.
    kept = [p for p in env["PATH"].split(":") if not Path(p).resolve().is_relative_to(root)]
    env["PATH"] = ":".join(kept) or DEFAULT_PATH
    env.update(_AUTO_RUN_ENV)
    if fresh.simple and fresh.commands:
        argv = list(fresh.commands[0])
        program = shutil.which(argv[0], path=env["PATH"]) if "/" not in argv[0] else argv[0]
        if program is None:
            return _refusal(command, fresh, f"command not found: {argv[0]}")
        return argv, program, env
    bash = shutil.which("bash", path=env["PATH"]) or shutil.which("bash") or "/bin/bash"
    return ["bash", "--noprofile", "--norc", "-c", command], bash, env


def _sandbox_for(
    command: str, fresh: Classification, config: SandboxConfig, approved: bool
) -> ToolResult | bool:
    """Whether this command runs sandboxed, or the refusal when it must and cannot."""
    if not config.applies(approved=approved):
        return False
    if config.status.available:
        return True
    if approved:
        return False  # `all` adds the sandbox to approved commands where it can
    return _refusal(command, fresh, f"Refused: {config.missing_reason()}")


async def execute(
    command: str,
    classification: Classification,
    *,
    workspace: Path,
    timeout: float = 60.0,  # noqa: ASYNC109 - part of the contract
    max_output: int = 64 * 1024,
    sandbox: SandboxConfig | None = None,
    approved: bool | None = None,
) -> ToolResult:
    """Run a classified command. Blocked commands are refused here too.

    `sandbox` defaults to `SandboxConfig()`: unasked commands sandboxed with
    the bwrap found on PATH. `approved` says a person or a rule approved this
    run; by default, a command that needs approval and reached here was
    approved (the gateway runs nothing else), one that does not was not.
    """
    fresh = classify(command)
    if classification.blocked or fresh.blocked:
        reason = fresh.reason if fresh.blocked else classification.reason
        return _refusal(command, fresh, f"Blocked: {reason}")
    config = sandbox if sandbox is not None else SandboxConfig()
    if approved is None:
        approved = fresh.requires_approval
    decided = _sandbox_for(command, fresh, config, approved)
    if isinstance(decided, ToolResult):
        return decided
    sandboxed = decided
    prepared = _prepare(command, fresh, Path(workspace))
    if isinstance(prepared, ToolResult):  # not found, no workspace: it went this way
        prepared.metadata["sandboxed"] = sandboxed
        return prepared
    argv, executable, env = prepared
    # Twice at most: when bwrap itself could not set up (a socket or file it was
    # to cover vanished since the hidden set was taken), nothing ran; retake it.
    for attempt in (1, 2):
        plan: SandboxPlan | None = None
        run_argv, run_executable, run_env = argv, executable, dict(env)
        if sandboxed:
            plan = command_prefix(
                config,
                workspace=Path(workspace),
                profile=fresh.sandbox_profile,
                writable=approved,
                environ=os.environ,
                rescan=attempt > 1,
                commands=fresh.commands,
                command=command,
            )
            run_env.update(plan.env)
            # bwrap looks the program up on PATH inside the sandbox, where a copy
            # under a hidden directory (a pyenv shim in /root) is not visible.
            run_argv, run_executable = plan.argv + argv, plan.argv[0]
        else:
            run_argv = [executable, *argv[1:]]  # exactly the program found above
        # A sandboxed command's processes share one memory bound (the address
        # space limit binds each process alone); approved ones keep today's limits.
        cgroup = cgroups.create(
            config.limits.processes, config.limits.address_space if sandboxed else None
        )
        rlimits = _rlimits(config.limits, sandboxed=sandboxed)
        launcher = _launcher(rlimits, cgroup)
        setup: Callable[[], None] | None = None
        if launcher is None:
            setup = _child_setup(rlimits, cgroup)
        else:
            run_argv, run_executable = launcher + run_argv, launcher[0]
        try:
            result = await _run(
                command,
                fresh,
                run_argv,
                run_executable,
                run_env,
                workspace=Path(workspace),
                timeout=timeout,
                max_output=max_output,
                setup=setup,
                plan=plan,
                cgroup=cgroup,
            )
        finally:
            for fd in plan.fds if plan is not None else ():
                with contextlib.suppress(OSError):
                    os.close(fd)
            if cgroup is not None:
                cgroup.kill_all()
                # Off the event loop: emptying a cgroup after a fork bomb takes a moment.
                await asyncio.to_thread(cgroup.remove)
        if plan is None or not _BWRAP_SETUP_FAILED.search(result.output):
            break
    return result


async def _run(
    command: str,
    fresh: Classification,
    argv: list[str],
    executable: str,
    env: dict[str, str],
    *,
    workspace: Path,
    timeout: float,  # noqa: ASYNC109 - part of the contract
    max_output: int,
    setup: Callable[[], None] | None,
    plan: SandboxPlan | None,
    cgroup: cgroups.PidsCgroup | None,
) -> ToolResult:
    sandboxed = plan is not None
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            executable=executable,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(workspace),
            env=env,
            start_new_session=True,
            preexec_fn=setup,
            pass_fds=plan.fds if plan is not None else (),
        )
    except FileNotFoundError:
        return _refusal(command, fresh, f"command not found: {argv[0]}", sandboxed=sandboxed)
    except PermissionError:
        return _refusal(command, fresh, f"permission denied: {argv[0]}", sandboxed=sandboxed)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "strerror", None) or exc
        return _refusal(command, fresh, f"could not start {argv[0]}: {detail}", sandboxed=sandboxed)
    out_task = asyncio.create_task(_drain(proc.stdout, max_output))
    err_task = asyncio.create_task(_drain(proc.stderr, max_output))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _GRACE_SECONDS)
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: leave nothing behind
            _killpg(proc.pid, signal.SIGKILL)
            if cgroup is not None:
                cgroup.kill_all()
    # Whatever the command left in its process group (background jobs) goes too.
    # (In the sandbox, bwrap's exit has already taken its PID namespace down.)
    _killpg(proc.pid, signal.SIGTERM)
    _killpg(proc.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all()  # what left the process group (setsid) is still in the cgroup
    done, pending = await asyncio.wait({out_task, err_task}, timeout=_DRAIN_AFTER_EXIT)
    for task in pending:  # a grandchild that escaped the group still holds the pipe
        task.cancel()
    stdout, out_dropped = out_task.result() if out_task in done else (b"", 0)
    stderr, err_dropped = err_task.result() if err_task in done else (b"", 0)
    duration_ms = int((time.monotonic() - started) * 1000)
    returncode = proc.returncode
    output = _render(stdout, out_dropped)
    err_text = _render(stderr, err_dropped)
    if err_text:
        output += ("\n" if output and not output.endswith("\n") else "") + "[stderr]\n" + err_text
    ok = returncode == 0 and not timed_out
    error: str | None = None
    missing = _BWRAP_EXEC_FAILED.search(err_text) if sandboxed else None
    unstarted = _PRLIMIT_EXEC_FAILED.search(err_text) if returncode else None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif missing is not None:
        error = f"command not found in the sandbox: {missing.group(1)}"
    elif unstarted is not None:  # the launcher could not exec the program
        what = unstarted.group(2).lower()
        what = "command not found" if "no such file" in what else what
        error = f"{what}: {unstarted.group(1)}"
    elif returncode == 127 and not fresh.simple:
        error = "exit status 127 (command not found)"
    elif returncode is not None and returncode < 0:
        error = f"killed by signal {-returncode}"
    elif returncode != 0:
        error = f"exit status {returncode}"
    metadata = {
        "command": command,
        "action_type": fresh.action_type,
        "risk_level": fresh.risk_level,
        "requires_approval": fresh.requires_approval,
        "blocked": fresh.blocked,
        "returncode": returncode,
        "reason": fresh.reason,
        "duration_ms": duration_ms,
        "truncated": bool(out_dropped or err_dropped),
        "timed_out": timed_out,
        "sandboxed": sandboxed,
    }
    if plan is not None:
        metadata["sandbox_profile"] = plan.profile
        metadata["sandbox_refusals"] = plan.notes + refusals.detect(
            command=command,
            words=[w for c in fresh.commands for w in c[1:]],
            returncode=returncode,
            output=output,
            stderr=err_text,
            timed_out=timed_out,
            process_limit_hit=cgroup is not None and cgroup.limit_hit(),
            memory_limit_hit=cgroup is not None and cgroup.memory_limit_hit(),
            workspace=workspace,
            hidden=plan.hidden,
            network=plan.network,
        )
    return ToolResult(ok=ok, output=output, error=error, metadata=metadata)
