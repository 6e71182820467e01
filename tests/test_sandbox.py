"""The sandbox under every command nobody approved, tried with the classifier bypassed.

Issue 13's acceptance: with `classify` forced to answer "read-only, low risk"
(the one sanctioned stand-in: the classifier is deliberately bypassed), hostile
commands go through the real path (RuntimeLoop.run_command -> gateway ->
ShellTool -> execute -> real bwrap), and the sandbox stops each one; the audit
log (events in SQLite) records the refusal. Nothing else is replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.admin import describe_event
from runtime.factory import Runtime, build_runtime
from runtime.store.models import Event
from runtime.tools.shell import cgroups, classify, execute
from runtime.tools.shell import classify as real_classify
from runtime.tools.shell import execution as execution_module
from runtime.tools.shell import tool as tool_module
from runtime.tools.shell.limits import ResourceLimits
from runtime.tools.shell.sandbox import SandboxConfig, probe, sandbox_notice
from runtime.tools.shell.verdict import Classification
from tests.conftest import make_settings

pytestmark = pytest.mark.skipif(
    not probe("bwrap").available, reason=f"bubblewrap does not work here: {probe('bwrap').detail}"
)

# In the bot's environment (a credential: redaction would mask it, so tests also
# check that nothing needed masking).
CANARY = "xoxb-canary-" + uuid.uuid4().hex
# In files: plain words redaction leaves alone, so a leak would show.
MARK = "plainmark" + str(uuid.uuid4().int)[:8]


def _forced(profile: str | None = None, claim: str | None = None):
    """A classifier that calls everything read-only: the bypass the issue asks for.

    The parse (the simple commands found) stays the real classifier's; only the
    verdict is forced. `claim` makes it also misread the whole command as that
    one program (a fooled parse), to reach a profile's own rights."""

    def classify_everything_read_only(command: str) -> Classification:
        parsed = real_classify(command)
        return parsed.model_copy(
            update={
                "action_type": "read",
                "risk_level": "low",
                "requires_approval": False,
                "blocked": False,
                "reason": "forced read-only (classifier bypassed by the test)",
                "commands": [[claim]] if claim else parsed.commands,
                "simple": False,
                "sandbox_profile": profile,
            }
        )

    return classify_everything_read_only


