"""How the Matrix side treats a homeserver's failures: which answers are worth
retrying, the backoff between tries, and the text a person reads."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from nio import ErrorResponse

if TYPE_CHECKING:
    from runtime.metrics import Metrics

MAX_BACKOFF = 60.0


def backoff(failures: int, cap: float = MAX_BACKOFF) -> float:
    """0.5 s, 1 s, 2 s … up to `cap`, with jitter so restarts don't stampede."""
    delay = min(cap, 0.5 * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.2)


def error_text(response: Any) -> str:
    """A homeserver's refusal as `M_FORBIDDEN: …` (or the exception's text)."""
    if isinstance(response, ErrorResponse):
        status = getattr(response.transport_response, "status", None)
        code = response.status_code or (f"HTTP {status}" if status else "error")
        return f"{code}: {response.message}"
    return str(response)


def is_token_error(response: Any) -> bool:
    """The access token is gone (revoked, expired): only a new login helps."""
    return isinstance(response, ErrorResponse) and response.status_code in (
        "M_UNKNOWN_TOKEN",
        "M_MISSING_TOKEN",
    )


def is_transient(response: ErrorResponse) -> bool:
    """A 5xx, a rate limit or no HTTP answer at all: trying again may work."""
    status = getattr(response.transport_response, "status", None)
    return status is None or status >= 500 or response.status_code == "M_LIMIT_EXCEEDED"


def count_error(metrics: Metrics | None, method: str, response: Any) -> None:
    """Count a failed homeserver call for /metrics: by method and its M_ code
    (`connection` for no HTTP answer), and a rate limit (M_LIMIT_EXCEEDED or
    HTTP 429) as such too. Nothing without metrics."""
    if metrics is None:
        return
    status = None
    if isinstance(response, ErrorResponse):
        status = getattr(response.transport_response, "status", None)
        code = response.status_code or (f"HTTP {status}" if status else "error")
    else:
        code = "connection"
    metrics.api_error("matrix", method, code)
    if code == "M_LIMIT_EXCEEDED" or status == 429:
        metrics.rate_limit("matrix")
