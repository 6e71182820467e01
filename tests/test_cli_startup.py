"""The command line starts fast because it imports only what a subcommand uses.

Each check runs the real entry point in a fresh interpreter and reads
`sys.modules` afterwards: the shell parser (bashlex builds its parser tables
at import), the model client and the platform libraries must not be loaded
by `--help` or by the read-only subcommands. bench/cli_startup.py measures
the time itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("bashlex", "httpx", "nio", "slack_bolt", "slack_sdk", "aiohttp", "apscheduler")

PROBE = """
import contextlib, io, json, sys
from bot.cli import main
out = io.StringIO()
code = 0
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
loaded = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"code": code, "out": out.getvalue(), "loaded": loaded}))
"""


def run_cli(tmp_path: Path, *args: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "--db", str(tmp_path / "duck.db"), *args],
        cwd=tmp_path,  # no .env of the repository's
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_imports_neither_pydantic_nor_the_runtime(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--help")
    assert result["code"] == 0 and "tasks" in result["out"]
    loaded = set(result["loaded"])
    assert not loaded & {"pydantic", "pydantic_settings", "runtime", *HEAVY}


@pytest.mark.parametrize(
    "args",
    [("tasks",), ("events", "no-such-task"), ("approvals",), ("rules",), ("rules", "list")],
)
def test_read_only_subcommands_load_no_shell_parser_model_client_or_platform(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = run_cli(tmp_path, *args)
    assert result["code"] in (0, 1)  # `events` of an unknown task says so and exits 1
    assert not set(result["loaded"]) & set(HEAVY), result["loaded"]
    assert (tmp_path / "duck.db").exists()  # it did open the store


def test_the_read_only_path_still_answers(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "tasks")["out"].strip() == "No tasks yet."
    assert "No rules" in run_cli(tmp_path, "rules")["out"]
    assert "No approvals are pending" in run_cli(tmp_path, "approvals")["out"]