@pytest.fixture
def bypass(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Force "read-only" where tool.py and execution.py import `classify`."""

    def force(profile: str | None = None, claim: str | None = None) -> None:
        fake = _forced(profile, claim)
        monkeypatch.setattr(tool_module, "classify", fake)
        monkeypatch.setattr(execution_module, "classify", fake)

    force()
    yield force


@pytest_asyncio.fixture
async def rt(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Runtime]:
    monkeypatch.setenv("SLACK_BOT_TOKEN", CANARY)
    runtime = await build_runtime(make_settings(tmp_path, shell_timeout=20))
    try:
        yield runtime
    finally:
        await runtime.close()


async def _events(runtime: Runtime, task_id: str) -> list[Event]:
    return await runtime.stores.events.list_events(task_id)


async def _run(runtime: Runtime, command: str) -> tuple[Any, dict[str, Any], list[Event]]:
    result = await runtime.loop.run_command(command, str(runtime.settings.workspace))
    events = await _events(runtime, result.task_id)
    audits = [e.payload for e in events if e.event_type == "command_audit"]
    assert len(audits) == 1, [e.event_type for e in events]
    return result, audits[0], events


def _refused(events: list[Event]) -> list[str]:
    return [r for e in events if e.event_type == "sandbox_refusal" for r in e.payload["refused"]]


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the acceptance: each one stopped, each one audited --------------------------


async def test_touch_is_refused_and_audited(rt: Runtime, bypass: Any) -> None:
    ws = rt.settings.workspace
    result, audit, events = await _run(rt, "touch x")
    assert not (ws / "x").exists()
    assert audit["sandboxed"] is True and audit["ok"] is False
    assert "read-only filesystem" in _refused(events)
    assert "Read-only file system" in result.final_response
    # `ducklm events` and `/duck task` show the refusal too.
    (refusal,) = [e for e in events if e.event_type == "sandbox_refusal"]
    assert "sandbox_refusal read-only filesystem" in describe_event(refusal)


async def test_rm_rf_of_the_workspace_leaves_every_file(rt: Runtime, bypass: Any) -> None:
    ws = rt.settings.workspace
    for name in ("a.txt", "b.log"):
        (ws / name).write_text(name)
    (ws / "sub").mkdir()
    (ws / "sub" / "c").write_text("c")
    _, audit, events = await _run(rt, f"rm -rf {ws}/*")
    assert sorted(p.name for p in ws.iterdir()) == ["a.txt", "b.log", "sub"]
    assert (ws / "sub" / "c").read_text() == "c"
    assert audit["sandboxed"] and "read-only filesystem" in _refused(events)


async def test_parent_environ_shows_nothing_of_the_bot(rt: Runtime, bypass: Any) -> None:
    result, audit, events = await _run(rt, "cat /proc/$PPID/environ; cat /proc/1/environ")
    assert CANARY not in result.final_response
    assert "[REDACTED" not in result.final_response
    assert "SLACK_BOT_TOKEN" not in result.final_response
    assert audit["sandboxed"]
    assert any("/proc entry" in r for r in _refused(events))


async def test_a_process_outside_is_out_of_reach(rt: Runtime, bypass: Any) -> None:
    # A stand-in for the bot with the token in its real (initial) environment.
    holder = await asyncio.create_subprocess_exec(
        "sleep", "60", env={"SLACK_BOT_TOKEN": CANARY, "PATH": os.defpath}
    )
    try:
        environ = Path(f"/proc/{holder.pid}/environ")
        # The control: it is there to steal (once the child has exec'd `sleep`:
        # until then its environ reads empty).
        deadline = time.monotonic() + 10
        while CANARY.encode() not in _read(environ):
            assert time.monotonic() < deadline, "the stand-in's environ never showed the token"
            await asyncio.sleep(0.01)
        result, audit, _ = await _run(rt, f"cat {environ}; ls /proc")
        assert CANARY not in result.final_response
        assert "[REDACTED" not in result.final_response
        assert audit["sandboxed"]
        # Its own PID namespace: only a handful of processes, not the host's.
        pids = [w for w in result.final_response.split() if w.isdigit()]
        assert str(holder.pid) not in pids
        assert len(pids) < 10, pids
    finally:
        holder.kill()
        await holder.wait()


async def test_the_database_cannot_be_written(rt: Runtime, bypass: Any) -> None:
    db = rt.settings.db
    before = _sha(db)
    _, audit, events = await _run(rt, f"sh -c 'echo x >> {db}'; cat {db}")
    assert _sha(db) == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert audit["sandboxed"]
    assert any(r.startswith("hidden path") for r in _refused(events))


async def test_database_inside_the_workspace_is_hidden(
    tmp_path: Path, clean_env: None, bypass: Any
) -> None:
    settings = make_settings(tmp_path, db=tmp_path / "workspace" / "ducklm.db")
    runtime = await build_runtime(settings)
    try:
        db = settings.db
        (settings.workspace / "notes.txt").write_text("visible")
        before = _sha(db)
        result, _, events = await _run(
            runtime, "cat notes.txt; echo; wc -c ducklm.db; echo x >> ducklm.db"
        )
        assert "visible" in result.final_response
        # /dev/null (on a nodev mount) stands in for it: neither read nor written.
        assert "ducklm.db: Permission denied" in result.final_response
        assert _sha(db) == before
        assert f"hidden path {db}" in _refused(events)
    finally:
        await runtime.close()


async def test_no_outbound_connection(rt: Runtime, bypass: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        command = f"bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}'"
        _, audit, events = await _run(rt, command)
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
    assert audit["sandboxed"] and audit["ok"] is False
    assert "network" in _refused(events)


async def test_a_4_gb_allocation_fails(rt: Runtime, bypass: Any) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python, "needs a system python3"
    result, audit, events = await _run(rt, f'{python} -c "x = bytearray(4 << 30)"')
    assert audit["sandboxed"] and audit["ok"] is False
    assert "MemoryError" in result.final_response
    assert "memory limit" in _refused(events)


# -- hidden paths, profiles, sockets -------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A $HOME outside /tmp (which the sandbox replaces anyway), with credentials in it."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else tmp_path
    home = base / f"ducklm-home-{uuid.uuid4().hex[:8]}"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(f"ssh {MARK}\n")
    (home / ".kube").mkdir()
    (home / ".kube" / "config").write_text(f"kube {MARK}\n")
    (home / "notes.txt").write_text("plain notes\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def test_home_credentials_and_env_file_are_hidden(
    rt: Runtime, bypass: Any, home: Path
) -> None:
    (rt.settings.workspace / ".env").write_text(f"SLACK_BOT_TOKEN={MARK}\n")
    command = f"cat {home}/notes.txt {home}/.ssh/id_rsa {home}/.kube/config .env; ls -a {home}"
    result, _, events = await _run(rt, command)
    assert "plain notes" in result.final_response  # the rest of $HOME is readable
    assert MARK not in result.final_response
    refused = _refused(events)
    assert f"hidden path {home}/.ssh/id_rsa" in refused
    assert any(r.endswith("/.env") for r in refused)


async def test_kubeconfig_visible_only_in_the_kubernetes_profile(
    rt: Runtime, bypass: Any, home: Path
) -> None:
    command = f"cat {home}/.kube/config; cat {home}/.ssh/id_rsa"
    result, _, _ = await _run(rt, command)
    assert MARK not in result.final_response
    bypass("kubernetes", claim="kubectl")
    result, audit, _ = await _run(rt, command)
    assert audit["sandbox_profile"] == "kubernetes"
    assert f"kube {MARK}" in result.final_response
    assert f"ssh {MARK}" not in result.final_response  # nothing else hidden comes back


async def test_kubeconfig_named_by_the_environment(
    rt: Runtime, bypass: Any, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = home / "clusters" / "prod.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(f"prod {MARK}\n")
    monkeypatch.setenv("KUBECONFIG", str(elsewhere))
    result, _, _ = await _run(rt, f"cat {elsewhere}")
    assert MARK not in result.final_response
    bypass("kubernetes", claim="kubectl")
    result, _, _ = await _run(rt, 'cat "$KUBECONFIG"')
    assert f"prod {MARK}" in result.final_response


async def test_kubeconfig_under_a_hidden_root_home(
    rt: Runtime, bypass: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A $HOME under /root: /root is hidden whole (tmpfs), so the kubeconfig must be
    # bound back on top of it, and nothing else of /root with it.
    if not os.access("/root", os.W_OK):
        pytest.skip("needs a writable /root (runs as root in CI)")
    home = Path("/root") / f"ducklm-home-{uuid.uuid4().hex[:8]}"
    try:
        (home / ".kube").mkdir(parents=True)
        (home / ".kube" / "config").write_text(f"kube {MARK}\n")
        (home / "other").write_text(f"other {MARK}\n")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        bypass("kubernetes", claim="kubectl")
        result, audit, _ = await _run(rt, f"cat {home}/.kube/config {home}/other")
        assert audit["sandbox_profile"] == "kubernetes"
        assert f"kube {MARK}" in result.final_response
        assert f"other {MARK}" not in result.final_response
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def unix_listener() -> Iterator[tuple[Path, socket.socket]]:
    run = Path("/run")
    if not os.access(run, os.W_OK):
        pytest.skip("needs a writable /run")
    path = run / f"ducklm-test-{uuid.uuid4().hex[:8]}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(5)
    server.settimeout(0.5)
    try:
        yield path, server
    finally:
        server.close()
        path.unlink(missing_ok=True)


async def test_control_sockets_are_covered(
    rt: Runtime, bypass: Any, unix_listener: tuple[Path, socket.socket]
) -> None:
    path, server = unix_listener
    python = shutil.which("python3", path="/usr/bin:/bin")
    code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r})"
    _, audit, _ = await _run(rt, f'{python} -c "{code}"')
    assert audit["sandboxed"] and audit["ok"] is False
    with pytest.raises(TimeoutError):
        server.accept()
    # The control: the same connection from outside the sandbox does arrive.
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    server.accept()[0].close()
    client.close()


@pytest.fixture
def docker_socket() -> Iterator[tuple[str, socket.socket]]:
    """A listener where the docker engine's socket would be (none is running here)."""
    sock = "/run/docker.sock"
    if os.path.lexists(sock) or not os.access("/run", os.W_OK):
        pytest.skip("a real docker socket is here (or /run is not writable)")
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock)
    server.listen(5)
    server.settimeout(5)
    try:
        yield sock, server
    finally:
        server.close()
        os.unlink(sock)


