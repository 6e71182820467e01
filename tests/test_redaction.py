"""Redaction: secrets never reach chat, the model or the audit log.

Unit tests use realistic secrets generated here (real keys from `openssl`,
random tokens in each provider's format); the end-to-end tests run real
commands through the real loop, store (SQLite, read back as raw bytes) and
the fake OpenAI-compatible server, and look for the secret everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import shutil
import string
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from runtime.factory import Runtime, build_runtime
from runtime.tools.gateway import ToolGateway
from runtime.tools.redaction import Redactor, secret_fields
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, Text

NO_ACTIONS = directive()


def rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
LOWER_HEX = "0123456789abcdef"
B64 = ALNUM + "+/"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt() -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(
        json.dumps({"sub": "system:serviceaccount:ops:deployer", "iat": 1764633600}).encode()
    )
    signature = b64url(
        hmac.new(secrets.token_bytes(32), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    )
    return f"{header}.{payload}.{signature}"


def openssl(*args: str) -> str:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return subprocess.run(
        ["openssl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


# (kind, secret, line holding it): the secret must go, the rest of the line stay.
def format_cases() -> list[tuple[str, str, str]]:
    aws_id = "AKIA" + rand(UPPER_DIGITS, 16)
    aws_secret = rand(B64, 40)
    slack_bot = f"xoxb-{rand(string.digits, 12)}-{rand(string.digits, 13)}-{rand(ALNUM, 24)}"
    slack_app = f"xapp-1-A{rand(UPPER_DIGITS, 10)}-{rand(string.digits, 13)}-{rand(LOWER_HEX, 64)}"
    webhook = (
        f"https://hooks.slack.com/services/T{rand(UPPER_DIGITS, 8)}/B{rand(UPPER_DIGITS, 8)}/"
        f"{rand(ALNUM, 24)}"
    )
    ghp = "ghp_" + rand(ALNUM, 36)
    github_pat = f"github_pat_{rand(ALNUM, 22)}_{rand(ALNUM, 59)}"
    glpat = "glpat-" + rand(ALNUM + "_-", 20)
    discord = f"M{rand(ALNUM, 23)}.{rand(ALNUM, 6)}.{rand(ALNUM, 27)}"
    stripe = "sk_live_" + rand(ALNUM, 24)
    twilio = "SK" + rand(LOWER_HEX, 32)
    npm = "npm_" + rand(ALNUM, 36)
    pypi = "pypi-AgEIcHlwaS5vcmc" + rand(ALNUM + "-_", 80)
    azure_key = rand(B64, 86) + "=="
    sas_sig = quote(base64.b64encode(secrets.token_bytes(32)).decode(), safe="")
    jwt = make_jwt()
    password = rand(ALNUM, 14)
    matrix = f"syt_{b64url(b'duckbot')}_{rand(ALNUM, 20)}_{rand(ALNUM, 6)}"
    bearer = rand(ALNUM, 40)
    return [
        ("aws-access-key", aws_id, f"aws_access_key_id = {aws_id}"),
        ("aws-secret-key", aws_secret, f"aws_secret_access_key = {aws_secret}"),
        ("aws-secret-key", aws_secret, f'client = boto3.client(aws_key="{aws_secret}")'),
        ("aws-secret-key", aws_secret, f"AWS_SECRET_ACCESS_KEY={aws_secret}"),
        (
            "azure-storage-key",
            azure_key,
            f"DefaultEndpointsProtocol=https;AccountName=logs;AccountKey={azure_key};"
            "EndpointSuffix=core.windows.net",
        ),
        (
            "azure-sas-signature",
            sas_sig,
            f"https://logs.blob.core.windows.net/c/x.log?sv=2022-11-02&sp=r&sig={sas_sig}",
        ),
        ("slack-token", slack_bot, f"SLACK_BOT_TOKEN={slack_bot}"),
        ("slack-token", slack_app, f"app token {slack_app} loaded"),
        ("slack-webhook", webhook, f"posting to {webhook} failed"),
        ("github-token", ghp, f"remote: https://x-access-token:{ghp}@github.com/o/r.git"),
        ("github-token", github_pat, f"GITHUB_TOKEN={github_pat}"),
        ("gitlab-token", glpat, f"PRIVATE-TOKEN: {glpat}"),
        ("discord-token", discord, f"bot token {discord} rejected"),
        ("stripe-key", stripe, f"stripe.api_key = {stripe!r}"),
        ("twilio-key", twilio, f"twilio key {twilio} ok"),
        ("npm-token", npm, f"//registry.npmjs.org/:_authToken={npm}"),
        ("pypi-token", pypi, f"password = {pypi}"),
        ("jwt", jwt, f"token:      {jwt}"),
        ("secret-value", password, f"password={password}"),
        ("secret-value", password, f"passwd: {password}"),
        ("secret-value", password, f'secret = "{password}"'),
        ("secret-value", password, f'{{"db_password": "{password}", "user": "app"}}'),
        ("basic-auth", password, f"fetching https://deploy:{password}@git.example.com/ops.git"),
        ("authorization", bearer, f"> Authorization: Bearer {bearer}"),
        ("matrix-token", matrix, f"access_token {matrix} refreshed"),
    ]


@pytest.mark.parametrize(("kind", "secret", "line"), format_cases())
def test_well_known_formats_are_redacted(kind: str, secret: str, line: str) -> None:
    text = f"before\n{line}\nafter"
    found = Redactor().redact(text)
    assert secret not in found.text
    assert f"[REDACTED:{kind}]" in found.text, found.text
    assert found.count >= 1 and kind in found.kinds
    assert found.text.startswith("before\n") and found.text.endswith("\nafter")


@pytest.mark.parametrize(
    ("args", "header"),
    [
        (("genpkey", "-algorithm", "ed25519"), "BEGIN PRIVATE KEY"),
        (("ecparam", "-name", "prime256v1", "-genkey", "-noout"), "BEGIN EC PRIVATE KEY"),
        (("genrsa", "-traditional", "1024"), "BEGIN RSA PRIVATE KEY"),
    ],
)
def test_pem_private_keys_are_redacted_as_whole_blocks(args: tuple[str, ...], header: str) -> None:
    pem = openssl(*args)
    assert header in pem
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    text = f"$ cat id_key\n{pem}-- end of file --\n"
    found = Redactor().redact(text)
    assert found.text == "$ cat id_key\n[REDACTED:private-key]\n-- end of file --\n"
    assert found.count == 1 and found.kinds == ("private-key",)
    assert not any(line in found.text for line in body)


def test_gcp_service_account_and_truncated_keys() -> None:
    pem = openssl("genpkey", "-algorithm", "ed25519")
    account = json.dumps(
        {
            "type": "service_account",
            "project_id": "ops-prod",
            "private_key": pem,
            "client_email": "deployer@ops-prod.iam.gserviceaccount.com",
        },
        indent=2,
    )
    found = Redactor().redact(account)
    assert '"private_key": "[REDACTED:private-key]' in found.text
    assert "deployer@ops-prod.iam.gserviceaccount.com" in found.text
    body = pem.splitlines()[1]
    assert body not in found.text and body[:20] not in found.text

    # Output cut short in the middle of a key: the rest of the text goes with it.
    rsa = openssl("genrsa", "-traditional", "1024")
    cut = "log line\n" + rsa[: len(rsa) // 2]
    redacted = Redactor().redact(cut)
    assert redacted.text == "log line\n[REDACTED:private-key]"


def bot_settings(tmp_path: Path, base_url: str | None = None) -> tuple[object, dict[str, str]]:
    tokens = {
        "SLACK_BOT_TOKEN": f"xoxb-{rand(string.digits, 12)}-{rand(ALNUM, 24)}",
        "SLACK_APP_TOKEN": f"xapp-1-A{rand(UPPER_DIGITS, 10)}-{rand(LOWER_HEX, 40)}",
        # A signing secret looks like any hash: only literal matching can find it.
        "SLACK_SIGNING_SECRET": secrets.token_hex(16),
        "MATRIX_PASSWORD": "correct horse+battery/staple!",
        "MATRIX_ACCESS_TOKEN": "mat_" + rand(ALNUM, 30),
    }
    settings = make_settings(
        tmp_path,
        base_url,
        slack_bot_token=tokens["SLACK_BOT_TOKEN"],
        slack_app_token=tokens["SLACK_APP_TOKEN"],
        slack_signing_secret=tokens["SLACK_SIGNING_SECRET"],
        matrix_password=tokens["MATRIX_PASSWORD"],
        matrix_access_token=tokens["MATRIX_ACCESS_TOKEN"],
    )
    return settings, tokens


def test_the_bots_own_credentials_are_matched_literally(tmp_path: Path) -> None:
    settings, tokens = bot_settings(tmp_path, "http://127.0.0.1:9/v1")
    fields = secret_fields(settings)
    assert set(tokens.items()) <= set(fields.items())
    assert fields["DUCKLM_MODEL_API_KEY"] == "sk-test" and "MATRIX_HOMESERVER" not in fields
    redactor = Redactor.from_settings(settings)
    for env, value in tokens.items():
        found = redactor.redact(f"x {value} y")
        label = env.lower().replace("_", "-")
        assert found.text == f"x [REDACTED:{label}] y", (env, found.text)


def test_encoded_credentials_are_found(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    password = "correct horse+battery/staple!"
    redactor = Redactor({"SLACK_SIGNING_SECRET": secret, "MATRIX_PASSWORD": password})
    for prefix in ("", "u", "us", "user:"):  # every base64 alignment
        basic = base64.b64encode(f"{prefix}{secret}".encode()).decode()
        found = redactor.redact(f"Proxy-Authorization: Basic {basic}\n")
        assert "[REDACTED:" in found.text and basic not in found.text, prefix
    for shown in (
        base64.urlsafe_b64encode(secret.encode()).decode(),
        quote(password, safe=""),
        json.dumps({"password": password}),
    ):
        found = redactor.redact(f"seen: {shown}")
        assert "[REDACTED:" in found.text
        assert secret not in found.text and quote(password, safe="") not in found.text


def test_short_literals_are_not_redacted_and_literals_can_be_added_later() -> None:
    redactor = Redactor({"MATRIX_PASSWORD": "admin"})
    assert redactor.literal_count == 0
    assert redactor.redact("admin logged in as admin").count == 0
    assert redactor.add_literal("", "x") is False and redactor.add_literal(None) is False

    token = "syn_" + rand(ALNUM, 32)  # as a Matrix login might return it
    text = f"GET /_matrix/client/v3/sync?access_token={token}"
    assert token in redactor.redact(text).text  # unknown format, not yet known
    assert redactor.add_literal(token, "matrix-access-token") is True
    assert redactor.redact(text).text.endswith("access_token=[REDACTED:matrix-access-token]")


def ordinary_log(size: int = 64 * 1024) -> str:
    """What on-call output looks like: ids, hashes, addresses, times, paths."""
    lines: list[str] = []
    i = 0
    while sum(len(line) + 1 for line in lines) < size:
        i += 1
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        lines += [
            f"2026-12-01T21:{i % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z web-{i % 5}"
            f" nginx[{1000 + i}]:"
            f' 10.0.{i % 255}.{i % 7} - - "GET /api/v1/orders/{uuid.uuid4()} HTTP/1.1" 200'
            f' {i * 37} "-" "kube-probe/1.29"',
            f"Dec  1 21:{i % 60:02d}:07 db-2 sshd[{i}]: Failed password for invalid user admin"
            f" from 203.0.113.{i % 255} port {40000 + i} ssh2",
            f"commit {hashlib.sha1(str(i).encode()).hexdigest()} (HEAD -> main, origin/main)",
            f"sha256:{sha}  registry.example.com/ops/api@sha256:{sha[:12]}",
            f"fe80::{i % 9999:x}:1ff:fe23:4567 dev eth0 lladdr 52:54:00:{i % 256:02x}:4e:8a",
            f"api-7d9c{i % 10}b5f4-x{i % 7}k2p   1/1   Running   0   {i % 50}d"
            f"   10.244.1.{i % 255}",
            f"-rw-r--r-- 1 deploy deploy {i * 11} Dec  1 21:07 release-{i}.tar.gz",
            f"kernel: [{i}.{i % 1000000:06d}] EXT4-fs (nvme0n1p2): re-mounted. Quota mode: none.",
            f"{uuid.uuid4().hex}  /var/lib/docker/overlay2/{sha[:40]}/diff",
            "pwd: /srv/app   key rotation scheduled; password policy: min length 12",
            f"Authorization failed for user {i}; secrets synced: {i % 9}",
        ]
    return "\n".join(lines)[:size]


def test_ordinary_log_text_is_left_intact() -> None:
    text = ordinary_log()
    found = Redactor({"SLACK_SIGNING_SECRET": secrets.token_hex(16)}).redact(text)
    assert found.count == 0, found.kinds
    assert found.text == text


def test_redaction_is_idempotent_and_keeps_what_surrounds_secrets() -> None:
    redactor = Redactor({"SLACK_SIGNING_SECRET": secrets.token_hex(16)})
    cases = format_cases()
    log = ordinary_log(8 * 1024)
    text = log + "\n" + "\n".join(line for _, _, line in cases)
    once = redactor.redact(text)
    assert once.count >= len(cases)
    assert all(secret not in once.text for _, secret, _ in cases)
    assert once.text.startswith(log)
    twice = Redactor().redact(once.text)
    assert (twice.text, twice.count) == (once.text, 0)


async def test_gateway_redacts_every_result(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    ghp = "ghp_" + rand(ALNUM, 36)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "deploy-notes.txt").write_text(f"SIGNING={secret}\nGITHUB={ghp}\nLEVEL=info\n")
    gateway = ToolGateway.default(workspace, redactor=Redactor({"SLACK_SIGNING_SECRET": secret}))

    for action in (
        shell("cat deploy-notes.txt"),
        {"tool": "read_file", "args": {"path": "deploy-notes.txt"}},
    ):
        result = await gateway.run_action(action)
        assert result.ok, result
        assert secret not in result.output and ghp not in result.output
        assert "SIGNING=[REDACTED:slack-signing-secret]" in result.output
        assert "LEVEL=info" in result.output
        assert result.metadata["redacted"] == 2
        assert result.metadata["redacted_kinds"] == ["github-token", "slack-signing-secret"]

    # stderr is part of the output; the command in the metadata is a shown copy too.
    failed = await gateway.run_action(shell(f"ls {ghp}"))
    assert not failed.ok and ghp not in failed.model_dump_json()
    assert failed.metadata["command"] == "ls [REDACTED:github-token]"

    clean = await gateway.run_action(shell("echo nothing secret"))
    assert "redacted" not in clean.metadata and clean.output.strip() == "nothing secret"


def store_bytes(tmp_path: Path) -> bytes:
    """Every byte SQLite wrote: the database file and its WAL and shared-memory files."""
    files = sorted(tmp_path.glob("ducklm.db*"))
    assert files, "no database written"
    return b"".join(path.read_bytes() for path in files)


async def test_direct_command_keeps_the_bots_token_out_of_store_and_chat(
    tmp_path: Path, clean_env: None
) -> None:
    settings, tokens = bot_settings(tmp_path)
    signing = tokens["SLACK_SIGNING_SECRET"]
    bot_token = tokens["SLACK_BOT_TOKEN"]
    workspace = settings.workspace  # type: ignore[attr-defined]
    (workspace / "leak.txt").write_text(
        f"signing secret: {signing}\nbot={bot_token}\n"
        f"b64={base64.b64encode(signing.encode()).decode()}\n"
    )
    rt: Runtime = await build_runtime(settings)  # type: ignore[arg-type]
    try:
        result = await rt.loop.run_command("cat leak.txt", conversation="console:ops")
        events = await rt.stores.events.list_events(result.task_id)
    finally:
        await rt.close()

    assert result.status == "completed"
    assert signing not in result.final_response and bot_token not in result.final_response
    assert "[REDACTED:slack-signing-secret]" in result.final_response
    assert "[REDACTED:slack-bot-token]" in result.final_response
    assert result.final_response.endswith("(3 secret value(s) in tool output were redacted.)")
    audit = next(e.payload for e in events if e.event_type == "command_audit")
    assert audit["command"] == "cat leak.txt" and audit["ok"]
    finished = next(e.payload for e in events if e.event_type == "tool_call_finished")
    assert finished["result"]["metadata"]["redacted"] == 3
    raw = store_bytes(tmp_path)
    for value in (signing, bot_token, base64.b64encode(signing.encode()).decode()[:24]):
        assert value.encode() not in raw


async def test_chat_keeps_tokens_from_the_model_the_log_and_the_answer(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    settings, tokens = bot_settings(tmp_path, model_server.base_url)
    signing = tokens["SLACK_SIGNING_SECRET"]
    aws_id = "AKIA" + rand(UPPER_DIGITS, 16)
    workspace = settings.workspace  # type: ignore[attr-defined]
    (workspace / "config.ini").write_text(
        f"[slack]\nsigning_secret = {signing}\n[aws]\nkey_id = {aws_id}\nregion = eu-west-1\n"
    )
    model_server.reply(ACTION, Text(directive(shell("cat config.ini"))), Text(NO_ACTIONS))
    # A model that echoes a credential anyway (say, one a user pasted earlier).
    model_server.reply(
        THINKER, Text(f"Region is eu-west-1; the bot token is {tokens['SLACK_BOT_TOKEN']}.")
    )
    rt: Runtime = await build_runtime(settings)  # type: ignore[arg-type]
    try:
        result = await rt.loop.run_chat("which region is configured?")
    finally:
        await rt.close()

    assert result.status == "completed", result.final_response
    sent = json.dumps([r.body for r in model_server.requests])
    assert signing not in sent and aws_id not in sent
    thinker = model_server.requests_for(THINKER)[0].body["messages"]
    assert "[REDACTED:" in thinker[0]["content"]  # the prompt explains the placeholders
    assert "[REDACTED:slack-signing-secret]" in thinker[-1]["content"]
    assert "[REDACTED:aws-access-key]" in thinker[-1]["content"]
    assert "region = eu-west-1" in thinker[-1]["content"]
    answer = result.final_response
    assert tokens["SLACK_BOT_TOKEN"] not in answer
    assert "the bot token is [REDACTED:slack-bot-token]" in answer
    assert "(2 secret value(s) in tool output were redacted.)" in answer
    assert "(1 secret value(s) in this answer were redacted.)" in answer
    raw = store_bytes(tmp_path)
    for value in (signing, aws_id, tokens["SLACK_BOT_TOKEN"]):
        assert value.encode() not in raw


async def test_approval_card_shows_redacted_command_but_runs_the_real_one(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    ghp = "ghp_" + rand(ALNUM, 36)
    settings = make_settings(tmp_path, model_server.base_url)
    command = f"printf '%s' {ghp} > token.txt"
    model_server.reply(ACTION, Text(directive(shell(command, f"store {ghp}"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Stored."))
    rt = await build_runtime(settings)
    try:
        waiting = await rt.loop.run_chat("store the token I gave you")
        pending = waiting.pending_approval
        assert waiting.status == "waiting_for_approval" and pending is not None
        assert pending.command == "printf '%s' [REDACTED:github-token] > token.txt"
        assert pending.model_reason == "store [REDACTED:github-token]"
        assert pending.redacted == 2 and "[REDACTED:…]" in (pending.reason or "")
        stored = await rt.approvals.get(pending.approval_id)
        assert stored is not None and stored.command == command
        assert stored.action["args"]["command"] == command  # what runs is untouched

        assert (await rt.approvals.decide(pending.approval_id, "approve", "console:bob")).taken
        done = await rt.loop.continue_after_approval(waiting.task_id, pending.approval_id)
        events = await rt.stores.events.list_events(waiting.task_id)
    finally:
        await rt.close()

    assert done.status == "completed", done.final_response
    assert (settings.workspace / "token.txt").read_text() == ghp
    leaked = [e.event_type for e in events if ghp in json.dumps(e.payload)]
    assert not leaked, leaked
    started = [e.payload for e in events if e.event_type == "tool_call_started"]
    assert started[0]["args"]["command"] == "printf '%s' [REDACTED:github-token] > token.txt"
    assert ghp not in json.dumps([r.body for r in model_server.requests_for(THINKER)])


async def test_a_credential_learnt_at_run_time_is_redacted_everywhere(
    tmp_path: Path, clean_env: None
) -> None:
    settings = make_settings(tmp_path)
    token = "syn_" + rand(ALNUM, 40)  # e.g. the access token a Matrix login returned
    (settings.workspace / "sync.log").write_text(f"GET /sync?access_token={token} 200\n")
    rt = await build_runtime(settings)
    try:
        before = await rt.loop.run_command("cat sync.log")
        assert token in before.final_response  # not a known format, not yet known
        assert rt.redactor.add_literal(token, "matrix-access-token")
        after = await rt.loop.run_command("cat sync.log")
        events = await rt.stores.events.list_events(after.task_id)
    finally:
        await rt.close()
    assert token not in after.final_response
    assert "access_token=[REDACTED:matrix-access-token] 200" in after.final_response
    assert not [e.event_type for e in events if token in json.dumps(e.payload)]


@pytest.mark.parametrize(
    "line",
    [
        "password=<your password>",
        "password: ********",
        "db_password = {{ vault_db_password }}",
        "secret: {secret}",
        "-----BEGIN CERTIFICATE-----",
        "Public-Key: (2048 bit)",
        "sudo: a password is required",
        "Accepted publickey for deploy from 192.0.2.7 port 51234 ssh2: ED25519 SHA256:4Fq",
    ],
)
def test_templates_masks_and_public_material_are_not_secrets(line: str) -> None:
    assert Redactor().redact(line).text == line


async def test_duck_approvals_in_chat_lists_the_command_redacted(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    """`/duck approvals` answers in chat, so its listing is redacted like a card."""
    from bot import commands as c
    from bot.policy import Actor
    from bot.service import ChatService

    ghp = "ghp_" + rand(ALNUM, 36)
    command = f"printf '%s' {ghp} > token.txt"
    model_server.reply(ACTION, Text(directive(shell(command, "store it"))), Text(NO_ACTIONS))
    rt = await build_runtime(make_settings(tmp_path, model_server.base_url))
    service = ChatService(rt)
    try:
        waiting = await rt.loop.run_chat("store the token")
        assert waiting.pending_approval is not None
        listing = await service.runner.execute(
            c.parse_command("approvals"), Actor("slack:U1", is_admin=True, is_approver=True)
        )
        pending = await service.approvals.get(waiting.pending_approval.approval_id)
    finally:
        await service.close()
        await rt.close()
    assert "[REDACTED:github-token]" in listing and ghp not in listing
    assert pending is not None and ghp not in service.shown_command(pending)


@pytest.mark.parametrize("lead", ["+", "/", "x"])
def test_an_unquoted_aws_secret_key_is_redacted_whatever_it_starts_with(lead: str) -> None:
    """Found by a random run: detect-secrets' keyword patterns want a value that
    starts with a word character; a base64 key may start with `+` or `/`."""
    key = lead + "xmuR9UJOC88ZZVBmP7ihp9QNbm7PTN+lVHk94wb"
    assert len(key) == 40
    for line in (f"aws_secret_access_key = {key}", f"AWS_SECRET_ACCESS_KEY={key}"):
        result = Redactor().redact(line)
        assert key not in result.text and result.kinds == ("aws-secret-key",)
