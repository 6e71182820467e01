"""The per-channel policy file (issue #20): loading, every error with its line
and key (TOML and YAML), precedence over the environment, and the CLI
(`ducklm policy check`, `ducklm run`/`console` refusing an invalid file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.policy import AccessPolicy
from bot.policy_file import BUILTIN_TOOLS, PolicyFileError, load_policy_file, parse_policy
from runtime.store.models import Approval
from tests.conftest import make_settings

DATA = Path(__file__).parent / "data" / "policy"
DOCS = Path(__file__).parent.parent / "docs" / "policy.md"

pytestmark = pytest.mark.usefixtures("clean_env")


def errors_of(text: str, path: Path) -> list[str]:
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, path)
    return caught.value.errors


def line_and_key(errors: list[str]) -> list[tuple[int, str]]:
    """`file:12: key: message` -> (12, key)."""
    out = []
    for error in errors:
        found = re.match(r"[^:]+:(\d+): (.+?): ", error)
        assert found, error
        out.append((int(found.group(1)), found.group(2)))
    return out


def approval(requested_by: str = "slack:UASK00001", risk: str = "medium") -> Approval:
    from datetime import UTC, datetime

    return Approval(
        approval_id="a1",
        task_id="t1",
        action={"tool": "shell_exec_safe", "args": {"command": "touch x"}},
        tool="shell_exec_safe",
        command="touch x",
        risk_level=risk,
        requested_by=requested_by,
        created_at=datetime.now(UTC),
    )


# -- every error kind, with its line and key --------------------------------------------


def test_every_error_of_the_bad_toml_file_names_its_line_and_key() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(DATA / "bad.toml")
    errors = caught.value.errors
    assert all(e.startswith(f"{DATA / 'bad.toml'}:") for e in errors)
    assert line_and_key(errors) == [
        (2, "owner"),
        (6, "default.four_eyes_risk"),
        (11, 'channels."slack:CPROD0001".approvers[1]'),
        (13, 'channels."slack:CPROD0001".tools[1]'),
        (14, 'channels."slack:CPROD0001".quorum.high'),
        (15, 'channels."slack:CPROD0001".workspace'),
        (18, 'channels."slack:CSTAGE001".admins'),
        (19, 'channels."slack:CSTAGE001".escalate_after'),
        (21, 'channels."#general"'),
        (25, 'channels."matrix:!ops:example.org".team'),
    ]
    text = "\n".join(errors)
    assert "unknown key 'owner' (allowed here: channels, default)" in text
    assert "must be one of low, medium, high, critical, off" in text
    assert "not a user id: 'bob'" in text
    assert "no tool is called 'rm_rf'" in text and "shell_exec_safe" in text
    assert "a quorum counts 1 to 10 approvers, not 0" in text
    assert "not a duration: '30 parsecs'" in text
    assert "no-such-dir does not exist" in text
    assert "must be a list, not 'slack:UADMIN001'" in text
    assert "not a channel: '#general'" in text
    assert "only Slack channels belong to a workspace" in text


def test_every_error_of_the_bad_yaml_file_names_its_line_and_key() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(DATA / "bad.yaml")
    assert line_and_key(caught.value.errors) == [
        (2, "owner"),
        (5, "default.four_eyes_risk"),
        (10, 'channels."slack:CPROD0001".approvers[1]'),
        (11, 'channels."slack:CPROD0001".tools[1]'),
        (13, 'channels."slack:CPROD0001".quorum.high'),
        (16, 'channels."slack:CSTAGE001".escalate_after'),
        (17, 'channels."slack:CSTAGE001".admins'),  # given twice
        (18, 'channels."#general"'),
        (21, 'channels."matrix:!ops:example.org".team'),
    ]
    assert "given twice" in caught.value.errors[6]


def test_syntax_errors_name_their_line(tmp_path: Path) -> None:
    (toml,) = errors_of('[default]\napprovers = ["slack:U1"\n', tmp_path / "p.toml")
    assert toml.startswith(f"{tmp_path / 'p.toml'}:2: TOML syntax error:")
    (dup,) = errors_of("[default]\nadmins = []\nadmins = []\n", tmp_path / "p.toml")
    assert dup.startswith(f"{tmp_path / 'p.toml'}:3: TOML syntax error:")
    (yaml,) = errors_of("default:\n  approvers: [slack:U1\n", tmp_path / "p.yaml")
    assert re.match(rf"{re.escape(str(tmp_path / 'p.yaml'))}:\d+: YAML syntax error:", yaml)


def test_semantic_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    text = """\
[channels."slack:T0AAAAAA1/C0SHARED1"]
team = "T0BBBBBB1"