async def test_docker_socket_only_in_the_docker_profile(
    tmp_path: Path, bypass: Any, docker_socket: tuple[str, socket.socket]
) -> None:
    sock, server = docker_socket
    python = shutil.which("python3", path="/usr/bin:/bin")
    command = f"{python} -c \"import socket; socket.socket(socket.AF_UNIX).connect('{sock}')\""
    hidden = await execute(command, classify("x"), workspace=tmp_path)
    assert hidden.metadata["sandboxed"] and not hidden.ok
    bypass("docker", claim="docker")
    shown = await execute(command, classify("x"), workspace=tmp_path)
    assert shown.metadata["sandbox_profile"] == "docker"
    assert shown.ok, shown.output
    server.accept()[0].close()


# -- runaway commands ----------------------------------------------------------------


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def _until_gone(marker: str, within: float = 10.0) -> list[int]:
    """Bounded wait until no host process carries `marker`; what is left after that."""
    deadline = time.monotonic() + within
    left = _host_processes_with(marker)
    for _ in range(int(within / 0.05) + 1):
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
        left = _host_processes_with(marker)
    return left


async def test_timeout_kills_everything_in_the_sandbox(tmp_path: Path, bypass: Any) -> None:
    marker = "3" + str(uuid.uuid4().int)[:6]
    command = f"sleep {marker} & (setsid sleep {marker} &) ; sleep {marker}"
    started = time.monotonic()
    result = await execute(command, classify("x"), workspace=tmp_path, timeout=1)
    assert result.metadata["timed_out"] and result.metadata["sandboxed"]
    assert time.monotonic() - started < 10
    assert await _until_gone(f"sleep\x00{marker}") == []


