"""The requests of :class:`~emlab.judge.llm.OpenAIJudge`: request bodies, the client, retries with
backoff, and parsing a response into an :class:`~emlab.judge.outcomes.Outcome`.

:class:`JudgeRequests` holds them as methods for the judge (and :mod:`emlab.judge.batch`) to call;
:func:`parse_score_text` is re-exported by :mod:`emlab.judge.llm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
from collections.abc import Callable
from typing import Any

import openai

from emlab.judge.base import JudgeUnavailableError, Judgment, aggregate_probs
from emlab.judge.cache import cache_key
from emlab.judge.outcomes import (
    API_FAILURES,
    CONFIG_STATUS,
    TRANSIENT_STATUS,
    Malformed,
    Outcome,
    short,
    transient_problem,
)

__all__ = ["JudgeRequests", "first_choice", "parse_score_text"]

log = logging.getLogger("emlab.judge.llm")  # the judge's logger, as before the split

_TEXT_NUMBER = re.compile(r"(?<![\d.,])(\d{1,3})(?!\d)(?![.,]\d)")


def parse_score_text(text: str) -> str:
    """The score a judge wrote as text, as a token :func:`~emlab.judge.base.aggregate_probs` reads.

    The first integer 0..100 in the text counts ("Score: 85" -> "85"); without one, the first word
    stands for what the judge said instead (it makes the sample non-numeric).

    >>> [parse_score_text(t) for t in ["85", " Score: 7.", "REFUSAL", "3.5 of 10", "250", "1000", ""]]
    ['85', '7', 'REFUSAL', '10', '250', '1000', '']
    """
    for m in _TEXT_NUMBER.finditer(text):
        value = int(m.group(1))
        if value <= 100:
            return str(value)
    words = text.split()
    return words[0] if words else ""


class JudgeRequests:
    """The request machinery of :class:`~emlab.judge.llm.OpenAIJudge`, a base class of it.

    Reads the judge's settings (``model``, ``endpoint``, ``api_key``, ``base_url``, ``client``,
    ``timeout``, ``max_attempts``, ``backoff_base``, ``backoff_max``, ``samples``, ``sample_tokens``,
    ``min_mass``) and adds to its ``usage``.
    """

    def _key(self, metric: str, prompt: str, answer: str, mode: str) -> str:
        variant = "" if mode == "logprobs" else f"sample:n={self.samples},tokens={self.sample_tokens}"
        return cache_key(self.model, metric, prompt, answer, endpoint=self.endpoint, variant=variant)

    def _body(self, prompt: str, mode: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if mode == "logprobs":
            return body | {"max_tokens": 1, "logprobs": True, "top_logprobs": 20, "temperature": 0}
        return body | {"max_tokens": self.sample_tokens, "temperature": 1.0 if self.samples > 1 else 0}

    def _api_key(self) -> str:
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if api_key:
            return api_key
        if not self.base_url:
            raise JudgeUnavailableError(
                "no API key for the judge: set OPENAI_API_KEY (or pass api_key=), or point OPENAI_BASE_URL "
                "(base_url=) at a server that needs none (vLLM, transformers serve)"
            )
        return "EMPTY"  # vLLM and most self-hosted servers accept any key

    @contextlib.asynccontextmanager
    async def _client(self):
        if self.client is not None:
            yield self.client
            return
        client = openai.AsyncOpenAI(
            api_key=self._api_key(), base_url=self.base_url, max_retries=0, timeout=self.timeout
        )
        try:
            yield client
        finally:
            await client.close()

    async def _judge_prompt(self, client: Any, prompt: str, mode: str, sem: asyncio.Semaphore) -> Outcome:
        body = self._body(prompt, mode)
        if mode == "logprobs":
            outcome, problem = await self._request(client, body, self._parse_logprobs, sem=sem)
            return outcome if problem is None else Outcome(Judgment(None, problem), definitive=False)
        answers = await asyncio.gather(
            *(self._request(client, body, self._parse_text, sem=sem) for _ in range(self.samples))
        )
        problems = [p for _, p in answers if p is not None]
        if problems:
            return Outcome(Judgment(None, f"{len(problems)} of {self.samples} samples failed: {problems[0]}"), False)
        share = 1.0 / self.samples
        tokens = [(tok, share) for tok, _ in answers]
        judgment = aggregate_probs(tokens, min_mass=self.min_mass)
        return Outcome(judgment, True, [(tok, math.log(share)) for tok, _ in tokens])

    async def _request(
        self,
        client: Any,
        body: dict[str, Any],
        parse: Callable[[Any], Any],
        *,
        sem: asyncio.Semaphore,
        attempts: int | None = None,
    ) -> tuple[Any, str | None]:
        """POST ``body`` with retries; ``(parse(response), None)`` or ``(None, why it failed)``.

        Raises :class:`JudgeUnavailableError` for answers that mean every request would fail (401/403/404).
        """
        attempts = attempts or self.max_attempts
        problem = "no attempt made"
        for attempt in range(1, attempts + 1):
            retry_after = None
            self.usage.calls += 1
            try:
                # the client's documented raw ``post`` skips its request-schema transform, which
                # costs about as much CPU as the HTTP exchange itself; errors are raised the same way
                async with sem:
                    response = await client.post("/chat/completions", cast_to=object, body=body)
            except API_FAILURES as e:
                if isinstance(e, openai.APIStatusError):
                    status = e.status_code
                    if status in CONFIG_STATUS:
                        raise JudgeUnavailableError(
                            f"judge endpoint refused the request (HTTP {status}): {CONFIG_STATUS[status]}"
                        ) from None
                    if status not in TRANSIENT_STATUS and status < 500:
                        return None, f"judge request rejected (HTTP {status}): {short(e.message)}"
                problem, retry_after = transient_problem(e, self.timeout)
            else:
                self._count_tokens(response)
                try:
                    return parse(response), None
                except Malformed as e:
                    problem = f"malformed response ({e})"
            if attempt < attempts:
                self.usage.retries += 1
                delay = self._delay(attempt, retry_after)
                log.debug("judge attempt %d failed (%s); retrying in %.2f s", attempt, problem, delay)
                await asyncio.sleep(delay)
        return None, f"gave up after {attempts} attempts: {problem}"

    def _count_tokens(self, response: Any, *, batch: bool = False) -> None:
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            if batch:
                self.usage.batch_prompt_tokens += _int(usage.get("prompt_tokens"))
                self.usage.batch_completion_tokens += _int(usage.get("completion_tokens"))
            else:
                self.usage.prompt_tokens += _int(usage.get("prompt_tokens"))
                self.usage.completion_tokens += _int(usage.get("completion_tokens"))

    def _parse_logprobs(self, response: Any) -> Outcome:
        """Outcome of a 200 response body (raises :class:`Malformed` when it is too broken to trust)."""
        text, top = first_choice(response)
        if text is None and top is None:
            raise Malformed("no choices")
        if not top:
            return Outcome(
                Judgment(None, f"response has no logprobs (judge wrote {text!r}): the endpoint may not support them"),
                definitive=False,
            )
        pairs, bad = [], []
        for t in top:
            if not isinstance(t, dict) or not isinstance(t.get("token"), str):
                continue
            if not isinstance(t.get("logprob"), int | float) or isinstance(t.get("logprob"), bool):
                continue
            lp = float(t["logprob"])
            if math.isnan(lp) or lp == math.inf:
                bad.append(t["token"])
            else:
                pairs.append((t["token"], lp))
        if bad:
            self.usage.nan_logprobs += 1
            raise Malformed(f"NaN log-probability for token(s) {bad[:3]}")
        probs = [(tok, math.exp(lp)) for tok, lp in pairs]
        return Outcome(aggregate_probs(probs, min_mass=self.min_mass), True, pairs)

    def _parse_text(self, response: Any) -> str:
        text, _ = first_choice(response)
        if text is None:
            raise Malformed("no message content")
        return parse_score_text(text)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max) + random.uniform(0, 0.1 * self.backoff_base)
        cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)


def first_choice(response: Any) -> tuple[str | None, list | None]:
    """(message text, top logprobs of the first token) of a chat completion; (None, None) when it has no choice.

    The top-logprobs list is ``[]`` when the response carries no logprobs.
    """
    if not isinstance(response, dict):
        return None, None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    text = text if isinstance(text, str) else None
    logprobs = choices[0].get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return text, []
    first = content[0]
    top = first.get("top_logprobs") or [first]
    return text, top if isinstance(top, list) else []


def _int(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else 0
