"""ModelClient against the local fake OpenAI server: the real httpx path runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from runtime.model import (
    ModelAuthError,
    ModelClient,
    ModelConnectionError,
    ModelError,
    ModelNotConfiguredError,
    ModelResponse,
    ModelResponseError,
    ModelTimeoutError,
    parse_retry_after,
)
from runtime.settings import Settings
from tests.fakes.openai_server import (
    Drop,
    Error,
    FakeModelServer,
    Hang,
    Raw,
    RecordedRequest,
    Text,
)

THINKER, ACTION = "fake-thinker", "fake-action"
MODELS = {"thinker": THINKER, "action": ACTION}
QUESTION = [
    {"role": "system", "content": "You are a duck."},
    {"role": "user", "content": "Why is web-1 slow?"},
]


def make_client(server: FakeModelServer, **options: Any) -> ModelClient:
    options.setdefault("backoff", 0.01)
    options.setdefault("timeout", 5.0)
    api_key = options.pop("api_key", "sk-test")
    return ModelClient(server.base_url, api_key, MODELS, **options)


@pytest.fixture
async def client(model_server: FakeModelServer) -> AsyncIterator[ModelClient]:
    async with make_client(model_server) as model_client:
        yield model_client


def sse(*events: dict[str, Any] | str, sep: str = "\n\n") -> bytes:
    lines = [e if isinstance(e, str) else f"data: {json.dumps(e)}" for e in events]
    return (sep.join(lines) + sep).encode()


# -- answers -----------------------------------------------------------------------


async def test_plain_answer_with_usage_and_latency(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    async def slow(request: RecordedRequest) -> Text:
        await asyncio.sleep(0.1)
        return Text("Disk is full.", usage=(12, 3))

    model_server.set_handler(THINKER, slow)
    response = await client.chat("thinker", QUESTION)

    assert isinstance(response, ModelResponse)
    assert response.content == "Disk is full."
    assert response.role == "thinker"
    assert response.model == THINKER
    assert response.reasoning_content is None
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (
        12,
        3,
        15,
    )
    assert 100 <= response.latency_ms < 5000

    [request] = model_server.requests
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body["model"] == THINKER
    assert request.body["messages"] == QUESTION
    assert "response_format" not in request.body
    assert "stream" not in request.body


async def test_no_key_sends_no_authorization(model_server: FakeModelServer) -> None:
    model_server.reply(THINKER, Text("hi"))
    async with make_client(model_server, api_key=None) as client:
        assert (await client.chat("thinker", QUESTION)).content == "hi"
    assert "Authorization" not in model_server.requests[0].headers


async def test_reasoning_is_captured_and_never_sent_back(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(
        THINKER,
        Text("Restart nginx.", reasoning_content="The load is from nginx workers."),
        Text("Done."),
    )
    first = await client.chat("thinker", QUESTION)
    assert first.reasoning_content == "The load is from nginx workers."
    assert first.content == "Restart nginx."

    follow_up = [
        *QUESTION,
        {"role": "assistant", **first.model_dump(exclude={"role"})},  # reasoning, tokens...
        {"role": "user", "content": "Thanks", "name": "alice", "tool_calls": []},
    ]
    await client.chat("thinker", follow_up)

    sent = model_server.requests[1].body["messages"]
    assert sent == [
        *QUESTION,
        {"role": "assistant", "content": "Restart nginx."},
        {"role": "user", "content": "Thanks"},
    ]
    assert "reasoning" not in json.dumps(model_server.requests[1].body)


async def test_openrouter_style_reasoning_and_content_parts(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    body = {
        "id": "gen-1",
        "model": "vendor/model-x",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "!"}],
                    "reasoning": "greeting",
                }
            }
        ],
    }
    model_server.reply(THINKER, Raw(json.dumps(body).encode()))
    response = await client.chat("thinker", QUESTION)
    assert (response.content, response.reasoning_content) == ("Hello !", "greeting")
    assert response.model == "vendor/model-x"
    assert response.prompt_tokens is None and response.total_tokens is None


async def test_null_content_is_empty_text(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": None}}], "usage": None}
    model_server.reply(THINKER, Raw(json.dumps(body).encode()))
    response = await client.chat("thinker", QUESTION)
    assert response.content == ""
    assert response.model == THINKER  # the provider did not say; we asked for it


# -- streaming -----------------------------------------------------------------------


async def test_streamed_reply_is_assembled(model_server: FakeModelServer) -> None:
    model_server.reply(
        THINKER,
        Text(
            "The answer, assembled from many small deltas, is 42.",
            reasoning_content="Let me think about this carefully, step by step.",
            usage=(20, 7),
        ),
    )
    async with make_client(model_server, stream=True) as client:
        response = await client.chat("thinker", QUESTION)

    assert response.content == "The answer, assembled from many small deltas, is 42."
    assert response.reasoning_content == "Let me think about this carefully, step by step."
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (
        20,
        7,
        27,
    )
    assert response.role == "thinker"
    assert response.model == THINKER
    body = model_server.requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_requested_but_server_answers_plain_json(
    model_server: FakeModelServer,
) -> None:
    model_server.reply(THINKER, Text("not streamed", stream=False))
    async with make_client(model_server, stream=True) as client:
        assert (await client.chat("thinker", QUESTION)).content == "not streamed"


async def test_stream_tolerates_comments_crlf_and_missing_blank_lines(
    model_server: FakeModelServer,
) -> None:
    body = sse(
        ": OPENROUTER PROCESSING",
        {"choices": [{"delta": {"role": "assistant", "reasoning": "hm"}}]},
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": "b"}}], "model": "served-model"},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        "data: [DONE]",
        sep="\r\n",
    )
    model_server.reply(THINKER, Raw(body, content_type="text/event-stream"))
    async with make_client(model_server, stream=True) as client:
        response = await client.chat("thinker", QUESTION)
    assert (response.content, response.reasoning_content) == ("ab", "hm")
    assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (1, 2, 3)
    assert response.model == "served-model"


async def test_stream_error_chunk_is_retried(model_server: FakeModelServer) -> None:
    failing = sse({"error": {"message": "upstream overloaded", "code": 502}}, "data: [DONE]")
    model_server.reply(THINKER, Raw(failing, content_type="text/event-stream"), Text("recovered"))
    async with make_client(model_server, stream=True) as client:
        assert (await client.chat("thinker", QUESTION)).content == "recovered"
    assert len(model_server.requests) == 2


async def test_stream_of_garbage_is_a_response_error(model_server: FakeModelServer) -> None:
    model_server.reply(THINKER, Raw(b"data: <html>\n\n", content_type="text/event-stream"))
    async with make_client(model_server, stream=True) as client:
        with pytest.raises(ModelResponseError, match="not a chat completion"):
            await client.chat("thinker", QUESTION)


async def test_oversized_stream_is_refused(model_server: FakeModelServer) -> None:
    body = b": keep-alive\n" * (9 * 1024 * 1024 // 13)
    model_server.reply(THINKER, Raw(body, content_type="text/event-stream"))
    async with make_client(model_server, stream=True) as client:
        with pytest.raises(ModelResponseError, match="larger than 8 MiB"):
            await client.chat("thinker", QUESTION)


# -- retries -------------------------------------------------------------------------


async def test_server_error_then_success_is_retried(
    model_server: FakeModelServer, client: ModelClient, caplog: pytest.LogCaptureFixture
) -> None:
    model_server.reply(THINKER, Error(500, "The server had an error"), Text("ok"))
    with caplog.at_level(logging.WARNING, logger="ducklm.model"):
        response = await client.chat("thinker", QUESTION)
    assert response.content == "ok"
    assert len(model_server.requests_for(THINKER)) == 2
    assert "retry 1/3" in caplog.text
    assert "sk-test" not in caplog.text


async def test_retries_are_bounded(model_server: FakeModelServer) -> None:
    model_server.set_default(THINKER, Error(503, "overloaded"))
    async with make_client(model_server, max_retries=2) as client:
        with pytest.raises(ModelError) as caught:
            await client.chat("thinker", QUESTION)
    assert caught.value.status == 503
    assert caught.value.retryable
    assert "overloaded" in str(caught.value)
    assert len(model_server.requests) == 3


async def test_429_retry_after_is_honoured(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(
        THINKER, Error(429, "Rate limit reached", headers={"Retry-After": "1"}), Text("ok")
    )
    started = time.monotonic()
    assert (await client.chat("thinker", QUESTION)).content == "ok"
    assert 0.9 <= time.monotonic() - started < 10
    assert len(model_server.requests) == 2


async def test_retry_after_ms_is_preferred(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    headers = {"Retry-After": "30", "retry-after-ms": "50"}
    model_server.reply(THINKER, Error(429, "slow down", headers=headers), Text("ok"))
    started = time.monotonic()
    assert (await client.chat("thinker", QUESTION)).content == "ok"
    assert time.monotonic() - started < 10  # not the 30 s of Retry-After


@pytest.mark.parametrize(
    "retry_after",
    [
        "3600",
        format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True),
    ],
)
async def test_too_long_retry_after_gives_up_quickly(
    model_server: FakeModelServer, client: ModelClient, retry_after: str
) -> None:
    model_server.reply(
        THINKER,
        Error(429, "You exceeded your current quota", headers={"Retry-After": retry_after}),
        Text("never reached"),
    )
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        await client.chat("thinker", QUESTION)
    assert time.monotonic() - started < 10  # not the hour (or two) asked for
    assert caught.value.status == 429
    assert "You exceeded your current quota" in str(caught.value)
    assert "gives up" in str(caught.value)
    assert len(model_server.requests) == 1


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("2", now) == 2
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-4", now) == 0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now) == 30
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None


async def test_hang_past_timeout_is_a_timeout_error_after_retries(
    model_server: FakeModelServer,
) -> None:
    model_server.set_default(THINKER, Hang(10))
    started = time.monotonic()
    async with make_client(model_server, timeout=0.2, max_retries=1) as client:
        with pytest.raises(ModelTimeoutError) as caught:
            await client.chat("thinker", QUESTION)
    assert time.monotonic() - started < 8  # not the 10 s the server hangs
    assert caught.value.retryable
    assert "did not answer within 0.2 s" in str(caught.value)
    assert len(model_server.requests) == 2


async def test_dropped_connection_is_retried(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(THINKER, Drop(), Text("ok"))
    assert (await client.chat("thinker", QUESTION)).content == "ok"
    assert len(model_server.requests) == 2


async def test_dropped_connections_end_in_connection_error(
    model_server: FakeModelServer,
) -> None:
    model_server.set_default(THINKER, Drop())
    async with make_client(model_server, max_retries=2) as client:
        with pytest.raises(ModelConnectionError, match="dropped the connection") as caught:
            await client.chat("thinker", QUESTION)
    assert caught.value.retryable and caught.value.status is None
    assert len(model_server.requests) == 3


async def test_nothing_listening_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    async with ModelClient(base_url, None, MODELS, max_retries=1, backoff=0.01) as client:
        with pytest.raises(ModelConnectionError) as caught:
            await client.chat("thinker", QUESTION)
    assert base_url in str(caught.value)
    assert "DUCKLM_MODEL_BASE_URL" in str(caught.value)


async def test_max_retries_zero_means_one_request(model_server: FakeModelServer) -> None:
    model_server.set_default(THINKER, Error(500, "boom"))
    async with make_client(model_server, max_retries=0) as client:
        with pytest.raises(ModelError):
            await client.chat("thinker", QUESTION)
    assert len(model_server.requests) == 1


# -- refusals ------------------------------------------------------------------------


async def test_wrong_key_is_an_auth_error_without_retry() -> None:
    server = FakeModelServer(api_key="sk-right-key-0000")
    await server.start()
    try:
        async with make_client(server, api_key="sk-wrong-key-1234") as client:
            with pytest.raises(ModelAuthError) as caught:
                await client.chat("thinker", QUESTION)
    finally:
        await server.stop()
    error = caught.value
    assert error.status == 401
    assert not error.retryable
    assert str(error).startswith("The model API rejected the API key (HTTP 401): ")
    assert "Incorrect API key provided" in str(error)
    assert "DUCKLM_MODEL_API_KEY" in str(error)
    assert "sk-wrong-key-1234" not in str(error)
    assert len(server.requests) == 1


async def test_missing_key_is_named(model_server: FakeModelServer) -> None:
    model_server.reply(THINKER, Error(401, "You didn't provide an API key."))
    async with make_client(model_server, api_key=None) as client:
        with pytest.raises(ModelAuthError, match=r"requires an API key.*DUCKLM_MODEL_API_KEY"):
            await client.chat("thinker", QUESTION)


async def test_key_echoed_by_the_provider_is_scrubbed(model_server: FakeModelServer) -> None:
    model_server.reply(THINKER, Error(403, "key sk-test-abcdef is not allowed to use this model"))
    async with make_client(model_server, api_key="sk-test-abcdef") as client:
        with pytest.raises(ModelAuthError) as caught:
            await client.chat("thinker", QUESTION)
    assert "sk-test-abcdef" not in str(caught.value)
    assert "not allowed to use this model" in str(caught.value)
    assert caught.value.status == 403


async def test_non_retryable_4xx_keeps_the_provider_message(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(THINKER, Error(400, "This model's maximum context length is 8192 tokens."))
    with pytest.raises(ModelError) as caught:
        await client.chat("thinker", QUESTION)
    assert type(caught.value) is ModelError
    assert caught.value.status == 400 and not caught.value.retryable
    assert str(caught.value) == (
        "The model API refused the request (HTTP 400): "
        "This model's maximum context length is 8192 tokens."
    )
    assert len(model_server.requests) == 1


async def test_plain_text_error_is_truncated(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(THINKER, Error(422, body="bad request " + "x" * 5000))
    with pytest.raises(ModelError) as caught:
        await client.chat("thinker", QUESTION)
    assert "bad request xxx" in str(caught.value)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"error": "model \\"llama9\\" not found, try pulling it first"}', "try pulling it"),
        ('{"detail": "Not Found"}', "Not Found"),
        ('{"object": "error", "message": "The model does not exist."}', "does not exist"),
    ],
)
async def test_not_found_names_model_and_variables(
    model_server: FakeModelServer, client: ModelClient, body: str, expected: str
) -> None:
    model_server.reply(THINKER, Error(404, body=body))
    with pytest.raises(ModelError) as caught:
        await client.chat("thinker", QUESTION)
    message = str(caught.value)
    assert expected in message
    assert "DUCKLM_THINKER_MODEL" in message and THINKER in message
    assert not caught.value.retryable


async def test_redirect_is_not_followed(model_server: FakeModelServer, client: ModelClient) -> None:
    model_server.reply(THINKER, Error(307, headers={"Location": "https://elsewhere.example/v1"}))
    with pytest.raises(ModelError, match=r"elsewhere\.example.*DUCKLM_MODEL_BASE_URL"):
        await client.chat("thinker", QUESTION)


@pytest.mark.parametrize(
    "raw",
    [
        Raw(os.urandom(1024 * 1024), content_type="application/octet-stream"),
        Raw(b"<html><body>Welcome to nginx!</body></html>", content_type="text/html"),
        Raw(b'{"id": "x", "object": "list", "data": []}'),
        Raw(b'{"choices": []}'),
        Raw(b'{"choices": [{"text": "legacy completion"}]}'),
        Raw(b"[1, 2, 3]"),
        Raw(b"[" * 100_000),
    ],
)
async def test_garbage_is_a_response_error(
    model_server: FakeModelServer, client: ModelClient, raw: Raw
) -> None:
    model_server.reply(THINKER, raw)
    with pytest.raises(ModelResponseError) as caught:
        await client.chat("thinker", QUESTION)
    assert str(caught.value).startswith(
        "The model API returned something that is not a chat completion"
    )
    assert len(str(caught.value)) < 300
    assert len(model_server.requests) == 1


async def test_oversized_body_is_refused(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(THINKER, Raw(b" " * (9 * 1024 * 1024)))
    with pytest.raises(ModelResponseError, match="larger than 8 MiB"):
        await client.chat("thinker", QUESTION)


async def test_error_inside_a_200_body(model_server: FakeModelServer, client: ModelClient) -> None:
    body = {"error": {"message": "Provider returned error", "code": 400}}
    model_server.reply(THINKER, Raw(json.dumps(body).encode()))
    with pytest.raises(ModelResponseError, match="Provider returned error") as caught:
        await client.chat("thinker", QUESTION)
    assert caught.value.status == 400 and not caught.value.retryable


# -- the action role and JSON mode -----------------------------------------------------


async def test_action_role_asks_for_json(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(ACTION, Text('{"actions": []}'))
    model_server.reply(THINKER, Text("prose"))
    action = await client.chat("action", QUESTION)
    assert (action.content, action.role) == ('{"actions": []}', "action")
    assert (await client.chat("thinker", QUESTION)).role == "thinker"
    assert model_server.requests_for(ACTION)[0].body["response_format"] == {"type": "json_object"}
    assert "response_format" not in model_server.requests_for(THINKER)[0].body


@pytest.mark.parametrize(
    "error",
    [
        Error(400, "response_format is not supported by this server"),
        Error(400, body='{"error": {"code": 400, "message": "Unsupported param: json_object"}}'),
        Error(422, body="unknown field `response_format`"),
    ],
)
async def test_response_format_refusal_falls_back_once_and_is_remembered(
    model_server: FakeModelServer, error: Error
) -> None:
    model_server.reply(ACTION, error, Text('{"actions": []}'), Text('{"actions": []}'))
    async with make_client(model_server, max_retries=0) as client:
        assert (await client.chat("action", QUESTION)).content == '{"actions": []}'
        assert not client.json_mode_supported
        await client.chat("action", QUESTION)
    sent = [("response_format" in r.body) for r in model_server.requests_for(ACTION)]
    assert sent == [True, False, False]


async def test_unrelated_400_on_action_is_not_a_fallback(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.reply(ACTION, Error(400, "messages must not be empty"))
    with pytest.raises(ModelError, match="messages must not be empty"):
        await client.chat("action", QUESTION)
    assert client.json_mode_supported
    assert len(model_server.requests) == 1


async def test_response_format_fallback_happens_once_only(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    # A server that also refuses the request without response_format must not loop.
    model_server.set_default(ACTION, Error(400, "response_format: bad; also everything else"))
    with pytest.raises(ModelError, match="HTTP 400"):
        await client.chat("action", QUESTION)
    assert len(model_server.requests) == 2


# -- configuration ---------------------------------------------------------------------


def _settings(monkeypatch: pytest.MonkeyPatch, **values: Any) -> Settings:
    for name in list(os.environ):
        if name.startswith("DUCKLM_") or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_from_settings(
    model_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(
        monkeypatch,
        model_base_url=model_server.base_url,
        model_api_key="sk-settings",
        thinker_model="settings-thinker",
        action_model="settings-action",
        model_timeout=7.5,
        model_max_retries=1,
    )
    model_server.reply("settings-action", Text('{"actions": []}'))
    async with ModelClient.from_settings(settings) as client:
        assert client.configured
        assert (client.timeout, client.max_retries) == (7.5, 1)
        response = await client.chat("action", QUESTION)
    assert response.model == "settings-action"
    assert model_server.requests[0].headers["authorization"] == "Bearer sk-settings"


async def test_unconfigured_settings_fail_on_chat_not_on_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(monkeypatch)
    assert not settings.model_configured
    async with ModelClient.from_settings(settings) as client:
        assert not client.configured
        with pytest.raises(ModelNotConfiguredError, match="DUCKLM_MODEL_API_KEY") as caught:
            await client.chat("thinker", QUESTION)
    assert not caught.value.retryable


async def test_local_server_needs_no_key(
    model_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(monkeypatch, model_base_url=model_server.base_url, thinker_model="llama3")
    model_server.reply("llama3", Text("quack"))
    async with ModelClient.from_settings(settings) as client:
        assert (await client.chat("thinker", QUESTION)).content == "quack"


@pytest.mark.parametrize(
    ("base_url", "models", "role", "message"),
    [
        ("", MODELS, "thinker", "DUCKLM_MODEL_BASE_URL"),
        ("localhost:11434/v1", MODELS, "thinker", "http:// or https://"),
        ("http://127.0.0.1:9/v1", {"thinker": "t"}, "action", "DUCKLM_ACTION_MODEL"),
        ("http://127.0.0.1:9/v1", {"thinker": "", "action": "a"}, "thinker", "THINKER_MODEL"),
    ],
)
async def test_not_configured(
    base_url: str, models: dict[str, str], role: str, message: str
) -> None:
    async with ModelClient(base_url, None, models) as client:
        with pytest.raises(ModelNotConfiguredError, match=message):
            await client.chat(role, QUESTION)


async def test_unknown_roles_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="unknown model roles"):
        ModelClient("http://127.0.0.1:9/v1", None, {"critic": "x"})
    async with ModelClient("http://127.0.0.1:9/v1", None, MODELS) as client:
        with pytest.raises(ValueError, match="unknown model role"):
            await client.chat("critic", QUESTION)


async def test_custom_transport_is_used() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url == httpx.URL("http://model.invalid/v1/chat/completions")
        completion = {"choices": [{"message": {"role": "assistant", "content": "via transport"}}]}
        return httpx.Response(200, json=completion)

    transport = httpx.MockTransport(answer)
    async with ModelClient("http://model.invalid/v1/", None, MODELS, transport=transport) as c:
        assert (await c.chat("thinker", QUESTION)).content == "via transport"


# -- the fake server's own contract ------------------------------------------------------


async def test_fake_server_without_a_script_fails_loudly(model_server: FakeModelServer) -> None:
    async with make_client(model_server, max_retries=0) as client:
        with pytest.raises(ModelError, match="no scripted reply for model 'fake-thinker'"):
            await client.chat("thinker", QUESTION)


async def test_fake_server_queue_handler_default_order(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    seen: list[str] = []

    def handler(request: RecordedRequest) -> Text:
        seen.append(request.body["messages"][-1]["content"])
        return Text(f"handled {len(seen)}")

    model_server.set_default(THINKER, Text("default"))
    model_server.set_handler(THINKER, handler)
    model_server.reply(THINKER, Text("first"), Text("second"))
    answers = [(await client.chat("thinker", QUESTION)).content for _ in range(4)]
    assert answers == ["first", "second", "handled 1", "handled 2"]
    assert seen == ["Why is web-1 slow?"] * 2
    assert len(model_server.requests_for(THINKER)) == 4
    assert model_server.requests_for(ACTION) == []


async def test_fake_server_hang_is_released_by_stop() -> None:
    server = FakeModelServer()
    await server.start()
    arrived = asyncio.Event()

    async def hang(request: RecordedRequest) -> Hang:
        arrived.set()
        return Hang(30)

    server.set_handler("m", hang)
    task = asyncio.create_task(
        asyncio.to_thread(
            httpx.post, f"{server.base_url}/chat/completions", json={"model": "m"}, timeout=10
        )
    )
    await asyncio.wait_for(arrived.wait(), 5)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 10  # not the 30 s the handler hangs
    try:
        await asyncio.wait_for(task, 5)
    except httpx.HTTPError:
        pass  # either an empty answer or a closed connection is fine


def test_fake_server_in_a_thread() -> None:
    server = FakeModelServer(api_key="sk-thread")
    server.start_in_thread()
    try:
        server.set_default("m", Text("from a thread", reasoning_content="r"))
        url = f"{server.base_url}/chat/completions"
        ok = httpx.post(
            url, json={"model": "m"}, headers={"Authorization": "Bearer sk-thread"}, timeout=5
        )
        assert ok.json()["choices"][0]["message"]["content"] == "from a thread"
        assert ok.json()["usage"] == {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
        }
        denied = httpx.post(url, json={"model": "m"}, timeout=5)
        assert denied.status_code == 401
        assert "Incorrect API key provided" in denied.json()["error"]["message"]
    finally:
        server.stop_thread()
    assert len(server.requests) == 2
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={"model": "m"}, timeout=2)


# -- issue 17: bounds, finish_reason, tool calls -------------------------------------


async def test_bounds_and_finish_reason_per_role(model_server: FakeModelServer) -> None:
    model_server.reply(ACTION, Text('{"actions": []}'))
    model_server.reply(THINKER, Text("cut", finish_reason="length"))
    async with make_client(
        model_server, max_tokens={"action": 64, "thinker": 512}, temperature={"action": 0.0}
    ) as client:
        action = await client.chat("action", QUESTION)
        thinker = await client.chat("thinker", QUESTION)
    assert (action.finish_reason, thinker.finish_reason) == ("stop", "length")
    sent_action, sent_thinker = (r.body for r in model_server.requests)
    assert (sent_action["max_tokens"], sent_action["temperature"]) == (64, 0.0)
    assert sent_thinker["max_tokens"] == 512 and "temperature" not in sent_thinker


async def test_streamed_finish_reason(model_server: FakeModelServer) -> None:
    model_server.reply(THINKER, Text("a long answer", finish_reason="length"))
    async with make_client(model_server, stream=True) as client:
        reply = await client.chat("thinker", QUESTION)
    assert (reply.content, reply.finish_reason) == ("a long answer", "length")


async def test_tool_calls_with_object_arguments_and_no_id(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    # Some servers send arguments as an object and leave out the id.
    body = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "ls", "arguments": {"path": "."}}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    model_server.reply(ACTION, Raw(json.dumps(body).encode()))
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {}}}]
    reply = await client.chat("action", QUESTION, tools=tools)
    assert reply.content == "" and reply.finish_reason == "tool_calls"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("call_1", "ls", {"path": "."})
    ]
    sent = model_server.requests[0].body
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert "response_format" not in sent  # tools, not structured output


async def test_tool_messages_are_sent_and_checked_like_openai(
    model_server: FakeModelServer, client: ModelClient
) -> None:
    model_server.set_default(ACTION, Text('{"actions": []}'))
    call = {"id": "call_9", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
    good = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [call], "ours": "dropped"},
        {"role": "tool", "tool_call_id": "call_9", "content": "a b c"},
    ]
    await client.chat("action", good)
    sent = model_server.requests[0].body["messages"]
    assert sent[2] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert sent[3] == {"role": "tool", "content": "a b c", "tool_call_id": "call_9"}
    # A tool message answering no call is refused, as OpenAI refuses it.
    with pytest.raises(ModelError, match=r"HTTP 400.*role 'tool' must be a response"):
        await client.chat("action", [*QUESTION, {"role": "tool", "tool_call_id": "x"}])
    # And a call left unanswered.
    with pytest.raises(ModelError, match="did not have response messages: call_9"):
        await client.chat("action", [*QUESTION, good[2]])


async def test_from_settings_bounds_and_protocol(
    model_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(
        monkeypatch,
        model_base_url=model_server.base_url,
        action_protocol="directive",
        thinker_max_tokens=3000,
    )
    async with ModelClient.from_settings(settings) as client:
        assert client.action_protocol == "directive"
        assert client.max_tokens == {"action": 1024, "thinker": 3000}
        assert client.temperature == {"action": 0.0, "thinker": 0.2}
