"""Slack's Web API client, counted: API errors by method and error, and 429s.

`MeteredWebClient` counts every call that ends in an error (Slack's `ok:
false` answer by its error code, a network failure as `connection`) under
platform "slack"; `CountingRateLimitHandler` is slack-sdk's own 429 retry
handler that also counts each rate-limited answer, retried or not. Both
observe `runtime/metrics.py`'s `Metrics`; without one they only do their job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

if TYPE_CHECKING:
    from runtime.metrics import Metrics

PLATFORM = "slack"


class MeteredWebClient(AsyncWebClient):
    """AsyncWebClient whose failed calls are counted (every method of the SDK
    goes through `api_call`)."""

    metrics: Metrics | None = None

    async def api_call(self, api_method: str, **kwargs: Any) -> AsyncSlackResponse:
        try:
            return await super().api_call(api_method, **kwargs)
        except SlackApiError as exc:
            if self.metrics is not None:
                error = exc.response.get("error") if exc.response is not None else None
                self.metrics.api_error(PLATFORM, api_method, str(error or "unknown"))
            raise
        except (aiohttp.ClientError, OSError, TimeoutError):
            if self.metrics is not None:
                self.metrics.api_error(PLATFORM, api_method, "connection")
            raise


class CountingRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """Retries a 429 after Retry-After (slack-sdk's handler) and counts it,
    including the last one that is no longer retried."""

    def __init__(self, metrics: Metrics | None, max_retry_count: int) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.metrics = metrics

    async def can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if self.metrics is not None and response is not None and response.status_code == 429:
            self.metrics.rate_limit(PLATFORM)
        return await super().can_retry_async(
            state=state, request=request, response=response, error=error
        )