[channels."slack:C0SHARED2"]
team = "T0AAAAAA1"
workspace = "a-file"

[channels."slack:T0AAAAAA1/C0SHARED2"]
approvers = []
"""
    errors = errors_of(text, tmp_path / "p.toml")
    assert line_and_key(errors) == [
        (2, 'channels."slack:T0AAAAAA1/C0SHARED1".team'),
        (6, 'channels."slack:C0SHARED2".workspace'),
        (8, 'channels."slack:T0AAAAAA1/C0SHARED2"'),
    ]
    assert "is not the workspace in the section's name (T0AAAAAA1)" in errors[0]
    assert "a-file is not a directory" in errors[1]
    assert "the same channel as section 'slack:C0SHARED2'" in errors[2]


def test_inline_tables_and_wrong_types(tmp_path: Path) -> None:
    text = 'default = { approvers = ["slack:U0A"], tools = "read_file" }\nchannels = 3\n'
    errors = errors_of(text, tmp_path / "p.toml")
    assert line_and_key(errors) == [(1, "default.tools"), (2, "channels")]
    assert "must be a list, not 'read_file'" in errors[0]
    assert "must be a table of sections" in errors[1]


def test_missing_unreadable_and_directory(tmp_path: Path) -> None:
    for path, needle in (
        (tmp_path / "nope.toml", "no such file"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(PolicyFileError) as caught:
            load_policy_file(path)
        assert caught.value.errors == [
            f"{path}: {needle}" + caught.value.errors[0].split(needle)[1]
        ]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyFileError, match="cannot be read"):
        load_policy_file(binary)


def test_format_by_content_when_the_extension_says_nothing(tmp_path: Path) -> None:
    toml = parse_policy('# rights\n[default]\nfour_eyes_risk = "low"\n', tmp_path / "policy")
    yaml = parse_policy("# rights\ndefault:\n  four_eyes_risk: off\n", tmp_path / "policy")
    assert toml.default.four_eyes_risk == "low"
    assert yaml.default.four_eyes_risk == "off"  # YAML's bare off is a boolean; meant as off
    empty = parse_policy("", tmp_path / "p.yaml")
    assert empty.channels == () and empty.default.approvers is None


def test_builtin_tool_names_are_the_gateways(tmp_path: Path) -> None:
    from runtime.tools.gateway import ToolGateway

    assert set(ToolGateway.default(tmp_path).tools) == set(BUILTIN_TOOLS)


def test_the_examples_in_the_docs_are_valid_and_alike(tmp_path: Path) -> None:
    blocks = re.findall(r"```(toml|yaml)\n(.*?)```", DOCS.read_text(), re.S)
    assert [kind for kind, _ in blocks] == ["toml", "yaml"]
    (tmp_path / "staging").mkdir()
    (tmp_path / "prod").mkdir()
    loaded = []
    for kind, body in blocks:
        path = tmp_path / f"policy.{kind}"
        path.write_text(body.replace("/srv/prod", str(tmp_path / "prod")))
        loaded.append(load_policy_file(path))
    toml, yaml = loaded
    assert toml.default == yaml.default
    assert [(r.name, r.team, r.section, r.workspace) for r in toml.channels] == [
        (r.name, r.team, r.section, r.workspace) for r in yaml.channels
    ]
    summary = "\n".join(toml.summary()[1:])
    assert summary in DOCS.read_text()  # the docs show what `policy check` prints


# -- precedence: environment < default section < channel section ----------------------


def test_precedence_and_lists_replace(tmp_path: Path) -> None:
    (tmp_path / "prod").mkdir()
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(
        """\
[default]
admins = ["slack:U0FILEADM"]
tools = ["read_file", "shell_exec_safe"]

[channels."slack:C0PROD001"]
approvers = ["slack:U0PROD001"]
four_eyes_risk = "medium"
workspace = "prod"

[channels."slack:C0EMPTY01"]
approvers = []
tools = []