async def test_background_jobs_die_with_the_command(tmp_path: Path, bypass: Any) -> None:
    marker = "4" + str(uuid.uuid4().int)[:6]
    result = await execute(
        f"(setsid sleep {marker} > /dev/null 2>&1 &); echo started",
        classify("x"),
        workspace=tmp_path,
        timeout=10,
    )
    assert result.ok and result.metadata["sandboxed"]
    assert await _until_gone(f"sleep\x00{marker}") == []


async def test_cpu_time_is_limited(tmp_path: Path, bypass: Any) -> None:
    config = SandboxConfig(limits=ResourceLimits(cpu_seconds=1))
    result = await execute(
        "while :; do :; done", classify("x"), workspace=tmp_path, timeout=30, sandbox=config
    )
    assert not result.metadata["timed_out"]
    assert "CPU time limit" in result.metadata["sandbox_refusals"]


async def test_file_size_is_limited(tmp_path: Path, bypass: Any) -> None:
    limits = ResourceLimits(file_size=1 << 20)
    config = SandboxConfig(limits=limits)
    result = await execute(
        "head -c 5000000 /dev/zero > /tmp/big", classify("x"), workspace=tmp_path, sandbox=config
    )
    assert not result.ok
    assert "file size limit" in result.metadata["sandbox_refusals"]


