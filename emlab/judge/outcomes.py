"""What one judge request came to, and how an OpenAI client error is classified.

Shared by the request loop (:mod:`emlab.judge.requests`) and the Batch API calls (:mod:`emlab.judge.batch`),
which both import from here (and not from each other).

>>> short("a   b " * 40, n=12)
'a b a b a...'
>>> transient_problem(ValueError("bad  json"), 30.0)
('malformed response (bad json)', None)
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Any

import openai

from emlab.judge.base import Judgment

__all__ = ["API_FAILURES", "CONFIG_STATUS", "TRANSIENT_STATUS", "Malformed", "Outcome", "retry_after", "short",
           "transient_problem"]

#: HTTP statuses worth retrying besides 5xx.
TRANSIENT_STATUS = {408, 409, 429}
#: HTTP statuses no retry changes, with what to check.
CONFIG_STATUS = {
    401: "authentication failed: check OPENAI_API_KEY (or api_key=)",
    403: "permission denied for this model or endpoint",
    404: "model or endpoint not found: check the model name and OPENAI_BASE_URL",
}


@dataclass
class Outcome:
    """A judgment and whether it is final (``definitive=False``: a failure a later run may retry)."""

    judgment: Judgment
    definitive: bool
    top_logprobs: list[tuple[str, float]] | None = None


class Malformed(Exception):
    """A 200 response too broken to use; the request is retried."""


#: What a request through the OpenAI client can raise that the judge turns into a retry or a reason.
API_FAILURES = (openai.APIStatusError, openai.APIConnectionError, openai.APIResponseValidationError, ValueError)


def transient_problem(e: BaseException, timeout: float) -> tuple[str, float | None]:
    """Why a request failed in a way worth retrying, and the server's Retry-After in seconds (or None).

    Used by the request loop and the Batch API calls alike (after they have handled the statuses that
    no retry changes).
    """
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}", retry_after(e.response.headers)
    if isinstance(e, openai.APITimeoutError):
        return f"timed out after {timeout:g} s", None
    if isinstance(e, openai.APIConnectionError):
        return f"connection error ({short(str(e.__cause__ or e))})", None
    return f"malformed response ({short(str(e))})", None


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def short(text: str, n: int = 120) -> str:
    """``text`` on one line, cut to ``n`` characters with ``...``."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."