[channels."slack:T0OTHER01/C0PROD001"]
approvers = ["slack:U0OTHER01"]
"""
    )
    settings = make_settings(
        tmp_path,
        approvers=["slack:U0ENVAPP1"],
        admins=["slack:U0ENVADM1"],
        schedulers=["slack:U0ENVSCH1"],
        four_eyes_risk="critical",
        policy_file=policy_path,
    )
    policy = AccessPolicy.from_settings(settings)
    default = policy.default
    # the environment, with what the file's default sets replacing it
    assert default.section == "default"
    assert default.approvers == {"slack:U0ENVAPP1"}
    assert default.admins == {"slack:U0FILEADM"}  # replaced, not extended
    assert default.schedulers == {"slack:U0ENVSCH1"}
    assert default.four_eyes_risk == "critical"
    assert default.workspace == str(settings.workspace)
    assert default.tools == {"read_file", "shell_exec_safe"}

    prod = policy.for_channel("slack", "C0PROD001")
    assert prod.section == "slack:C0PROD001"
    assert prod.approvers == {"slack:U0PROD001"}
    assert prod.admins == {"slack:U0FILEADM"}  # from the default section
    assert prod.four_eyes_risk == "medium"
    assert prod.workspace == str(tmp_path / "prod")
    assert prod.tools == default.tools
    empty = policy.for_channel("slack", "C0EMPTY01")
    assert empty.approvers == frozenset() and empty.tools == frozenset()
    assert not empty.allows_tool("read_file")
    assert policy.for_channel("slack", "C0ELSEWHR") is default
    assert policy.for_conversation("slack:C0PROD001|1700000000.000100") == prod
    assert policy.for_conversation("console:alice") is default
    assert policy.for_conversation(None) is default

    # The workspace-bound section applies only where the bot is installed there.
    assert policy.for_channel("slack", "C0PROD001") == prod  # no home known yet
    policy.set_home("slack", "T0OTHER01")
    other = policy.for_channel("slack", "C0PROD001")
    assert other.section == "slack:T0OTHER01/C0PROD001"
    assert other.approvers == {"slack:U0OTHER01"}
    policy.set_home("slack", "T0HOME001")
    assert policy.for_channel("slack", "C0PROD001") == prod

    # Approvers of any section may ask; the start-up block names the file.
    assert policy.may_ask("slack:U0PROD001", origin="T0ELSEWHR")
    block = "\n".join(policy.startup_block())
    assert f"policy file: {policy_path} in force" in block and "3 channel section(s)" in block


def test_decisions_follow_the_channels_policy(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(
        """\
channels:
  slack:C0AAAAAA1:
    approvers: [slack:U0AAAAAA1, slack:UASK00001]
    four_eyes_risk: medium
  slack:C0BBBBBB1:
    approvers: [slack:U0BBBBBB1, slack:UASK00001]
    four_eyes_risk: "off"
