"""ModelClient: OpenAI-compatible Chat Completions over httpx.

One client talks to one endpoint (OpenAI, DeepSeek, Ollama, vLLM, llama.cpp
server, OpenRouter, ...) and holds one model name per role: the *thinker*
writes answers, the *action* model proposes tool calls (a JSON directive, or
native `tool_calls`; runtime/planner.py decides which).

Requests are bounded per role (`max_tokens`, `temperature`), and what a server
accepts is negotiated once and remembered by the client (one client, one base
URL): the structured-output form of an action call (OpenAI `json_schema`, then
llama.cpp's `json_object` + `schema`, then plain JSON mode, then none) and
whether it takes `tools` at all.

Every failure surfaces as a `ModelError` subclass whose `str()` is a short
sentence a chat user can act on; the provider's own error text is kept (cut to
~300 characters, with our API key scrubbed from it).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import httpx
from pydantic import BaseModel

if TYPE_CHECKING:
    from runtime.metrics import Metrics
    from runtime.settings import Settings

__all__ = [
    "RESPONSE_FORMS",
    "ModelAuthError",
    "ModelClient",
    "ModelConnectionError",
    "ModelError",
    "ModelNotConfiguredError",
    "ModelResponse",
    "ModelResponseError",
    "ModelTimeoutError",
    "ModelToolsUnsupportedError",
    "ToolCall",
    "parse_retry_after",
]

logger = logging.getLogger("ducklm.model")

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# Error bodies only feed a one-line message; no reason to hold more.
MAX_ERROR_BYTES = 64 * 1024
PROVIDER_MESSAGE_CHARS = 300
CONNECT_TIMEOUT = 10.0
# Retry-After beyond this means "come back much later": a chat user is better
# served by a clear error now than by a bot that is silently asleep.
MAX_RETRY_AFTER = 60.0

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

_DEFAULT_MODELS = {"thinker": "gpt-4o-mini", "action": "gpt-4o-mini"}
_ROLE_ENV = {"thinker": "DUCKLM_THINKER_MODEL", "action": "DUCKLM_ACTION_MODEL"}
_NOT_A_COMPLETION = "The model API returned something that is not a chat completion"

# Structured-output forms for an action call, strongest first. Servers refuse
# the ones they do not know in different ways (400, 422, or llama-cpp-python's
# 500 naming the field), so each refusal moves one step down, for good.
RESPONSE_FORMS = ("json_schema", "json_object_schema", "json_object", "none")
# Words in an error body that say the server refused response_format itself
# rather than failing for another reason.
_FORMAT_MARKERS = ("response_format", "response format", "json_object", "json mode", "json_schema")
_TOOLS_MARKERS = ("tools", "tool_choice", "tool choice", "function calling", "functions")


class ToolCall(BaseModel):
    """One native tool call of a reply; `arguments` is the JSON text as sent."""

    id: str
    name: str
    arguments: str = ""


class ModelResponse(BaseModel):
    # The client role that made the call ("thinker" or "action"), as in the
    # model_call_started/finished events; the reply message's own role is
    # always "assistant" and tells nobody anything.
    role: str
    model: str  # as reported by the provider, else the model we asked for
    content: str
    reasoning_content: str | None = None
    # Wall time of the whole chat() call, retries and backoff sleeps included:
    # what the user waited, which is what the audit log should show.
    latency_ms: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    # "stop", "length", "content_filter", "tool_calls", ... or None when the
    # server did not say (some proxies drop it).
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = []
    # The structured-output form this reply was asked with (RESPONSE_FORMS),
    # or None when none was asked for.
    response_form: str | None = None


class ModelError(Exception):
    """A model call failed. `retryable` says whether trying later may help."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        # Set from a Retry-After header; consulted by the retry loop only.
        self.retry_after: float | None = None
        # Retryable in principle, but this call must not retry (Retry-After too long).
        self._stop_retrying = False

    def __str__(self) -> str:
        return self.message


