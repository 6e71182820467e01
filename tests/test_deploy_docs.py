"""docs/deploy.md and deploy/k8s/ stay true to the code.

- every manifest is valid YAML, and the pieces fit together (the probes hit
  the container's HTTP port, the Service and the PodDisruptionBudget select
  the Deployment's pods, env comes from the ConfigMap and Secret that exist);
- every variable the docs and manifests name is a setting in
  runtime/settings.py, and the defaults the tables give are the settings';
- every `ducklm …` command the docs show is one the CLI parses;
- every relative link (and its #anchor) resolves.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from bot.cli import _parser
from runtime.settings import Settings
from runtime.store.pg_baseline import VERSION_TABLE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
K8S = ROOT / "deploy" / "k8s"
DOCS = (DEPLOY_DOC, ARCHITECTURE, README)

_VARIABLE = re.compile(r"\b(?:DUCKLM|SLACK|MATRIX)_[A-Z0-9_]+\b")
# DUCKLM_CRASH_AT and the kill-test seeds are test seams (README's test
# paragraph, docs/architecture.md's crash points), not settings.
_TEST_SEAMS = {"DUCKLM_CRASH_AT", "DUCKLM_KILL_SEEDS", "DUCKLM_KILL_SEED_FIRST"}


def setting_fields() -> dict[str, str]:
    """Environment variable -> the Settings field it sets."""
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            if isinstance(choice, str):
                names[choice] = field_name
    return names


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                found.append((path, document))
    return found


def one(kind: str) -> dict[str, Any]:
    matches = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in deploy/k8s, found {len(matches)}"
    return matches[0]


def test_every_manifest_parses_and_names_itself() -> None:
    found = manifests()
    kinds = {doc["kind"] for _, doc in found}
    assert {"Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Job"} <= kinds
    for path, doc in found:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"]["name"], path


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_probes_the_http_port_the_config_names() -> None:
    deployment, config = one("Deployment"), one("ConfigMap")
    assert deployment["spec"]["replicas"] == 3
    container = _container(deployment)
    assert container["command"] == ["ducklm", "run"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(config["data"]["DUCKLM_HTTP_PORT"])
    assert config["data"]["DUCKLM_SLACK_MODE"] == "http"  # the port serves Slack and the probes
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    # SIGTERM's drain ends before Kubernetes' SIGKILL, leaving time for a clean stop.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert Settings(shutdown_drain=config["data"]["DUCKLM_SHUTDOWN_DRAIN"]).shutdown_drain < grace
    # Each replica names itself after its pod (the owner of its tasks and leases).
    env = {item["name"]: item for item in container["env"]}
    assert env["DUCKLM_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_env_comes_from_manifests_that_exist_and_names_real_settings() -> None:
    settings = setting_fields()
    secret, config = one("Secret"), one("ConfigMap")
    for name in [*secret["stringData"], *config["data"]]:
        assert name in settings, f"{name} in deploy/k8s is not a setting in runtime/settings.py"
    sources = _container(one("Deployment"))["envFrom"]
    assert {source["configMapRef"]["name"] for source in sources if "configMapRef" in source} == {
        config["metadata"]["name"]
    }
    assert {source["secretRef"]["name"] for source in sources if "secretRef" in source} == {
        secret["metadata"]["name"]
    }
    # Together they are a configuration DuckLM accepts (each value valid, the
    # heartbeat at most half the replica timeout, ...) for replicas on PostgreSQL.
    settings_of_pod = Settings.model_validate({**config["data"], **secret["stringData"]})
    assert settings_of_pod.db_is_postgres
    assert settings_of_pod.effective_slack_mode == "http" and settings_of_pod.slack_configured


def test_service_and_budget_select_the_deployments_pods() -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {port["name"] for port in _container(deployment)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_migration_job_runs_db_migrate_on_the_secrets_url() -> None:
    job, secret = one("Job"), one("Secret")
    container = _container(job)
    assert container["command"] == ["ducklm", "db", "migrate"]
    (db,) = [item for item in container["env"] if item["name"] == "DUCKLM_DB"]
    ref = db["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # The Job's pods are not the Service's (they would never turn ready).
    labels = job["spec"]["template"]["metadata"].get("labels", {})
    assert not one("Service")["spec"]["selector"].items() <= labels.items()


def _config_rows(path: Path) -> list[str]:
    """Table rows that name variables (README: only its configuration table)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.startswith("| `")]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_variable_named_is_a_setting(path: Path) -> None:
    settings = setting_fields()
    text = path.read_text(encoding="utf-8")
    if path == README:
        text = "\n".join(_config_rows(path))
    named = set(_VARIABLE.findall(text)) - _TEST_SEAMS
    unknown = sorted(name for name in named if name not in settings)
    assert not unknown, f"{path.name} names variables runtime/settings.py does not have: {unknown}"


