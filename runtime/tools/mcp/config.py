"""The `DUCKLM_MCP_CONFIG` file: which MCP servers DuckLM starts, and what it trusts them with.

The shape is the `mcpServers` map that Claude Desktop, Claude Code and Cursor
use, so an existing file can be reused, plus DuckLM's own keys per server:

    {"mcpServers": {
        "notes": {"command": "notes-mcp", "args": ["--db", "/srv/notes"],
                  "env": {"NOTES_TOKEN": "${NOTES_TOKEN}"},
                  "read_only": ["search", "get_note"]},
        "tickets": {"url": "https://mcp.example.org/mcp",
                    "headers": {"Authorization": "Bearer ${TICKETS_TOKEN}"},
                    "enabled": false}
    }}

Unknown keys in a server entry are errors, not ignored: a key copied from
another client's file (Cline's `autoApprove`, say) must not look as if it
granted something DuckLM does not grant. Other top-level keys are ignored, so a
whole Claude Desktop file can be pointed at.

`${NAME}` in `env` and `headers` values is read from DuckLM's environment at
start (the file need not hold the secret); every such value is a credential
and is redacted from all tool output like the bot's own tokens.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Server names become part of model-facing tool names (`mcp__<server>__<tool>`),
# which OpenAI-style function names limit to [A-Za-z0-9_-]{1,64}.
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,23}$")
# Names of env variables and headers whose values are credentials.
_CREDENTIAL = re.compile(
    r"token|passw|passphrase|secret|key|auth|credential|cookie|session", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class McpConfigError(ValueError):
    """The config file cannot be used; the message names the file and the problem."""


class ServerConfig(BaseModel):
    """One MCP server: a command to run (stdio) or a URL (streamable HTTP)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = ""
    type: Literal["stdio", "http", "streamable-http", "streamable_http"] | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True
    disabled: bool = False
    # Tools (as the server names them) that may run without approval. Nothing
    # the server says about itself can add to this list.
    read_only: list[str] = Field(default_factory=list)
    # Seconds: a call that takes longer fails (the server keeps running).
    timeout: float = Field(default=60.0, gt=0, le=3600)
    # Seconds to connect and list tools at start.
    startup_timeout: float = Field(default=30.0, gt=0, le=600)

    @field_validator("command", "url", "cwd")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> ServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either 'command' (a stdio server) or 'url' (streamable HTTP)")
        if self.type == "stdio" and self.command is None:
            raise ValueError("type 'stdio' needs 'command'")
        if self.type not in (None, "stdio") and self.url is None:
            raise ValueError(f"type {self.type!r} needs 'url'")
        if self.url is not None and (self.env or self.args or self.cwd):
            raise ValueError("'env', 'args' and 'cwd' apply to a 'command', not to a 'url'")
        if self.command is not None and self.headers:
            raise ValueError("'headers' apply to a 'url', not to a 'command'")
        return self

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    @property
    def active(self) -> bool:
        return self.enabled and not self.disabled

    @property
    def where(self) -> str:
        """The command or URL as reports show it: a URL without user:password@
        or query (either may hold a credential)."""
        if self.command is not None:
            return self.command
        assert self.url is not None
        return re.sub(r"^(https?://)[^/@\s]*@", r"\1", self.url).split("?", 1)[0]

    def secret_values(self) -> list[str]:
        """Values that are credentials: `env` and `headers` entries whose name says
        so (a `LOG_LEVEL=debug` must not be redacted everywhere), and the token
        after an `Authorization` scheme (`Bearer …`)."""
        found = [v for k, v in (*self.env.items(), *self.headers.items()) if _CREDENTIAL.search(k)]
        for key, value in self.headers.items():
            scheme, _, token = value.partition(" ")
            if _CREDENTIAL.search(key) and token.strip() and scheme.isalpha():
                found.append(token.strip())
        return [value for value in found if value]


class McpConfig(BaseModel):
    path: Path
    servers: list[ServerConfig]

    @property
    def active(self) -> list[ServerConfig]:
        return [server for server in self.servers if server.active]


def _expand(value: str, where: str, environ: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise McpConfigError(f"{where} uses ${{{name}}}, which is not set in the environment")
        return environ[name]

    return _VARIABLE.sub(one, value)


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_config(data: Any, path: Path, environ: dict[str, str] | None = None) -> McpConfig:
    """Check a loaded config document; raises McpConfigError naming the problem."""
    environ = dict(os.environ) if environ is None else environ
    if not isinstance(data, dict):
        raise McpConfigError(f"{path}: the file must hold a JSON object with 'mcpServers'")
    servers = data.get("mcpServers")
    if servers is None:
        raise McpConfigError(f"{path}: no 'mcpServers' object (the map of server name to entry)")
    if not isinstance(servers, dict):
        raise McpConfigError(f"{path}: 'mcpServers' must be an object mapping names to entries")
    parsed: list[ServerConfig] = []
    for name, entry in servers.items():
        if not SERVER_NAME.match(name):
            raise McpConfigError(
                f"{path}: server name {name!r} must be 1-24 letters, digits, '_' or '-' "
                "(it becomes part of the tool names the model sees)"
            )
        if not isinstance(entry, dict):
            raise McpConfigError(f"{path}: mcpServers.{name} must be an object")
        try:
            server = ServerConfig.model_validate({**entry, "name": name})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = _where(first["loc"])
            message = first["msg"]
            if first["type"] == "extra_forbidden":
                message = "unknown key (DuckLM does not read it; remove it)"
            raise McpConfigError(f"{path}: mcpServers.{name}.{field}: {message}") from None
        if server.cwd is not None and not Path(server.cwd).is_absolute():
            # Relative to the file, not to wherever DuckLM happens to be started.
            server.cwd = str(path.parent / server.cwd)
        # Expanded after validation so the messages above never show a secret.
        where = f"{path}: mcpServers.{name}"
        server.env = {k: _expand(v, f"{where}.env.{k}", environ) for k, v in server.env.items()}
        server.headers = {
            k: _expand(v, f"{where}.headers.{k}", environ) for k, v in server.headers.items()
        }
        parsed.append(server)
    return McpConfig(path=path, servers=parsed)


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> McpConfig:
    """Read and check the file named by DUCKLM_MCP_CONFIG."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise McpConfigError(f"{path}: no such file (DUCKLM_MCP_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise McpConfigError(f"{path}: cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise McpConfigError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    return parse_config(data, path, environ)