class ModelAuthError(ModelError):
    """The API rejected our key (401) or refused access (403)."""


class ModelTimeoutError(ModelError):
    """The API did not answer in time."""


class ModelConnectionError(ModelError):
    """The API could not be reached, or dropped the connection."""


class ModelResponseError(ModelError):
    """The API answered 200 but not with a usable chat completion."""


class ModelNotConfiguredError(ModelError):
    """No usable endpoint, key or model name is configured."""


class ModelToolsUnsupportedError(ModelError):
    """The server refused a request because of `tools` (no native tool calling)."""


class _ResponseFormatRejected(Exception):
    """Internal: the server refuses `response_format`; retry without it."""


class ModelClient:
    """An OpenAI-compatible Chat Completions client with one model per role.

    Retries (with exponential backoff and jitter, honouring Retry-After) cover
    429, 5xx, timeouts and connection failures; `max_retries` counts retries,
    so a call makes at most `max_retries + 1` requests.
    """

    ROLES = ("thinker", "action")

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        models: Mapping[str, str] | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        stream: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        max_tokens: Mapping[str, int] | None = None,
        temperature: Mapping[str, float] | None = None,
        action_protocol: str = "auto",
        metrics: Metrics | None = None,
    ) -> None:
        models = dict(_DEFAULT_MODELS if models is None else models)
        unknown = set(models) - set(self.ROLES)
        if unknown:
            raise ValueError(f"unknown model roles {sorted(unknown)}; roles are {self.ROLES}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = (base_url or "").strip().rstrip("/")
        self.api_key = api_key or None
        self.models: dict[str, str] = {role: name for role, name in models.items() if name}
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stream = stream
        # Per role; a role missing here sends no bound (the server's default).
        self.max_tokens: dict[str, int] = dict(max_tokens or {})
        self.temperature: dict[str, float] = dict(temperature or {})
        if action_protocol not in ("directive", "tools", "auto"):
            raise ValueError("action_protocol must be directive, tools or auto")
        # Read by the planner; kept here because it is a fact about the endpoint.
        self.action_protocol = action_protocol
        # Index into RESPONSE_FORMS of the strongest form this server has not
        # refused: moved down once per refusal, so later action calls do not pay
        # a failed request each.
        self.response_form_index = 0
        # None until known; False once the server refused `tools`.
        self.tools_supported: bool | None = None
        # Set by from_settings when the settings name no usable model; chat()
        # then refuses with this sentence instead of sending a doomed request.
        self._not_configured: str | None = None
        # Latency per role and model, failures (runtime/metrics.py); None: not kept.
        self.metrics = metrics
        headers = {"Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            headers=headers,
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None) -> ModelClient:
        """Build the client from `Settings`. Never raises for a missing model:
        the console must start without one, so chat() raises
        ModelNotConfiguredError naming the variables to set."""
        client = cls(
            settings.model_base_url,
            settings.model_api_key,
            {"thinker": settings.thinker_model, "action": settings.action_model},
            timeout=settings.model_timeout,
            max_retries=settings.model_max_retries,
            max_tokens={
                "action": settings.action_max_tokens,
                "thinker": settings.thinker_max_tokens,
            },
            temperature={
                "action": settings.action_temperature,
                "thinker": settings.thinker_temperature,
            },
            action_protocol=settings.action_protocol,
            metrics=metrics,
        )
        if not settings.model_configured:
            client._not_configured = (
                "No model is configured: set DUCKLM_MODEL_API_KEY (or OPENAI_API_KEY) for "
                "OpenAI, or DUCKLM_MODEL_BASE_URL for another OpenAI-compatible API such as "
                "Ollama (http://localhost:11434/v1)."
            )
        return client

    @property
    def configured(self) -> bool:
        """Whether chat() can send anything at all (it may still fail later)."""
        return self._not_configured is None and self.base_url.startswith(("http://", "https://"))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the call ------------------------------------------------------------

    @property
    def json_mode_supported(self) -> bool:
        """Whether the server still takes some `response_format` (JSON mode or stronger)."""
        return RESPONSE_FORMS[self.response_form_index] != "none"

    @property
    def response_form(self) -> str:
        """The structured-output form the next action call will use."""
        return RESPONSE_FORMS[self.response_form_index]

    async def chat(
        self,
        role: str,
        messages: list[dict[str, Any]],
        *,
        schema: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ModelResponse:
        """Send `messages` to the model for `role` and return its reply.

        Only the API's own keys of each message are sent (`role`, `content`,
        and `tool_calls` / `tool_call_id` for native tool calling):
        reasoning_content from an earlier reply must not go back (DeepSeek
        rejects it) and other keys are ours.

        Action calls ask for structured output: with `schema` (a JSON Schema of
        the directive) the strongest form the server has not refused, else
        plain JSON mode. With `tools` (OpenAI function specs) the call uses
        native tool calling instead, `tool_choice: auto`, and a server that
        refuses `tools` raises ModelToolsUnsupportedError (remembered).
        """
        if role not in self.ROLES:
            raise ValueError(f"unknown model role {role!r}; roles are {self.ROLES}")
        self._check_configured(role)
        if tools is not None and self.tools_supported is False:
            raise ModelToolsUnsupportedError(
                f"The model API at {self.base_url} does not take native tool calls; "
                "set DUCKLM_ACTION_PROTOCOL=directive (or auto)."
            )
        model = self.models[role]
        outgoing = [_outgoing_message(m) for m in messages]
        structured = role == "action" and tools is None
        started = time.monotonic()
        attempt = 0
        while True:
            form = self._form(schema) if structured else None
            payload = self._payload(model, role, outgoing, form, schema, tools)
            try:
                reply = await self._request(payload, role)
            except _ResponseFormatRejected as rejected:
                self._refuse_form(form, rejected)
                continue  # not a retry: the same attempt, one form weaker
            except ModelToolsUnsupportedError as exc:
                logger.warning(
                    "model API at %s refused native tool calling (%s); "
                    "using the JSON directive from now on",
                    self.base_url,
                    exc,
                )
                self.tools_supported = False
                self._failed(role, model, exc)
                raise
            except ModelError as exc:
                if not exc.retryable or exc._stop_retrying or attempt >= self.max_retries:
                    self._failed(role, model, exc)
                    raise
                delay = self._delay(exc, attempt)
                attempt += 1
                logger.warning(
                    "model call (%s, %s) failed: %s; retry %d/%d in %.2f s",
                    role,
                    model,
                    exc,
                    attempt,
                    self.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if tools is not None and reply.get("tool_calls"):
                self.tools_supported = True
            reply["role"] = role
            elapsed = time.monotonic() - started
            reply["latency_ms"] = int(elapsed * 1000)
            if self.metrics is not None:
                self.metrics.model_called(role, model, elapsed)
            reply["response_form"] = form if form != "none" else None
            reply.setdefault("model", model)
            return ModelResponse(**reply)

    def _failed(self, role: str, model: str, exc: ModelError) -> None:
        if self.metrics is not None:
            self.metrics.model_failed(role, model, exc)

    def _form(self, schema: dict[str, Any] | None) -> str:
        form = RESPONSE_FORMS[self.response_form_index]
        if schema is None and form in ("json_schema", "json_object_schema"):
            return "json_object"  # nothing to send a schema of
        return form

    def _refuse_form(self, form: str | None, rejected: _ResponseFormatRejected) -> None:
        if form is None or form == "none":  # pragma: no cover - nothing was sent
            raise ModelResponseError(str(rejected))
        weaker = RESPONSE_FORMS.index(form) + 1
        self.response_form_index = max(self.response_form_index, weaker)
        # Warning, not info, and once per step down: OpenAI also refuses JSON
        # mode when no message mentions "JSON", which is a prompt bug worth seeing.
        logger.warning(
            "model API at %s refused response_format %s (%s); using %s from now on",
            self.base_url,
            form,
            rejected,
            RESPONSE_FORMS[self.response_form_index],
        )

    def _check_configured(self, role: str) -> None:
        if self._not_configured is not None:
            raise ModelNotConfiguredError(self._not_configured)
        if not self.base_url:
            raise ModelNotConfiguredError("No model API is configured: set DUCKLM_MODEL_BASE_URL.")
        if not self.base_url.startswith(("http://", "https://")):
            raise ModelNotConfiguredError(
                f"DUCKLM_MODEL_BASE_URL must start with http:// or https:// "
                f"(it is {self.base_url!r})."
            )
        if not self.models.get(role):
            raise ModelNotConfiguredError(
                f"No model is configured for the {role} role: set {_ROLE_ENV[role]}."
            )

    def _payload(
        self,
        model: str,
        role: str,
        messages: list[dict[str, Any]],
        form: str | None,
        schema: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": model, "messages": messages}
        # `max_tokens`, not `max_completion_tokens`: every compatible server
        # (llama.cpp, vLLM, Ollama, DeepSeek) and OpenAI's chat models take it.
        if role in self.max_tokens:
            payload["max_tokens"] = self.max_tokens[role]
        if role in self.temperature:
            payload["temperature"] = self.temperature[role]
        if tools is not None:
            payload["tools"] = tools
            payload["tool_choice"] = "auto"
        if form == "json_schema" and schema is not None:
            # strict: false, because strict mode demands every property be
            # required and closed, which tool arguments with optional keys are not.
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "directive", "schema": schema, "strict": False},
            }
        elif form == "json_object_schema" and schema is not None:
            payload["response_format"] = {"type": "json_object", "schema": schema}
        elif form in ("json_object", "json_object_schema", "json_schema"):
            payload["response_format"] = {"type": "json_object"}
        if self.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _delay(self, exc: ModelError, attempt: int) -> float:
        if exc.retry_after is not None:
            return exc.retry_after
        base = min(self.max_backoff, self.backoff * (2**attempt))
        # Jitter keeps several bots (or several tasks of one bot) from
        # retrying in lockstep against a struggling provider.
        return base * (0.5 + random.random() / 2)

    async def _request(self, payload: dict[str, Any], role: str) -> dict[str, Any]:
        url = f"{self.base_url}/chat/completions"
        try:
            async with self._http.stream("POST", url, json=payload) as response:
                if response.status_code >= 300:
                    body = await _read_capped(response, MAX_ERROR_BYTES, truncate=True)
                    raise self._status_error(response, body, payload, role)
                if _is_event_stream(response):
                    return await _read_event_stream(response)
                body = await _read_capped(response, MAX_RESPONSE_BYTES)
                return _parse_completion(body, response)
        except ModelError:
            raise
        except _ResponseFormatRejected:
            raise
        except httpx.TimeoutException as exc:
            what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
            limit = min(CONNECT_TIMEOUT, self.timeout) if what == "connect" else self.timeout
            raise ModelTimeoutError(
                f"The model API at {self.base_url} did not {what} within {limit:g} s.",
                retryable=True,
            ) from exc
        except httpx.ConnectError as exc:
            raise ModelConnectionError(
                f"Cannot connect to the model API at {self.base_url} ({_describe(exc)}). "
                "Check DUCKLM_MODEL_BASE_URL and that the server is running.",
                retryable=True,
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise ModelConnectionError(
                f"The model API at {self.base_url} dropped the connection ({_describe(exc)}).",
                retryable=True,
            ) from exc
        except httpx.DecodingError as exc:
            raise ModelResponseError(
                f"{_NOT_A_COMPLETION} (undecodable body: {_describe(exc)})."
            ) from exc
        except httpx.InvalidURL as exc:
            raise ModelNotConfiguredError(
                f"DUCKLM_MODEL_BASE_URL is not a usable URL ({_describe(exc)})."
            ) from exc
        except httpx.HTTPError as exc:
            raise ModelConnectionError(
                f"The request to the model API at {self.base_url} failed ({_describe(exc)}).",
                retryable=False,
            ) from exc

    def _status_error(
        self, response: httpx.Response, body: bytes, payload: dict[str, Any], role: str
    ) -> ModelError | _ResponseFormatRejected:
        status = response.status_code
        detail = self._scrub(_provider_message(body) or response.reason_phrase or "no detail")
        detail = detail.rstrip(". ")  # it is followed by our own period
        # llama-cpp-python answers an unknown response_format with a 500 that
        # names it; a 500 naming nothing of the kind is a real failure (retried).
        refusal = status in (400, 422) or (status == 500 and detail != "no detail")
        if refusal and "response_format" in payload and _mentions(body, _FORMAT_MARKERS):
            return _ResponseFormatRejected(detail)
        if refusal and "tools" in payload and _mentions(body, _TOOLS_MARKERS):
            return ModelToolsUnsupportedError(
                f"The model API refused native tool calling (HTTP {status}): {detail}. "
                "Set DUCKLM_ACTION_PROTOCOL=directive (or auto).",
                status=status,
            )
        if status in (401, 403):
            if not self.api_key:
                text = (
                    f"The model API requires an API key (HTTP {status}): {detail}. "
                    "Set DUCKLM_MODEL_API_KEY."
                )
            elif status == 401:
                text = (
                    f"The model API rejected the API key (HTTP 401): {detail}. "
                    "Check DUCKLM_MODEL_API_KEY."
                )
            else:
                text = (
                    f"The model API refused access (HTTP 403): {detail}. Check "
                    f"DUCKLM_MODEL_API_KEY and that it may use model {payload['model']!r}."
                )
            return ModelAuthError(text, status=status)
        if 300 <= status < 400:
            where = response.headers.get("location", "elsewhere")
            return ModelError(
                f"The model API redirected the request (HTTP {status}) to {where}; "
                "set DUCKLM_MODEL_BASE_URL to the final address.",
                status=status,
            )
        if status == 404:
            return ModelError(
                f"The model API has no such model or endpoint (HTTP 404): {detail}. "
                f"Check DUCKLM_MODEL_BASE_URL and {_ROLE_ENV[role]} "
                f"(model {payload['model']!r}).",
                status=status,
            )
        if status in RETRYABLE_STATUSES or status >= 500:
            if status == 429:
                lead = "The model API is rate limiting us"
            elif status >= 500:
                lead = "The model API failed"
            else:
                lead = "The model API could not take the request now"
            wait = _retry_after(response.headers)
            if wait is not None and wait > MAX_RETRY_AFTER:
                error = ModelError(
                    f"{lead} (HTTP {status}) and asks us to wait {wait:.0f} s, longer than "
                    f"{MAX_RETRY_AFTER:.0f} s, so the bot gives up: {detail}.",
                    status=status,
                    retryable=True,
                )
                # Retryable for a caller deciding later, but this call stops now.
                error._stop_retrying = True
                return error
            error = ModelError(f"{lead} (HTTP {status}): {detail}.", status=status, retryable=True)
            error.retry_after = wait
            return error
        return ModelError(
            f"The model API refused the request (HTTP {status}): {detail}.", status=status
        )

    def _scrub(self, text: str) -> str:
        # Providers sometimes echo the key; errors end up in chat threads.
        if self.api_key and len(self.api_key) >= 4:
            text = text.replace(self.api_key, "***")
        return text


# -- helpers -------------------------------------------------------------------


def _outgoing_message(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    outgoing: dict[str, Any] = {
        "role": message.get("role"),
        "content": "" if content is None else content,
    }
    if message.get("role") == "assistant" and message.get("tool_calls"):
        outgoing["tool_calls"] = message["tool_calls"]
    if message.get("role") == "tool":
        outgoing["tool_call_id"] = message.get("tool_call_id")
    return outgoing


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clip(text: str, limit: int = PROVIDER_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _provider_message(body: bytes) -> str:
    """The provider's own error text: OpenAI's {"error": {"message"}}, Ollama's
    {"error": "..."}, FastAPI's {"detail": ...}, else the body as text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _clip(text)
    candidates: list[Any] = []
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            candidates.append(error.get("message"))
        candidates += [error, data.get("message"), data.get("detail")]
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        # Some gateways wrap the OpenAI error in a list.
        return _provider_message(json.dumps(data[0]).encode())
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return _clip(candidate)
        if candidate and not isinstance(candidate, dict):
            return _clip(json.dumps(candidate))
    return _clip(text)


def _mentions(body: bytes, markers: tuple[str, ...]) -> bool:
    text = body.decode("utf-8", errors="replace").lower()
    return any(marker in text for marker in markers)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After`
    (seconds or an HTTP-date); None when absent or unreadable."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = None
        if value is not None and value == value:  # not NaN
            return max(0.0, value)
    return parse_retry_after(headers.get("retry-after"))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header value (delta-seconds or HTTP-date) to seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            return None
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


async def _read_capped(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """Read the body, refusing (or, for error bodies, cutting) past `limit`
    bytes: a broken proxy must not make the bot buffer gigabytes."""
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit:
        raise ModelResponseError(
            f"{_NOT_A_COMPLETION}: the body is larger than {_size(limit)} ({declared} bytes)."
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if truncate:
                chunks.append(chunk[: limit - (size - len(chunk))])
                break
            raise ModelResponseError(
                f"{_NOT_A_COMPLETION}: the body is larger than {_size(limit)}."
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _size(limit: int) -> str:
    return f"{limit / (1024 * 1024):g} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"


def _garbage(body: bytes, response: httpx.Response) -> ModelResponseError:
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    sample = _clip(body[:200].decode("utf-8", errors="replace"), 80)
    return ModelResponseError(
        f"{_NOT_A_COMPLETION} (HTTP {response.status_code}, {kind}, {len(body)} bytes"
        + (f": {sample!r})." if sample else ").")
    )


def _text_of(value: Any) -> str | None:
    """Content as text: a string, or a list of parts [{"type": "text", "text": ...}]."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [part.get("text", "") if isinstance(part, dict) else str(part) for part in value]
        return "".join(p for p in parts if isinstance(p, str))
    return str(value)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(data: Mapping[str, Any]) -> dict[str, int | None]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return {}
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _embedded_error(data: Mapping[str, Any]) -> ModelResponseError | None:
    """OpenRouter and some proxies answer 200 with {"error": {...}} in the body
    (or in a stream chunk) when the upstream model failed."""
    error = data.get("error")
    if not error:
        return None
    detail = _provider_message(json.dumps({"error": error}).encode()).rstrip(". ")
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    return ModelResponseError(
        f"The model API reported an error instead of an answer: {detail}.",
        status=status,
        retryable=status is not None and (status in RETRYABLE_STATUSES or status >= 500),
    )


def _parse_completion(body: bytes, response: httpx.Response) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _garbage(body, response) from exc
    if not isinstance(data, dict):
        raise _garbage(body, response)
    embedded = _embedded_error(data)
    if embedded is not None:
        raise embedded
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _garbage(body, response)
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise _garbage(body, response)
    reasoning = _text_of(message.get("reasoning_content")) or _text_of(message.get("reasoning"))
    finish = choices[0].get("finish_reason")
    reply: dict[str, Any] = {
        "content": _text_of(message.get("content")) or "",
        "reasoning_content": reasoning or None,
        "finish_reason": finish if isinstance(finish, str) else None,
        "tool_calls": _tool_calls(message.get("tool_calls")),
        **_usage(data),
    }
    if isinstance(data.get("model"), str) and data["model"]:
        reply["model"] = data["model"]
    return reply


async def _read_event_stream(response: httpx.Response) -> dict[str, Any]:
    """Assemble a streamed completion from its SSE `data:` chunks.

    Each `data:` line is taken as one event: the providers we target send one
    JSON chunk per line, and some omit the blank line between events.
    """
    content: list[str] = []
    reasoning: list[str] = []
    # Tool calls arrive in pieces keyed by their index: the id and name in the
    # first delta, the arguments spread over many.
    calls: dict[int, dict[str, Any]] = {}
    reply: dict[str, Any] = {}
    size = 0
    buffer = b""
    chunks_seen = 0
    done = False

    def handle(line: bytes) -> None:
        nonlocal chunks_seen, done
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:"):
            return  # comments (": keep-alive"), event:, id:, retry:, blank lines
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            return
        if not data:
            return
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise _garbage(data, response) from exc
        if not isinstance(chunk, dict):
            raise _garbage(data, response)
        embedded = _embedded_error(chunk)
        if embedded is not None:
            raise embedded
        chunks_seen += 1
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            reply["model"] = chunk["model"]
        usage = _usage(chunk)
        if usage:
            reply.update(usage)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            # A server that ignored "stream" semantics but kept the framing.
            delta = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        piece = _text_of(delta.get("content"))
        if piece:
            content.append(piece)
        thought = _text_of(delta.get("reasoning_content")) or _text_of(delta.get("reasoning"))
        if thought:
            reasoning.append(thought)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            reply["finish_reason"] = finish
        pieces = delta.get("tool_calls")
        for position, piece_call in enumerate(pieces if isinstance(pieces, list) else []):
            if not isinstance(piece_call, dict):
                continue
            key = piece_call.get("index")
            key = key if isinstance(key, int) else position
            call = calls.setdefault(key, {"id": "", "name": "", "arguments": []})
            if isinstance(piece_call.get("id"), str) and piece_call["id"]:
                call["id"] = piece_call["id"]
            function = piece_call.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str) and function["name"]:
                    call["name"] = function["name"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"].append(function["arguments"])

    async for raw in response.aiter_bytes():
        size += len(raw)
        if size > MAX_RESPONSE_BYTES:
            raise ModelResponseError(
                f"{_NOT_A_COMPLETION}: the stream is larger than {_size(MAX_RESPONSE_BYTES)}."
            )
        buffer += raw
        if b"\n" not in raw:
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            handle(line)
        if done:
            break
    if not done and buffer:
        handle(buffer)
    if chunks_seen == 0:
        raise ModelResponseError(f"{_NOT_A_COMPLETION} (an event stream with no chunks).")
    reply["content"] = "".join(content)
    reply["reasoning_content"] = "".join(reasoning) or None
    reply["tool_calls"] = _tool_calls(
        [
            {
                "id": call["id"],
                "function": {"name": call["name"], "arguments": "".join(call["arguments"])},
            }
            for _, call in sorted(calls.items())
        ]
    )
    return reply


def _tool_calls(raw: Any) -> list[ToolCall]:
    """The reply's tool calls, in order. Arguments stay text (OpenAI sends a
    JSON string; some servers send an object, which is turned back into JSON);
    the planner decides what is usable. A call without an id gets one, since a
    `tool` message must name the call it answers."""
    if not isinstance(raw, list):
        return []
    calls: list[ToolCall] = []
    for number, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            continue
        function = item.get("function")
        if not isinstance(function, dict):
            continue
        name = function.get("name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = "" if arguments is None else json.dumps(arguments, ensure_ascii=False)
        ident = item.get("id")
        calls.append(
            ToolCall(
                id=ident if isinstance(ident, str) and ident else f"call_{number}",
                name=name if isinstance(name, str) else "",
                arguments=arguments,
            )
        )
    return calls