"""
    )
    policy = AccessPolicy.from_settings(make_settings(tmp_path, policy_file=policy_path))
    a = policy.for_channel("slack", "C0AAAAAA1")
    b = policy.for_channel("slack", "C0BBBBBB1")
    pending = approval()
    assert policy.refuse_decision("slack:U0AAAAAA1", pending, "approve", a) is None
    refused = policy.refuse_decision("slack:U0BBBBBB1", pending, "approve", a)
    assert refused is not None and "not an approver in this channel" in refused
    assert "slack:C0AAAAAA1" in refused
    # four-eyes per channel: the requester may approve their own medium action in B only
    own = policy.refuse_decision("slack:UASK00001", pending, "approve", a)
    assert own is not None and "four-eyes" in own
    assert policy.refuse_decision("slack:UASK00001", pending, "approve", b) is None
    # the default section has no approvers: nobody decides in other channels
    elsewhere = policy.refuse_decision("slack:U0AAAAAA1", pending, "approve", policy.default)
    assert elsewhere is not None and "Nobody may approve actions in chat here" in elsewhere
    # without a channel, only who approves nowhere is refused
    assert policy.refuse_decision("slack:U0BBBBBB1", pending, "deny") is None
    assert "not an approver" in (policy.refuse_decision("slack:U0NOBODY1", pending, "deny") or "")
    # actors: admins and schedulers come from the channel too
    assert policy.actor("slack:U0AAAAAA1", a).is_approver
    assert not policy.actor("slack:U0AAAAAA1", b).is_approver


def test_mcp_wildcards_and_tool_refusals(tmp_path: Path) -> None:
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(
        '[channels."slack:C0AAAAAA1"]\ntools = ["read_file", "mcp__grafana__*", '
        '"mcp__jira__search"]\n'
    )
    policy = AccessPolicy.from_settings(make_settings(tmp_path, policy_file=policy_path))
    where = policy.for_channel("slack", "C0AAAAAA1")
    assert where.allows_tool("mcp__grafana__query") and where.allows_tool("mcp__jira__search")
    assert not where.allows_tool("mcp__jira__create") and not where.allows_tool("shell_exec_safe")
    refusal = policy.tool_refusal("slack:C0AAAAAA1|1.2", "shell_exec_safe")
    assert refusal is not None and "shell_exec_safe may not be used here" in refusal
    assert policy.tool_refusal("slack:C0OTHER01|1.2", "shell_exec_safe") is None
    assert policy.tool_refusal(None, "shell_exec_safe") is None


def test_without_a_file_nothing_changes(tmp_path: Path) -> None:
    policy = AccessPolicy.from_settings(make_settings(tmp_path, approvers=["slack:U0A"]))
    assert policy.policy_file is None and policy.sections == {}
    assert policy.for_channel("slack", "C1").section == "environment"
    assert policy.for_channel("slack", "C1").tools is None
    assert "Policy here: the environment" in policy.default.describe()[0]
    refused = policy.refuse_decision("slack:U0B", approval(), "approve", policy.default)
    assert refused is not None and "DUCKLM_APPROVERS" in refused


# -- the CLI: real `ducklm` subprocesses ------------------------------------------------


def ducklm(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DUCKLM_", "SLACK_"))}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": str(Path(__file__).parent.parent)},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_policy_check_valid_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[default]\nadmins = ["slack:U0ADMIN01"]\n[channels."slack:C0AAAAAA1"]\n')
    ok = ducklm("policy", "check", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == f"{good}: valid, 1 channel section(s)"
    assert "slack:C0AAAAAA1: sets nothing" in ok.stdout

    bad = ducklm("policy", "check", str(DATA / "bad.toml"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert f'{DATA / "bad.toml"}:11: channels."slack:CPROD0001".approvers[1]: ' in bad.stderr
    assert lines[-1] == f"{DATA / 'bad.toml'}: 10 error(s)"
    missing = ducklm("policy", "check", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.parametrize("command", ["run", "console"])
def test_run_and_console_refuse_an_invalid_policy_file(tmp_path: Path, command: str) -> None:
    db = tmp_path / "ducklm.db"
    env = {
        "DUCKLM_POLICY_FILE": str(DATA / "bad.yaml"),
        "DUCKLM_DB": str(db),
        # a platform, so `run` would otherwise start serving
        "SLACK_BOT_TOKEN": "xoxb-not-used",
        "SLACK_APP_TOKEN": "xapp-not-used",
    }
    refused = ducklm(command, env=env, cwd=tmp_path)
    assert refused.returncode == 2
    assert "Policy file error (DUCKLM_POLICY_FILE), not starting:" in refused.stderr
    assert f'{DATA / "bad.yaml"}:10: channels."slack:CPROD0001".approvers[1]: ' in refused.stderr
    assert not db.exists()  # nothing stored: it never started
    env["DUCKLM_POLICY_FILE"] = str(tmp_path / "gone.toml")
    gone = ducklm(command, env=env, cwd=tmp_path)
    assert gone.returncode == 2 and f"{tmp_path / 'gone.toml'}: no such file" in gone.stderr


def test_the_console_uses_the_default_sections_workspace_and_tools(tmp_path: Path) -> None:
    """`ducklm console` is the operator: it may decide, and it runs in the
    default section's workspace with the default section's tools."""
    (tmp_path / "ops").mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[default]\nworkspace = "ops"\ntools = ["read_file", "list_dir"]\n\n'
        '[channels."slack:C0AAAAAA1"]\ntools = ["shell_exec_safe"]\n'
    )
    script = "/duck policy\nrun touch made-here.txt\nexit\n"
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "console"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("DUCKLM_", "SLACK_"))},
            "PYTHONPATH": str(Path(__file__).parent.parent),
            "DUCKLM_DB": str(tmp_path / "ducklm.db"),
            "DUCKLM_POLICY_FILE": str(policy),
            "USER": "tester",
        },
    )
    assert done.returncode == 0, done.stderr
    assert "the policy file's default section" in done.stdout
    assert f"workspace: {tmp_path / 'ops'}" in done.stdout
    assert "tools: list_dir, read_file" in done.stdout
    assert "shell_exec_safe may not be used here" in done.stdout
    assert not (tmp_path / "ops" / "made-here.txt").exists()
    assert not (tmp_path / "made-here.txt").exists()