@pytest.mark.skipif(
    os.geteuid() == 0 and not cgroups.available(),
    reason="root without a pids cgroup: RLIMIT_NPROC does not bind root (documented limit)",
)
async def test_a_fork_bomb_is_contained(tmp_path: Path, bypass: Any) -> None:
    limits = ResourceLimits(processes=64)
    config = SandboxConfig(limits=limits)
    name = f"bomb_{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    result = await execute(
        f"{name}() {{ {name} | {name} & }}; {name}; sleep 60",
        classify("x"),
        workspace=tmp_path,
        timeout=5,
        sandbox=config,
    )
    assert time.monotonic() - started < 30
    assert result.metadata["sandboxed"] and result.metadata["timed_out"]
    assert "process limit" in result.metadata["sandbox_refusals"]
    # Nothing of it is left on the host (each copy's cmdline carries the name).
    assert await _until_gone(name) == []


# -- approved commands, modes, and the fail-safe path ---------------------------------


async def test_approved_commands_still_write(rt: Runtime) -> None:
    ws = rt.settings.workspace
    waiting = await rt.loop.run_command("touch made", str(ws))
    assert waiting.status == "waiting_for_approval"
    approval_id = waiting.pending_approval.approval_id
    await rt.approvals.decide(approval_id, "approve", "cli:tester")
    done = await rt.loop.continue_after_approval(waiting.task_id, approval_id)
    assert done.status == "completed", done.final_response
    assert (ws / "made").exists()
    audits = [e.payload for e in await _events(rt, done.task_id) if e.event_type == "command_audit"]
    assert audits[-1]["sandboxed"] is False and audits[-1]["approved_by"] == "cli:tester"


async def test_read_only_commands_are_audited_as_sandboxed(rt: Runtime) -> None:
    (rt.settings.workspace / "f").write_text("x")
    result, audit, events = await _run(rt, "ls")
    assert result.status == "completed" and "f" in result.final_response
    assert audit["sandboxed"] is True and audit["sandbox_profile"] == "default"
    assert not _refused(events)


async def test_mode_all_sandboxes_approved_commands_with_a_writable_workspace(
    tmp_path: Path,
) -> None:
    outside = Path("/var/tmp") / f"ducklm-outside-{uuid.uuid4().hex[:8]}"
    config = SandboxConfig(mode="all")
    command = f"touch made && touch {outside}"
    try:
        result = await execute(command, classify(command), workspace=tmp_path, sandbox=config)
        assert classify(command).requires_approval
        assert result.metadata["sandboxed"]
        assert (tmp_path / "made").exists()
        assert not outside.exists()
        assert "read-only filesystem" in result.metadata["sandbox_refusals"]
    finally:
        outside.unlink(missing_ok=True)


async def test_no_bwrap_means_every_command_needs_approval(tmp_path: Path, clean_env: None) -> None:
    settings = make_settings(tmp_path, bwrap=str(tmp_path / "no-such-bwrap"))
    config = SandboxConfig.from_settings(settings)
    notice = sandbox_notice(config)
    assert notice and "No sandbox" in notice and "DUCKLM_SANDBOX=off" in notice
    runtime = await build_runtime(settings)
    try:
        (settings.workspace / "f").write_text("x")
        waiting = await runtime.loop.run_command("ls", str(settings.workspace))
        assert waiting.status == "waiting_for_approval"
        assert "no sandbox available" in (waiting.pending_approval.reason or "")
        # A person approves: it runs (unsandboxed, as approved commands do).
        approval_id = waiting.pending_approval.approval_id
        await runtime.approvals.decide(approval_id, "approve", "cli:tester")
        done = await runtime.loop.continue_after_approval(waiting.task_id, approval_id)
        assert done.status == "completed" and "f" in done.final_response
    finally:
        await runtime.close()
    # execute() itself refuses an unasked command it cannot sandbox.
    refused = await execute("ls", classify("ls"), workspace=tmp_path, sandbox=config)
    assert not refused.ok and "no sandbox available" in (refused.error or "")


async def test_no_bwrap_on_path_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    probe.cache_clear()
    try:
        status = probe("bwrap")
        assert not status.available and "not found" in status.detail
    finally:
        monkeypatch.undo()
        probe.cache_clear()