_ROW = re.compile(r"^\| `(DUCKLM_[A-Z0-9_]+)` \|.*\| ([^|]*) \|$")


def _documented_default(cell: str) -> str | None:
    """The first `literal` of a default cell, or None when it is prose."""
    match = re.match(r"`([^`]*)`", cell.strip())
    return match.group(1) if match else None


def _same(documented: str, actual: object) -> bool:
    if isinstance(actual, bool):
        return documented.lower() == str(actual).lower()
    if isinstance(actual, int | float):
        try:
            return float(documented) == float(actual)
        except ValueError:
            return False
    return documented == str(actual)


# The replica settings of issue #19, whose rows this test holds to the code
# in both tables (README's other rows predate it and say more than a literal).
REPLICA_SETTINGS = {
    "DUCKLM_DB",
    "DUCKLM_DB_POOL_SIZE",
    "DUCKLM_DATA_DIR",
    "DUCKLM_REPLICA_NAME",
    "DUCKLM_HEARTBEAT_INTERVAL",
    "DUCKLM_REPLICA_TIMEOUT",
    "DUCKLM_METRICS_PORT",
    "DUCKLM_SHUTDOWN_DRAIN",
}


@pytest.mark.parametrize("path", (DEPLOY_DOC, README), ids=lambda p: p.name)
def test_documented_defaults_are_the_settings_defaults(path: Path) -> None:
    fields = setting_fields()
    seen = set()
    for row in _config_rows(path):
        match = _ROW.match(row)
        if not match or match.group(1) not in REPLICA_SETTINGS:
            continue
        name, cell = match.groups()
        seen.add(name)
        default = Settings.model_fields[fields[name]].get_default(call_default_factory=False)
        documented = _documented_default(cell)
        if documented is None:
            # Prose ("the host name", "not served there") stands for "unset".
            assert default is None, f"{path.name}: {name}'s default is {default!r}, not {cell!r}"
        else:
            assert _same(documented, default), f"{path.name}: {name} says {documented!r}"
    assert seen == REPLICA_SETTINGS, f"{path.name} lacks rows for {REPLICA_SETTINGS - seen}"


