"""Shared fixtures: a runtime on a fresh store, talking to the fake model server.

The store is a SQLite file unless a test module opts in to both backends:

    pytestmark = pytest.mark.backends("sqlite", "postgres")

Then every test of the module that uses `db_target` (directly, or through the
`runtime` fixture) runs twice, `[sqlite]` and `[postgres]`, the latter on a fresh
database of the session's PostgreSQL server (tests/postgres.py). A test overrides
its module's choice with its own marker, e.g. SQLite-only with a reason:

    @pytest.mark.backends("sqlite", reason="reads the WAL file")

Modules without the marker stay on SQLite only, so the suite does not double in time;
DUCKLM_TEST_DB_BACKEND=postgres runs them (every test using `db_target` or `runtime`)
on PostgreSQL instead, to look for what would break there.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from runtime.factory import Runtime, build_runtime
from runtime.settings import Settings
from runtime.store import open_stores

if TYPE_CHECKING:
    from runtime.store import Stores
    from tests.fakes.openai_server import FakeModelServer
    from tests.fakes.slack_api import FakeSlack

pytest_plugins = ["tests.fakes.openai_server", "tests.fakes.synapse", "tests.postgres"]

BACKENDS = ("sqlite", "postgres")
# Read at import: the clean_env fixture clears DUCKLM_* before db_target runs.
DEFAULT_BACKEND = os.environ.get("DUCKLM_TEST_DB_BACKEND", "sqlite")
if DEFAULT_BACKEND not in BACKENDS:
    raise pytest.UsageError(f"DUCKLM_TEST_DB_BACKEND={DEFAULT_BACKEND}: not one of {BACKENDS}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names, reason=...): the store backends (sqlite, postgres) the tests "
        "using db_target or runtime run on; default sqlite only",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `db_backend` from the closest `backends` marker (test, class, module)."""
    if "db_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None:
        return
    names = list(marker.args)
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: backends() takes some of {BACKENDS}, got {names}"
        )
    metafunc.parametrize("db_backend", names, indirect=True, ids=names)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """Which store: parametrized by the `backends` marker, else the default ("sqlite")."""
    return str(getattr(request, "param", DEFAULT_BACKEND))


@pytest.fixture
def db_target(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """What DUCKLM_DB takes for this test: a fresh SQLite path, or the URL of a fresh
    PostgreSQL database that already has the current schema (copied from a template
    migrated once per session; a new SQLite file is migrated on open, which is cheap).

    PostgreSQL is looked up lazily, so a SQLite-only run never starts the server.
    """
    if db_backend != "postgres":
        yield str(tmp_path / "ducklm.db")
        return
    import shutil

    url = str(request.getfixturevalue("postgres_store_url"))
    # A URL taken for a file path becomes a SQLite file under ./postgresql:/… and the
    # test would pass on SQLite while claiming PostgreSQL: fail it instead.
    stray = Path(os.getcwd(), url.split("//", 1)[0])
    yield url
    if stray.exists():
        shutil.rmtree(stray, ignore_errors=True)
        pytest.fail(f"{url} was opened as a SQLite file path ({stray}/…), not as PostgreSQL")


@pytest_asyncio.fixture
async def stores(db_target: str) -> AsyncIterator[Stores]:
    """The stores, opened on this test's database (`db_target`) and closed after."""
    async with await open_stores(db_target) as opened:
        yield opened


THINKER = "test-thinker"
ACTION = "test-action"


def directive(*actions: dict[str, Any]) -> str:
    """The JSON an action model answers with."""
    return json.dumps({"actions": list(actions)})


def shell(command: str, reason: str = "test") -> dict[str, Any]:
    return {"tool": "shell_exec_safe", "args": {"command": command}, "reason": reason}


def make_settings(tmp_path: Path, base_url: str | None = None, **overrides: Any) -> Settings:
    """Settings built from explicit values only, never from the developer's environment."""
    workspace = tmp_path / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "db": tmp_path / "ducklm.db",
        "workspace": workspace,
        "thinker_model": THINKER,
        "action_model": ACTION,
        "model_max_retries": 1,
        "model_timeout": 10,
    }
    if base_url is not None:
        values["model_base_url"] = base_url
        values["model_api_key"] = "sk-test"
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own DUCKLM_*/SLACK_*/MATRIX_* variables out of a test."""
    for name in list(os.environ):
        if name.startswith(("DUCKLM_", "SLACK_", "MATRIX_", "OPENAI_")):
            monkeypatch.delenv(name)


@pytest_asyncio.fixture
async def runtime(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None, db_target: str
) -> AsyncIterator[Runtime]:
    rt = await build_runtime(make_settings(tmp_path, model_server.base_url, db=db_target))
    try:
        yield rt
    finally:
        await rt.close()


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    """A started fake Slack Web API (and Socket Mode endpoint), stopped after the test."""
    from tests.fakes.slack_api import FakeSlack

    fake = FakeSlack()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def model(model_server: FakeModelServer) -> FakeModelServer:
    """The fake model: no tools and "Done." unless a test scripts more."""
    from tests.fakes.openai_server import Text

    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text("Done."))
    return model_server