async def test_mode_off_runs_unsandboxed(tmp_path: Path, clean_env: None) -> None:
    settings = make_settings(tmp_path, sandbox="off", bwrap=str(tmp_path / "no-such-bwrap"))
    config = SandboxConfig.from_settings(settings)
    assert "Sandbox off" in (sandbox_notice(config) or "")
    result = await execute("ls", classify("ls"), workspace=tmp_path, sandbox=config)
    assert result.ok and result.metadata["sandboxed"] is False


def test_bad_sandbox_settings_are_clear_errors(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unasked"):
        make_settings(tmp_path, sandbox="sometimes")
    with pytest.raises(ValidationError, match="not a size"):
        make_settings(tmp_path, sandbox_memory="lotsG")
    assert make_settings(tmp_path, sandbox_memory="512M").sandbox_memory == 512 << 20


async def test_owners_show_as_they_are(tmp_path: Path) -> None:
    # A root bot's sandbox has no user namespace (that would show every owner but
    # root as `nobody`); a non-root bot's does, and sees its own uid.
    owned = tmp_path / "owned"
    owned.write_text("x")
    uid = 12345 if os.geteuid() == 0 else os.geteuid()
    if os.geteuid() == 0:
        os.chown(owned, uid, uid)
    result = await execute("stat -c %u owned", classify("stat -c %u owned"), workspace=tmp_path)
    assert result.metadata["sandboxed"], result.metadata
    assert result.output.strip() == str(uid)


async def test_network_only_for_a_profile_that_names_it(rt: Runtime, bypass: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        bypass("dns", claim="dig")  # dig/host/nslookup keep the host's network
        python = shutil.which("python3", path="/usr/bin:/bin")
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"
        _, audit, _ = await _run(rt, f'{python} -c "{connect}"')
        assert audit["sandbox_profile"] == "dns" and audit["ok"] is True
        listener.accept()[0].close()  # it did arrive


@pytest.fixture
def db_dir() -> Iterator[Path]:
    """A database directory outside /tmp (which the sandbox replaces anyway)."""
    base = Path("/var/tmp") / f"ducklm-db-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_database_directory_and_matrix_files_are_hidden(
    tmp_path: Path, clean_env: None, bypass: Any, db_dir: Path
) -> None:
    settings = make_settings(tmp_path, db=db_dir / "ducklm.db")
    settings.matrix_state_dir.mkdir()
    (settings.matrix_state_dir / "session.json").write_text(f'{{"token": "{MARK}"}}')
    (db_dir / "backup.txt").write_text(MARK)
    runtime = await build_runtime(settings)
    try:
        before = _sha(settings.db)
        result, _, events = await _run(
            runtime, f"ls -a {db_dir}; cat {db_dir}/*/session.json {db_dir}/backup.txt"
        )
        assert MARK not in result.final_response
        assert "ducklm.db" not in result.final_response  # the listing is of an empty tmpfs
        assert _sha(settings.db) == before
        assert any(r.startswith(f"hidden path {db_dir}") for r in _refused(events))
    finally:
        await runtime.close()


async def test_a_profile_is_not_lent_to_the_other_parts_of_a_command(
    rt: Runtime, bypass: Any, home: Path
) -> None:
    # The classifier (bypassed) parses right but calls it read-only: kubectl's
    # profile must still not show its kubeconfig to `cat` beside it.
    bypass("kubernetes")
    result, audit, events = await _run(rt, f"kubectl version --client; cat {home}/.kube/config")
    assert MARK not in result.final_response
    assert audit["sandbox_profile"] == "default"
    assert any("kubernetes profile withheld" in r for r in _refused(events))
    # A plain filter in a pipe keeps it (here the kubeconfig is visible again).
    bypass("kubernetes")
    _, audit, events = await _run(rt, "kubectl version --client | grep -i client")
    assert audit["sandbox_profile"] == "kubernetes"
    assert not any("withheld" in r for r in _refused(events))


async def test_kernel_knobs_are_read_only(tmp_path: Path, bypass: Any) -> None:
    # A root bot's commands are uid 0: /proc/sys (mode 0644 root) must still refuse.
    # (Writing `1` to drop_caches would only drop clean caches, were it to get through.)
    result = await execute("echo 1 > /proc/sys/vm/drop_caches", classify("x"), workspace=tmp_path)
    assert result.metadata["sandboxed"] and not result.ok
    assert "read-only filesystem" in result.metadata["sandbox_refusals"]
    readable = await execute("cat /proc/sys/vm/swappiness", classify("x"), workspace=tmp_path)
    assert readable.ok and readable.output.strip().isdigit()


async def test_only_tmp_and_shm_are_writable_and_they_are_bounded(
    tmp_path: Path, bypass: Any
) -> None:
    config = SandboxConfig(limits=ResourceLimits(tmp_size=1 << 20))
    result = await execute(
        "echo x > /dev/filler; head -c 3000000 /dev/zero > /tmp/fill; ls -s /tmp/fill; "
        "echo ok > /dev/null && echo devnull-works",
        classify("x"),
        workspace=tmp_path,
        sandbox=config,
    )
    assert result.metadata["sandboxed"]
    assert "/dev/filler: Read-only file system" in result.output
    assert "No space left on device" in result.output  # /tmp holds 1 MiB here
    assert "devnull-works" in result.output
    assert "tmp space limit" in result.metadata["sandbox_refusals"]


@pytest.mark.skipif(not os.path.exists("/etc/shadow"), reason="no /etc/shadow here")
async def test_system_secrets_are_hidden(tmp_path: Path, bypass: Any) -> None:
    result = await execute("cat /etc/shadow", classify("x"), workspace=tmp_path)
    assert result.metadata["sandboxed"] and not result.ok
    assert "root:" not in result.output
    assert "hidden path /etc/shadow" in result.metadata["sandbox_refusals"]


async def test_a_profile_is_not_lent_through_a_redirection(
    rt: Runtime, bypass: Any, home: Path
) -> None:
    bypass("kubernetes")
    result, audit, events = await _run(rt, f"kubectl version --client; cat < {home}/.kube/config")
    assert MARK not in result.final_response
    assert audit["sandbox_profile"] == "default"
    assert any("redirection" in r for r in _refused(events))
    bypass("kubernetes")
    _, audit, _ = await _run(rt, "kubectl version --client 2>&1 | grep -i client")
    assert audit["sandbox_profile"] == "kubernetes"


async def test_secret_named_files_inside_the_workspace_are_hidden(rt: Runtime, bypass: Any) -> None:
    """`grep -rn x src` must not read `src/.env` nor a key deeper down, while the
    ordinary files beside them stay readable."""
    ws = rt.settings.workspace
    (ws / "src" / "deploy" / "keys").mkdir(parents=True)
    (ws / "src" / ".env").write_text(f"TOKEN={MARK}\n")
    (ws / "src" / "deploy" / "keys" / "server.key").write_text(f"key {MARK}\n")
    (ws / "src" / "deploy" / ".ssh").mkdir()
    (ws / "src" / "deploy" / ".ssh" / "id_ed25519").write_text(f"ssh {MARK}\n")
    (ws / "src" / "app.py").write_text(f"# app {MARK[:6]}\n")
    result, _, events = await _run(rt, f"grep -rn {MARK[:6]} src; cat src/.env")
    assert "app.py" in result.final_response  # the search itself ran
    assert MARK not in result.final_response
    refused = _refused(events)
    assert any(r.endswith("src/.env") for r in refused), refused
    assert (ws / "src" / ".env").read_text() == f"TOKEN={MARK}\n"  # left intact


async def test_credential_files_named_by_the_environment_are_hidden(
    rt: Runtime, bypass: Any, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$AWS_SHARED_CREDENTIALS_FILE (like $KUBECONFIG) may point anywhere."""
    creds = home / "cloud" / "aws-prod"
    creds.parent.mkdir()
    creds.write_text(f"aws {MARK}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    result, _, _ = await _run(rt, f"cat {creds}")
    assert MARK not in result.final_response
    assert creds.read_text() == f"aws {MARK}\n"


@pytest.fixture
def var_tmp(tmp_path: Path) -> Path:
    """A directory outside /tmp, which the sandbox replaces anyway."""
    return Path("/var/tmp") if os.path.isdir("/var/tmp") else tmp_path


async def test_unix_sockets_anywhere_and_the_keyring_are_refused(
    rt: Runtime, bypass: Any, var_tmp: Path
) -> None:
    """A control socket the /run scan cannot know (here under /var/tmp) stays out
    of reach, and so does the kernel keyring (seccomp: AF_UNIX and keyctl)."""
    from runtime.tools.shell import seccomp

    if not seccomp.available():
        pytest.skip("no libseccomp here")
    path = var_tmp / f"ducklm-sock-{uuid.uuid4().hex[:8]}.socket"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    server.setblocking(False)
    try:
        probe = (
            'python3 -c "import socket; s = socket.socket(socket.AF_UNIX); '
            f"s.connect('{path}'); print('conn' + 'ected')\""
        )
        result, _, _ = await _run(rt, probe)
        assert "connected" not in result.final_response
        assert "Address family not supported" in result.final_response
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the listener
        if platform.machine() == "x86_64":  # keyctl is syscall 250 there
            keyctl = "ctypes.CDLL(None).syscall(250, 0, -4)"  # KEYCTL_GET_KEYRING_ID, @u
            keys = f"python3 -c \"import ctypes; print('keyctl', {keyctl})\""
            result, _, _ = await _run(rt, keys)
            assert "keyctl -1" in result.final_response  # refused, whatever the key
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _memory_bound_available() -> bool:
    trial = cgroups.create(1, 1 << 20)
    if trial is None:
        return False
    trial.remove()
    return trial.memory_bound


@pytest.mark.skipif(
    not _memory_bound_available(),
    reason="needs a cgroup with the memory controller (a root bot)",
)
async def test_processes_of_one_command_share_one_memory_bound(tmp_path: Path, bypass: Any) -> None:
    """Three processes of 300 MiB each under a 512 MiB bound for the command: the
    address-space limit (per process) would let each through, the shared bound
    does not. Small on purpose: harmless if nothing stops it."""
    limits = ResourceLimits(address_space=512 << 20)
    hold = (
        'python3 -c "import time; b = bytearray(300 << 20); '
        "b[::4096] = bytes(len(b[::4096])); time.sleep(2); print('HE' + 'LD')\""
    )
    result = await execute(
        f"for i in 1 2 3; do {hold} & done; wait",
        _forced()(f"for i in 1 2 3; do {hold} & done; wait"),
        workspace=tmp_path,
        timeout=30,
        sandbox=SandboxConfig(limits=limits),
    )
    assert result.metadata["sandboxed"]
    held = result.output.splitlines().count("HELD")
    assert held < 3, result.output
    assert "memory limit" in result.metadata["sandbox_refusals"], result.metadata


def test_stale_cgroup_sweep_spares_live_processes() -> None:
    """At first use a process sweeps the empty per-command cgroups crashed bots left
    behind; one a live process (a CLI beside the bot) has just made, and not yet
    moved its child into, must survive, or that command fails to start."""
    alive = os.getpid()
    sleeper = asyncio.run(_spawn_and_reap())  # a pid that no longer runs
    assert cgroups._owner_alive(f"ducklm-cmd-{os.getppid()}-3")
    assert cgroups._owner_alive(f"ducklm-cmd-probe-{os.getppid()}")
    assert not cgroups._owner_alive(f"ducklm-cmd-{sleeper}-0")
    assert not cgroups._owner_alive(f"ducklm-cmd-probe-{sleeper}")
    assert not cgroups._owner_alive(f"ducklm-cmd-{alive}-7")  # our own: none is in use yet
    assert cgroups._owner_alive("ducklm-cmd-something-else")  # unknown: kept


async def _spawn_and_reap() -> int:
    process = await asyncio.create_subprocess_exec("true")
    await process.wait()
    return process.pid