# A command as the docs show one: at the start of a line, after a backtick, a
# prompt or a path (`.venv/bin/ducklm run`); not `createdb … ducklm`.
_COMMAND = re.compile(r"(?m)(?:^|`|\$ |/)ducklm ((?:[a-z][a-z-]* ?)+)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_shown_is_one_the_cli_parses(path: Path) -> None:
    top = _subcommands(_parser())
    for words in _COMMAND.findall(path.read_text(encoding="utf-8")):
        first, *rest = words.split()
        assert first in top, f"{path.name} shows `ducklm {words.strip()}`: no such command"
        below = _subcommands(top[first])
        if below and rest:  # `ducklm db migrate`: the second word is one of db's
            assert rest[0] in below, f"{path.name} shows `ducklm {words.strip()}`: no such command"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(title.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https://…, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name} links to {target}: no such heading"


_METRIC = re.compile(r"\bducklm_[a-z_]+\b")


async def test_every_metric_named_is_one_metrics_renders(tmp_path: Path) -> None:
    """The names docs/deploy.md gives are in a real scrape: a registry with one
    observation of each kind, and the store-backed gauges read from a real store."""
    from runtime.metrics import Metrics
    from runtime.store.db import Database

    db = await Database.open(tmp_path / "ducklm.db")
    try:
        metrics = Metrics()
        metrics.watch_store(db)
        metrics.set_replica("r-1", "pod-a")
        metrics.decided("approve", 3.0)
        metrics.model_called("action", "m", 0.5)
        metrics.model_failed("action", "m", TimeoutError())
        metrics.tool_ran("shell_exec_safe", 0.1)
        metrics.api_error("slack", "chat.postMessage", "ratelimited")
        metrics.rate_limit("slack")
        metrics.duplicate("slack")
        await metrics.refresh()
        rendered = set(_METRIC.findall(metrics.exposition().decode()))
    finally:
        await db.close()
    # A histogram is named by its base name (its samples are _bucket, _sum, _count).
    for name in list(rendered):
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            if name.endswith(suffix):
                rendered.add(name.removesuffix(suffix))
    named = set(_METRIC.findall(DEPLOY_DOC.read_text(encoding="utf-8")))
    # Not metrics: the PostgreSQL objects the schema creates under the same prefix.
    named -= {VERSION_TABLE, "ducklm_chain_at", "ducklm_schedules_replan"}
    assert named, "docs/deploy.md names no metric"
    missing = sorted(name for name in named if name not in rendered)
    assert not missing, f"docs/deploy.md names metrics /metrics does not have: {missing}"


def test_deploy_doc_names_every_manifest() -> None:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    unnamed = [path.name for path in sorted(K8S.glob("*.yaml")) if path.name not in text]
    assert not unnamed, f"docs/deploy.md does not say what these are: {unnamed}"


# Names the deploy docs cite that belong to other software (PostgreSQL,
# PgBouncer, kube-state-metrics, psycopg), not to DuckLM's code.
EXTERNAL_NAMES = {
    "kube_deployment_status_replicas_available",
    "max_connections",
    "max_prepared_statements",
    "pg_dump",
    "prepare_threshold",
}


def _replica_texts() -> dict[str, str]:
    architecture = ARCHITECTURE.read_text(encoding="utf-8")
    section = architecture[
        architecture.index("## Several replicas") : architecture.index("## The audit chain")
    ]
    return {"docs/deploy.md": DEPLOY_DOC.read_text(encoding="utf-8"), "architecture": section}


def test_code_names_the_replica_docs_cite_exist_in_the_code() -> None:
    """Every `identifier` (snake_case, CamelCase, Class.method) in docs/deploy.md and
    architecture's Several replicas section is in runtime/ or bot/ (or is another
    program's, listed above): a rename in the code must not leave the docs behind."""
    source = "\n".join(
        path.read_text(encoding="utf-8")
        for package in ("runtime", "bot")
        for path in (ROOT / package).rglob("*.py")
    )
    for where, text in _replica_texts().items():
        missing = []
        for token in sorted(set(re.findall(r"`([A-Za-z_][\w.]*)`", text))):
            if token.startswith(("DUCKLM_", "SLACK_", "MATRIX_", "ducklm_")):
                continue  # settings and metrics: checked above
            if token in EXTERNAL_NAMES or re.search(r"\.(py|md|yaml|json|db|key)$", token):
                continue
            if "_" not in token and "." not in token and not re.search(r"[a-z][A-Z]", token):
                continue  # plain words (`running`, `leases`)
            if token.split(".")[-1] not in source:
                missing.append(token)
        assert not missing, f"{where} cites names the code does not have: {missing}"
