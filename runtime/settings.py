"""Every knob DuckLM has, read from the environment (or a `.env` file) in one place.

Names follow DESIGN.md's configuration table. Components take plain values in
their constructors; only the CLI builds a `Settings` and hands values down, so
tests can construct any component without touching the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_BASE_URL = "https://api.openai.com/v1"
DEFAULT_THINKER_MODEL = "gpt-4o-mini"
DEFAULT_ACTION_MODEL = "gpt-4o-mini"


def _split_ids(value: object) -> object:
    """Accept `a,b c` (commas and/or spaces) for id lists in the environment."""
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PERIODS |= {"h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
# Slack ids are upper-case letters and digits (U/W users, T workspaces, E grids);
# Matrix user ids are @localpart:server, and `*` stands for any local part.
_REQUESTER = re.compile(r"\*|slack:[UWTE][A-Z0-9]+|matrix:(@[^\s:]+|\*):[^\s:]+(:\d+)?")
# (Room ids of room version 12 and later carry no server part.)
_CHANNEL = re.compile(r"slack:[CGD][A-Z0-9]+|matrix:![^\s]+")
_RATE = re.compile(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]*)")


def parse_rate(text: str) -> tuple[int, float] | None:
    """`10/10m` -> (10, 600.0): at most 10 at once, refilled over 10 minutes.
    Periods: s, m (min), h, d (also spelt out, plural too) with an optional
    count (`30s`, `2h`); a bare number is seconds. `off`, `none`, `0` or
    nothing: no limit."""
    value = text.strip().lower()
    if value in ("", "off", "none", "0", "unlimited"):
        return None
    match = _RATE.fullmatch(value)
    unit = match.group(3) if match else ""
    unit = unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit  # mins, hours; not ms
    if not match or (unit and unit not in _PERIODS) or (not unit and not match.group(2)):
        raise ValueError(
            f"not a rate: {text!r} (use N/period such as 10/10m, 30/h or 5/30s; or off)"
        )
    tokens = int(match.group(1))
    seconds = float(match.group(2) or 1) * _PERIODS[unit or "s"]
    if tokens < 1 or seconds <= 0:
        raise ValueError(f"not a rate: {text!r} (the count and the period must be above 0)")
    return tokens, seconds


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_PERIODS_LONG = _PERIODS | {"w": 604800.0, "week": 604800.0}


def parse_duration(text: str) -> float:
    """`7d` -> 604800.0 seconds. Units s, m, h, d, w (also spelt out, plural too);
    a bare number is seconds. Raises ValueError with the accepted forms."""
    value = text.strip().lower()
    match = _DURATION.fullmatch(value)
    unit = match.group(2) if match else ""
    unit = unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit
    if not match or (unit and unit not in _PERIODS_LONG):
        raise ValueError(f"not a duration: {text!r} (use 30m, 12h, 7d or 2w)")
    seconds = float(match.group(1)) * _PERIODS_LONG[unit or "s"]
    if seconds <= 0:
        raise ValueError(f"not a duration: {text!r} (it must be above 0)")
    return seconds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # Storage and workspace
    # A SQLite file (the embedded default) or a PostgreSQL URL
    # (`postgresql://user:pass@host:5432/ducklm`), which lets several replicas
    # share the work (docs/deploy.md).
    db: str = Field(default="ducklm.db", validation_alias="DUCKLM_DB")
    # Connections each replica keeps to PostgreSQL (ignored for SQLite).
    db_pool_size: int = Field(default=10, ge=1, le=200, validation_alias="DUCKLM_DB_POOL_SIZE")
    # Where local files go that are not the database (Matrix crypto store,
    # console history): unset, the SQLite file's directory, or the working
    # directory with PostgreSQL.
    data_dir: Path | None = Field(default=None, validation_alias="DUCKLM_DATA_DIR")
    workspace: Path = Field(default_factory=Path.cwd, validation_alias="DUCKLM_WORKSPACE")

    # Model
    model_base_url: str = Field(
        default=DEFAULT_MODEL_BASE_URL, validation_alias="DUCKLM_MODEL_BASE_URL"
    )
    model_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("DUCKLM_MODEL_API_KEY", "OPENAI_API_KEY")
    )
    thinker_model: str = Field(
        default=DEFAULT_THINKER_MODEL, validation_alias="DUCKLM_THINKER_MODEL"
    )
    action_model: str = Field(default=DEFAULT_ACTION_MODEL, validation_alias="DUCKLM_ACTION_MODEL")
    model_timeout: float = Field(default=120.0, gt=0, validation_alias="DUCKLM_MODEL_TIMEOUT")
    model_max_retries: int = Field(default=3, ge=0, validation_alias="DUCKLM_MODEL_MAX_RETRIES")
    max_tool_iterations: int = Field(
        default=4, ge=1, le=50, validation_alias="DUCKLM_MAX_TOOL_ITERATIONS"
    )
    # How the action model proposes tool calls (runtime/planner.py): `directive`
    # (JSON text), `tools` (native tool calling) or `auto` (tools where honoured).
    action_protocol: Literal["directive", "tools", "auto"] = Field(
        default="auto", validation_alias="DUCKLM_ACTION_PROTOCOL"
    )
    # Bounded, deterministic requests: without max_tokens some servers generate
    # up to the context size; a directive is short, an answer longer.
    action_max_tokens: int = Field(
        default=1024, ge=16, le=131072, validation_alias="DUCKLM_ACTION_MAX_TOKENS"
    )
    thinker_max_tokens: int = Field(
        default=2048, ge=16, le=131072, validation_alias="DUCKLM_THINKER_MAX_TOKENS"
    )
    action_temperature: float = Field(
        default=0.0, ge=0, le=2, validation_alias="DUCKLM_ACTION_TEMPERATURE"
    )
    thinker_temperature: float = Field(
        default=0.2, ge=0, le=2, validation_alias="DUCKLM_THINKER_TEMPERATURE"
    )

    # Shell tool
    shell_timeout: float = Field(default=60.0, gt=0, validation_alias="DUCKLM_SHELL_TIMEOUT")
    shell_max_output: int = Field(
        default=64 * 1024, ge=1024, validation_alias="DUCKLM_SHELL_MAX_OUTPUT"
    )

    # Sandbox (runtime/tools/shell/sandbox.py): `unasked` sandboxes every command
    # nobody approved; `all` approved ones too (workspace writable); `off` none.
    sandbox: str = Field(default="unasked", validation_alias="DUCKLM_SANDBOX")
    bwrap: str = Field(default="bwrap", validation_alias="DUCKLM_BWRAP")
    sandbox_cpu_seconds: int = Field(default=30, ge=1, validation_alias="DUCKLM_SANDBOX_CPU")
    sandbox_memory: int = Field(
        default=1 << 30, ge=16 << 20, validation_alias="DUCKLM_SANDBOX_MEMORY"
    )
    sandbox_file_size: int = Field(
        default=1 << 30, ge=1 << 20, validation_alias="DUCKLM_SANDBOX_FILE_SIZE"
    )
    sandbox_processes: int = Field(default=256, ge=8, validation_alias="DUCKLM_SANDBOX_PROCESSES")
    sandbox_open_files: int = Field(
        default=1024, ge=64, validation_alias="DUCKLM_SANDBOX_OPEN_FILES"
    )
    sandbox_tmp_size: int = Field(
        default=64 << 20, ge=1 << 20, validation_alias="DUCKLM_SANDBOX_TMP_SIZE"
    )

    # Who may do what in chat
    approvers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_APPROVERS"
    )
    admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_ADMINS"
    )
    four_eyes_risk: str = Field(default="high", validation_alias="DUCKLM_FOUR_EYES_RISK")
    # Issue #20: per-channel rights in a TOML or YAML file (bot/policy_file.py,
    # docs/policy.md); the variables here are its default section.
    policy_file: Path | None = Field(default=None, validation_alias="DUCKLM_POLICY_FILE")
    # An approval still open after this long mentions DUCKLM_ESCALATE_TO in its
    # thread (unset: no escalation).
    escalate_after: float | None = Field(default=None, validation_alias="DUCKLM_ESCALATE_AFTER")
    escalate_to: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_ESCALATE_TO"
    )
    approval_ttl: float = Field(default=86400.0, gt=0, validation_alias="DUCKLM_APPROVAL_TTL")
    # Issue #21: the longest any "always" rule lives (`90d`; unset/off: no
    # ceiling), how long unused makes a rule "idle" in `rules review`, and the
    # channel the daily housekeeping posts that review to (unset: not posted).
    rule_max_age: float | None = Field(default=None, validation_alias="DUCKLM_RULE_MAX_AGE")
    rule_idle_days: float = Field(default=30.0, gt=0, validation_alias="DUCKLM_RULE_IDLE_DAYS")
    rule_review_channel: str | None = Field(
        default=None, validation_alias="DUCKLM_RULE_REVIEW_CHANNEL"
    )

    approval_remind: float = Field(default=900.0, gt=0, validation_alias="DUCKLM_APPROVAL_REMIND")
    # Runs of schedules missed while the bot was down are caught up one at a
    # time, at most this many a minute (bot/scheduler.py), never as a burst.
    catch_up_rate: float = Field(default=10.0, gt=0, validation_alias="DUCKLM_CATCH_UP_RATE")
    # Who may add and manage scheduled prompts in chat, besides DUCKLM_ADMINS.
    schedulers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_SCHEDULERS"
    )
    timezone: str = Field(default="UTC", validation_alias="DUCKLM_TZ")
    retention_days: float | None = Field(
        default=None, gt=0, validation_alias="DUCKLM_RETENTION_DAYS"
    )

    max_concurrent_tasks: int = Field(
        default=8, ge=1, le=256, validation_alias="DUCKLM_MAX_CONCURRENT_TASKS"
    )
    # Seconds between two recovery rounds of a running bot (bot/recovery.py):
    # cards whose post or update failed, messages whose job ended unfinished.
    recovery_interval: float = Field(
        default=60.0, gt=0, validation_alias="DUCKLM_RECOVERY_INTERVAL"
    )
    # Replicas (issue #19, docs/deploy.md): the name this process shows as its
    # owner of tasks and leases (unset: host name); how often it heartbeats; how
    # long without a heartbeat makes a replica dead (its running tasks are then
    # reported interrupted by a survivor, its Matrix sync lease taken over).
    replica_name: str | None = Field(default=None, validation_alias="DUCKLM_REPLICA_NAME")
    heartbeat_interval: float = Field(
        default=5.0, gt=0, validation_alias="DUCKLM_HEARTBEAT_INTERVAL"
    )
    replica_timeout: float = Field(default=20.0, gt=0, validation_alias="DUCKLM_REPLICA_TIMEOUT")
    # /healthz, /readyz and /metrics (bot/health.py): served on DUCKLM_HTTP_PORT
    # beside Slack's HTTP mode; a port of their own for the console, Socket Mode
    # or Matrix-only deployments (unset: not served there).
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, validation_alias="DUCKLM_METRICS_PORT"
    )
    # Seconds `ducklm run` keeps serving after SIGTERM with /readyz answering 503,
    # before the platforms stop, so a load balancer takes the replica out of
    # rotation first (bot/server.py, docs/deploy.md). 0: stop at once.
    shutdown_drain: float = Field(
        default=0.0, ge=0, le=300, validation_alias="DUCKLM_SHUTDOWN_DRAIN"
    )

    # Who may ask (bot/policy.py): platform-qualified users, Matrix servers
    # (`matrix:*:example.org`), Slack workspaces (`slack:T…`) or `*`; unset means
    # the bot's own homeserver and the installing Slack workspace.
    requesters: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_REQUESTERS"
    )
    # Where the bot answers at all (`slack:C123`, `matrix:!room:hs`); unset means everywhere.
    channels: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_CHANNELS"
    )
    # Flood limits (bot/admission.py), per process: running + queued tasks per
    # user and per channel (0 = no cap), new tasks per user and per channel as a
    # token bucket "N/period" ("10/10m": bursts of 10, then one a minute; "off"),
    # and how many replies the bot gives other bots in one thread.
    user_max_tasks: int = Field(default=5, ge=0, validation_alias="DUCKLM_USER_MAX_TASKS")
    channel_max_tasks: int = Field(default=6, ge=0, validation_alias="DUCKLM_CHANNEL_MAX_TASKS")
    user_rate: Annotated[tuple[int, float] | None, NoDecode] = Field(
        default=(10, 600.0), validation_alias="DUCKLM_USER_RATE"
    )
    channel_rate: Annotated[tuple[int, float] | None, NoDecode] = Field(
        default=(30, 600.0), validation_alias="DUCKLM_CHANNEL_RATE"
    )
    bot_replies_per_thread: int = Field(
        default=5, ge=0, validation_alias="DUCKLM_BOT_REPLIES_PER_THREAD"
    )

    # MCP servers whose tools the agent may use (runtime/tools/mcp/config.py).
    mcp_config: Path | None = Field(default=None, validation_alias="DUCKLM_MCP_CONFIG")

    # Slack
    slack_bot_token: str | None = Field(default=None, validation_alias="SLACK_BOT_TOKEN")
    slack_app_token: str | None = Field(default=None, validation_alias="SLACK_APP_TOKEN")
    slack_signing_secret: str | None = Field(default=None, validation_alias="SLACK_SIGNING_SECRET")
    slack_mode: str | None = Field(default=None, validation_alias="DUCKLM_SLACK_MODE")
    http_port: int = Field(default=3000, ge=0, le=65535, validation_alias="DUCKLM_HTTP_PORT")
    http_host: str = Field(default="0.0.0.0", validation_alias="DUCKLM_HTTP_HOST")
    slack_api_url: str | None = Field(default=None, validation_alias="DUCKLM_SLACK_API_URL")

    # Matrix
    matrix_homeserver: str | None = Field(default=None, validation_alias="MATRIX_HOMESERVER")
    matrix_user_id: str | None = Field(default=None, validation_alias="MATRIX_USER_ID")
    matrix_password: str | None = Field(default=None, validation_alias="MATRIX_PASSWORD")
    matrix_access_token: str | None = Field(default=None, validation_alias="MATRIX_ACCESS_TOKEN")

    # Whose invites the Matrix bot accepts: `@user:server`, `matrix:@user:server`,
    # `server` or `:server`; empty means anybody's.
    matrix_allowed_inviters: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_MATRIX_ALLOWED_INVITERS"
    )
    # What the Matrix bot catches up on after a gap (down, a burst, an invite it
    # joined late): at most this many events per room, none older than this.
    matrix_backlog_max: int = Field(default=200, ge=0, validation_alias="DUCKLM_MATRIX_BACKLOG_MAX")
    matrix_backlog_max_age: float = Field(
        default=86400.0, ge=0, validation_alias="DUCKLM_MATRIX_BACKLOG_MAX_AGE"
    )
    # Other bots on Matrix (`@bot:server`, or `server` for a bridge's users): their
    # m.text messages are marked as from a bot (bounded per thread).
    matrix_bot_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="DUCKLM_MATRIX_BOT_USERS"
    )
    # End-to-end encryption (bot/matrix/crypto.py): on when vodozemac loads, unless
    # switched off; the crypto store's keys are encrypted with this passphrase if set.
    matrix_encryption: bool = Field(default=True, validation_alias="DUCKLM_MATRIX_ENCRYPTION")
    matrix_store_passphrase: str | None = Field(
        default=None, validation_alias="MATRIX_STORE_PASSPHRASE"
    )
    # Which devices get the bot's room keys: `tofu` (every device the homeserver
    # lists, changes logged) or `cross-signed` (only devices signed by their owner).
    matrix_trust: str = Field(default="tofu", validation_alias="DUCKLM_MATRIX_TRUST")

    @field_validator("matrix_trust")
    @classmethod
    def _matrix_trust(cls, value: str) -> str:
        value = (value or "").strip().lower() or "tofu"
        if value not in {"tofu", "cross-signed"}:
            raise ValueError("must be 'tofu' or 'cross-signed'")
        return value

    @field_validator("slack_mode")
    @classmethod
    def _slack_mode(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if value not in {"socket", "http"}:
            raise ValueError("must be 'socket' or 'http'")
        return value

    @property
    def slack_configured(self) -> bool:
        return bool(self.slack_bot_token)

    @property
    def effective_slack_mode(self) -> str:
        """`socket` when an app token is set, unless DUCKLM_SLACK_MODE says otherwise."""
        if self.slack_mode:
            return self.slack_mode
        return "socket" if self.slack_app_token else "http"

    @property
    def matrix_configured(self) -> bool:
        return bool(self.matrix_homeserver and self.matrix_user_id)

    @property
    def db_is_postgres(self) -> bool:
        # Imported here: loading the store package costs ~100 ms that `ducklm --help`
        # and the other store-less commands should not pay.
        from runtime.store.db import is_postgres_url

        return is_postgres_url(str(self.db))

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file DUCKLM_DB names, or None when it is a PostgreSQL URL."""
        return None if self.db_is_postgres else Path(str(self.db)).expanduser()

    @property
    def local_dir(self) -> Path:
        """The directory for local files beside the database (DUCKLM_DATA_DIR)."""
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        path = self.sqlite_path
        return path.parent if path is not None else Path.cwd()

    @property
    def local_stem(self) -> str:
        """The name local files are derived from: the SQLite file's stem, else `ducklm`."""
        path = self.sqlite_path
        return path.stem if path is not None else "ducklm"

    @property
    def matrix_state_dir(self) -> Path:
        """The Matrix crypto store (and, on SQLite, session and sync token) live
        next to the database."""
        return self.local_dir / f"{self.local_stem}-matrix"

    @field_validator("db", mode="before")
    @classmethod
    def _db(cls, value: object) -> object:
        """A Path (the tests', a caller's) is the SQLite file it names."""
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a SQLite file or a postgresql:// URL")
        return value

    @field_validator("sandbox")
    @classmethod
    def _sandbox(cls, value: str) -> str:
        value = (value or "").strip().lower() or "unasked"
        if value not in {"unasked", "all", "off"}:
            raise ValueError("must be 'unasked', 'all' or 'off'")
        return value

    @field_validator("sandbox_memory", "sandbox_file_size", "sandbox_tmp_size", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        """Accept `512M`, `1G`, `64k` (powers of 1024) as well as plain bytes."""
        if isinstance(value, str):
            text = value.strip().upper().removesuffix("B").removesuffix("I")
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
            if text and text[-1] in units:
                try:
                    return int(float(text[:-1]) * units[text[-1]])
                except ValueError:
                    raise ValueError(f"not a size: {value!r} (use bytes or 512M, 1G)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        value = value.strip() or "UTC"
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from exc
        return value

    @field_validator("mcp_config", "policy_file", mode="before")
    @classmethod
    def _no_mcp(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rule_max_age", "escalate_after", mode="before")
    @classmethod
    def _rule_max_age(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().lower() in ("", "off", "none", "0", "forever"):
                return None
            return parse_duration(value)
        return value

    @field_validator("rule_review_channel", mode="before")
    @classmethod
    def _no_review_channel(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("retention_days", mode="before")
    @classmethod
    def _forever(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "forever", "none", "0"):
            return None
        return value

    @field_validator(
        "approvers",
        "admins",
        "schedulers",
        "escalate_to",
        "matrix_allowed_inviters",
        "matrix_bot_users",
        mode="before",
    )
    @classmethod
    def _ids(cls, value: object) -> object:
        return _split_ids(value)

    @field_validator("requesters", mode="before")
    @classmethod
    def _requesters(cls, value: object) -> object:
        value = _split_ids(value)
        for entry in value if isinstance(value, list) else ():
            if not _REQUESTER.fullmatch(str(entry)):
                raise ValueError(
                    f"not a requester: {entry!r} (use *, slack:U… or slack:T… for a "
                    "workspace, matrix:@user:server or matrix:*:server)"
                )
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: object) -> object:
        value = _split_ids(value)
        for entry in value if isinstance(value, list) else ():
            if not _CHANNEL.fullmatch(str(entry)):
                raise ValueError(
                    f"not a channel: {entry!r} (use slack:C… (a channel id) or "
                    "matrix:!room:server (a room id, not an alias))"
                )
        return value

    @field_validator("user_rate", "channel_rate", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        return parse_rate(value) if isinstance(value, str) else value

    @field_validator("action_protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> object:
        # `TOOLS` or ` auto ` in a .env file mean what they say.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("four_eyes_risk")
    @classmethod
    def _risk(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"low", "medium", "high", "critical", "off"}:
            raise ValueError("must be one of low, medium, high, critical, off")
        return value

    @model_validator(mode="after")
    def _heartbeat_within_timeout(self) -> Settings:
        # A heartbeat that comes as seldom as the timeout makes every live replica
        # look dead between two beats: survivors would interrupt its tasks.
        if self.heartbeat_interval * 2 > self.replica_timeout:
            raise ValueError(
                f"DUCKLM_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s) must be at most "
                f"half of DUCKLM_REPLICA_TIMEOUT ({self.replica_timeout:g} s), so a live "
                "replica is never taken for dead between two heartbeats"
            )
        return self

    @property
    def model_configured(self) -> bool:
        """A model is usable when a key is set or the endpoint is not OpenAI's own
        (local servers such as Ollama or llama.cpp need no key)."""
        return bool(self.model_api_key) or self.model_base_url.rstrip("/") != (
            DEFAULT_MODEL_BASE_URL
        )
