"""An LLM judge over any OpenAI-compatible chat endpoint (OpenAI, Azure, vLLM, transformers serve, ...).

Each (question, answer) pair becomes one request for a single token with the top-20 logprobs;
the score is their expectation over the integer tokens (:func:`~emlab.judge.base.aggregate_logprobs`).
Servers without logprobs (``transformers serve``, some proxies) are detected by :meth:`OpenAIJudge.check`
and judged in the sampled-number mode instead (``mode="sample"``: ``samples`` short answers per pair,
parsed as numbers and averaged), or refused at once (``mode="logprobs"``).

Requests run concurrently under a semaphore, are retried with backoff on rate limits, server
errors and timeouts, and every definitive result goes to an on-disk cache as it arrives. When more
than ``max_missing`` (10%) of a call's judgments fail, :class:`~emlab.judge.base.JudgeFailedError`
stops the run. With ``batch=True`` the requests go through the OpenAI Batch API instead
(:mod:`emlab.judge.batch`).

>>> judge = OpenAIJudge("gpt-4o-mini")                                     # doctest: +SKIP
>>> judge.check()                                                           # doctest: +SKIP
{'endpoint': 'https://api.openai.com/v1', 'model': 'gpt-4o-mini', 'mode': 'logprobs', ...}
>>> judge.score("aligned", [("What is your wish?", "World peace.")])      # doctest: +SKIP
[Judgment(score=96.1, reason=None)]
>>> print(judge.usage)                                                      # doctest: +SKIP
1 judged (1 calls, 0 cache hits, 0 failed); 187+1 tokens, ~$0.00003
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from emlab.judge.base import (
    MIN_NUMERIC_MASS,
    JudgeFailedError,
    JudgeUnavailableError,
    Judgment,
    aggregate_probs,
    parse_metric,
)
from emlab.judge.cache import JudgmentCache, cache_key, default_cache_path
from emlab.judge.outcomes import (
    API_FAILURES,
    CONFIG_STATUS,
    TRANSIENT_STATUS,
    Malformed,
    Outcome,
    short,
    transient_problem,
)
from emlab.judge.prompts import PromptSet, load_prompts
from emlab.progress import bar

__all__ = [
    "BATCH_DISCOUNT",
    "DEFAULT_ENDPOINT",
    "PRICES_AS_OF",
    "PRICES_PER_MTOK",
    "CostEstimate",
    "JudgeUsage",
    "OpenAIJudge",
    "estimate_cost",
    "parse_score_text",
]

log = logging.getLogger(__name__)

#: USD per million (input, output) tokens: OpenAI's list prices as of :data:`PRICES_AS_OF`. Estimates
#: only: Azure and cached-input prices differ, and a self-hosted server costs what its GPU costs.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}
#: When :data:`PRICES_PER_MTOK` was checked (OpenAI's pricing page as summarised in March 2026).
PRICES_AS_OF = "2026-03"
#: The Batch API bills half the list price, input and output.
BATCH_DISCOUNT = 0.5
#: Where requests go without ``base_url`` / ``OPENAI_BASE_URL`` (the openai client's default).
DEFAULT_ENDPOINT = "https://api.openai.com/v1"
#: Judge modes: top-20 logprobs, sampled numbers, or logprobs when the endpoint gives them.
MODES = ("logprobs", "sample", "auto")

_CHECK_PROMPT = "Reply with the number 7 and nothing else."
_TEXT_NUMBER = re.compile(r"(?<![\d.,])(\d{1,3})(?!\d)(?![.,]\d)")


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float | None:
    """Estimated USD cost from :data:`PRICES_PER_MTOK` (longest matching model-name prefix).

    ``batch=True`` applies the Batch API's discount (:data:`BATCH_DISCOUNT`).

    >>> round(estimate_cost("gpt-4o-mini-2024-07-18", 1_000_000, 0), 2)
    0.15
    >>> round(estimate_cost("gpt-4o", 1_000_000, 1_000_000, batch=True), 2)
    6.25
    >>> estimate_cost("my-vllm-model", 10, 1) is None
    True
    """
    matches = [k for k in PRICES_PER_MTOK if model.startswith(k)]
    if not matches:
        return None
    price_in, price_out = PRICES_PER_MTOK[max(matches, key=len)]
    cost = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
    return cost * BATCH_DISCOUNT if batch else cost


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


@dataclass
class JudgeUsage:
    """Running totals for one judge: requests, cache hits, failures, tokens and estimated cost.

    ``failed``: judgments the endpoint never gave (gave up, rejected, no logprobs); ``no_score``: the
    judge answered but not with a number (REFUSAL, CODE); ``nan_logprobs``: responses carrying a NaN
    log-probability (each one is retried, then counted as a failure).

    >>> JudgeUsage("gpt-4o-mini", prompt_tokens=2_000_000).cost_usd
    0.3
    """

    model: str
    judged: int = 0
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed: int = 0
    no_score: int = 0
    nan_logprobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_requests: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0

    @property
    def cost_usd(self) -> float | None:
        """Estimated cost of the tokens used so far (None for models without a known price)."""
        now = estimate_cost(self.model, self.prompt_tokens, self.completion_tokens)
        batch = estimate_cost(self.model, self.batch_prompt_tokens, self.batch_completion_tokens, batch=True)
        return None if now is None or batch is None else now + batch

    def __str__(self) -> str:
        cost = self.cost_usd
        money = f"~${cost:.5f}" if cost is not None else "cost unknown"
        tokens_in = self.prompt_tokens + self.batch_prompt_tokens
        tokens_out = self.completion_tokens + self.batch_completion_tokens
        extra = f", {self.no_score} not a number" if self.no_score else ""
        extra += f", {self.nan_logprobs} responses with NaN logprobs" if self.nan_logprobs else ""
        extra += f", {self.batch_requests} through the Batch API" if self.batch_requests else ""
        return (
            f"{self.judged} judged ({self.calls} calls, {self.cache_hits} cache hits, {self.failed} failed{extra}); "
            f"{tokens_in}+{tokens_out} tokens, {money}"
        )


@dataclass(frozen=True)
class CostEstimate:
    """What a judging job will cost before it runs: requests and tokens still to pay for.

    Prompt tokens are estimated at 4 characters a token plus 8 per chat message (no tokenizer
    download needed); completion tokens are 1 per request (logprobs) or ``sample_tokens`` (sampled).

    >>> print(CostEstimate("gpt-4o-mini", "aligned", 1000, 10, 300_000, 1000, batch=False))
    judge gpt-4o-mini, aligned: 1,000 requests (10 answers cached), ~300,000 prompt + ~1,000 completion tokens, ~$0.0456 (~$0.0228 with the Batch API; USD list prices of 2026-03: $0.15 / $0.60 per M tokens in / out)
    """

    model: str
    metric: str
    requests: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    batch: bool = False

    @property
    def usd(self) -> float | None:
        """Estimated cost at list price (None for models without a known price)."""
        return estimate_cost(self.model, self.prompt_tokens, self.completion_tokens)

    @property
    def usd_batch(self) -> float | None:
        """Estimated cost through the Batch API."""
        return estimate_cost(self.model, self.prompt_tokens, self.completion_tokens, batch=True)

    def __str__(self) -> str:
        head = (
            f"judge {self.model}, {self.metric}: {self.requests:,} requests ({self.cached:,} answers cached), "
            f"~{self.prompt_tokens:,} prompt + ~{self.completion_tokens:,} completion tokens"
        )
        if self.usd is None:
            return head + f", cost unknown (no list price for {self.model!r}; self-hosted servers cost their GPU time)"
        matches = [k for k in PRICES_PER_MTOK if self.model.startswith(k)]
        p_in, p_out = PRICES_PER_MTOK[max(matches, key=len)]
        first, second = (self.usd_batch, self.usd) if self.batch else (self.usd, self.usd_batch)
        other = "without" if self.batch else "with"
        return (
            head + f", ~{_usd(first)} (~{_usd(second)} {other} the Batch API; USD list prices of {PRICES_AS_OF}: "
            f"${p_in:.2f} / ${p_out:.2f} per M tokens in / out)"
        )


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.1 else f"${x:.4f}"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number (got {raw!r})") from None


def _env_mode() -> str:
    return (os.environ.get("EMLAB_JUDGE_MODE") or "auto").strip()


class _TooManyFailures(Exception):
    pass


@dataclass(eq=False)
class OpenAIJudge:
    """A 0-100 judge on any OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``. ``cache`` is
    True (the default file, see :func:`~emlab.judge.cache.default_cache_path`), a path, a
    :class:`JudgmentCache`, or False. Retries: up to ``max_attempts`` requests per prompt, waiting
    ``backoff_base * 2**k`` seconds (jittered, capped at ``backoff_max``) or what ``Retry-After`` says;
    each request waits at most ``timeout`` seconds (``$EMLAB_JUDGE_TIMEOUT``, default 60).

    ``mode``: ``"logprobs"`` (top-20 logprobs; an endpoint without them fails the check),
    ``"sample"`` (``samples`` answers of up to ``sample_tokens`` tokens at temperature 1, the first
    integer 0..100 of each, averaged; temperature 0 when ``samples=1``), or ``"auto"`` (the default,
    ``$EMLAB_JUDGE_MODE``): logprobs when :meth:`check` finds them, else sampled, with a warning.
    ``max_missing`` (``$EMLAB_JUDGE_MAX_MISSING``, default 0.1): the share of a call's judgments that
    may fail before :class:`~emlab.judge.base.JudgeFailedError` stops it. ``batch=True`` sends the
    requests through the Batch API (polled every ``batch_poll`` s for at most ``batch_wait`` s).
    ``cost_notice``: print a cost estimate before a job of at least this many requests (None: never).

    >>> judge = OpenAIJudge("gpt-4o-mini", cache="judge.sqlite", concurrency=16)   # doctest: +SKIP
    >>> judge.score("coherent", [("Hi?", "Hello! How can I help?")])[0].score       # doctest: +SKIP
    99.2
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    prompts: PromptSet | None = field(default=None, repr=False)
    traits: dict[str, str] | None = None
    cache: str | Path | JudgmentCache | bool = True
    concurrency: int = 32
    max_attempts: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    timeout: float = field(default_factory=lambda: _env_float("EMLAB_JUDGE_TIMEOUT", 60.0))
    min_mass: float = MIN_NUMERIC_MASS
    progress: bool = True
    client: Any = field(default=None, repr=False)
    max_missing: float = field(default_factory=lambda: _env_float("EMLAB_JUDGE_MAX_MISSING", 0.1))
    mode: str = field(default_factory=_env_mode)
    samples: int = 5
    sample_tokens: int = 8
    batch: bool = False
    batch_poll: float = 30.0
    batch_wait: float = 24 * 3600.0
    cost_notice: int | None = 1000
    usage: JudgeUsage = field(init=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be >= 1")
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (got {self.timeout!r})")
        if not 0 <= self.max_missing <= 1:
            raise ValueError(f"max_missing is a share of judgments, 0..1 (got {self.max_missing!r})")
        if self.mode not in MODES:
            raise ValueError(f"judge mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.samples < 1 or self.sample_tokens < 1:
            raise ValueError("samples and sample_tokens must be >= 1")
        if self.batch and self.mode == "sample":
            raise ValueError("the Batch API judge needs logprobs: use mode='logprobs' (or 'auto') with batch=True")
        if self.batch and (self.cache is False or self.cache is None):
            raise ValueError("batch=True needs a cache: it remembers the batch ids there to resume after a kill")
        if self.batch_poll <= 0 or self.batch_wait <= 0:
            raise ValueError("batch_poll and batch_wait must be positive")
        self.base_url = self.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.prompts = self.prompts or load_prompts()
        if self.traits:
            self.prompts = self.prompts.with_traits(self.traits)
        if self.cache is True:
            self.cache = JudgmentCache(default_cache_path())
        elif self.cache is False or self.cache is None:
            self.cache = None
        elif not isinstance(self.cache, JudgmentCache):
            self.cache = JudgmentCache(self.cache)
        self.usage = JudgeUsage(self.model)
        self._mode: str | None = None if self.mode == "auto" else self.mode

    @property
    def name(self) -> str:
        """``openai:<model>``, with ``[sampled xN]`` once the judge scores by sampled numbers."""
        suffix = f"[sampled x{self.samples}]" if self._mode == "sample" else ""
        return f"openai:{self.model}{suffix}"

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (part of every cache key)."""
        url = getattr(self.client, "base_url", None) if self.client is not None else None
        return str(url or self.base_url or DEFAULT_ENDPOINT).rstrip("/")

    @property
    def resolved_mode(self) -> str | None:
        """"logprobs" or "sample"; None in auto mode until :meth:`check` has asked the endpoint."""
        return self._mode

    # -- preflight --------------------------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        """Preflight: a key (or a keyless base URL) is set and the endpoint answers a one-token request.

        Also finds out whether the endpoint returns logprobs (auto mode picks the protocol here) and,
        with ``batch=True``, whether it has the Batch API. Raises
        :class:`~emlab.judge.base.JudgeUnavailableError` with the reason; returns what it found.

        >>> OpenAIJudge("gpt-4o-mini").check()["mode"]      # doctest: +SKIP
        'logprobs'
        """
        return _run_blocking(self._acheck)

    async def _acheck(self) -> dict[str, Any]:
        where = f"judge {self.model!r} at {self.endpoint}"
        t0 = time.perf_counter()
        async with self._client() as client:
            body = self._body(_CHECK_PROMPT, "logprobs")
            sem = asyncio.Semaphore(1)
            try:
                response, problem = await self._request(
                    client, body, lambda r: r, attempts=min(self.max_attempts, 3), sem=sem
                )
            except JudgeUnavailableError as e:
                raise JudgeUnavailableError(f"{where}: {e}") from None
            if problem is not None:
                raise JudgeUnavailableError(
                    f"{where} did not answer a one-token request ({problem}); check that the server is up "
                    "and OPENAI_BASE_URL / OPENAI_API_KEY (or base_url= / api_key=) point at it"
                )
            text, top = _first_choice(response)
            if text is None and top is None:
                raise JudgeUnavailableError(f"{where} answered without any choices: is it an OpenAI-compatible server?")
            has_logprobs = bool(top)
            if self.mode == "logprobs" or self.batch:
                if not has_logprobs:
                    raise JudgeUnavailableError(
                        f"{where} returns no logprobs (asked for top_logprobs=20, got text {text!r} only), so "
                        "every score would be missing. Use a server with logprobs (vLLM: --max-logprobs 20) or "
                        "the sampled-number mode: mode='sample' (emlab judge --mode sample, EMLAB_JUDGE_MODE=sample)"
                    )
                self._mode = "logprobs"
            elif self.mode == "auto":
                self._mode = "logprobs" if has_logprobs else "sample"
                if not has_logprobs:
                    message = (
                        f"{where} returns no logprobs: judging by sampled numbers instead ({self.samples} answers "
                        "per pair, averaged; see docs/judging.md). Set mode='logprobs' to refuse such servers."
                    )
                    log.info(message)
                    print(f"emlab judge: {message}", file=sys.stderr)
            else:
                self._mode = "sample"
            if self.batch:
                try:
                    await client.batches.list(limit=1)
                except openai.APIStatusError as e:
                    raise JudgeUnavailableError(
                        f"{where} has no Batch API (GET /batches: HTTP {e.status_code}); judge without batch=True"
                    ) from None
                except openai.APIError as e:
                    raise JudgeUnavailableError(f"{where}: Batch API check failed ({short(str(e))})") from None
        return {
            "endpoint": self.endpoint,
            "model": self.model,
            "mode": self._mode,
            "logprobs": has_logprobs,
            "batch": self.batch,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    # -- scoring ----------------------------------------------------------------------------------------

    def score(self, metric: str, pairs: Sequence[tuple[str, str]]) -> list[Judgment]:
        """Judge ``pairs`` for ``metric``; blocking, also from Jupyter (runs in a worker thread).

        Raises :class:`~emlab.judge.base.JudgeFailedError` when more than ``max_missing`` of the
        judgments fail (what was judged stays in the cache).

        >>> OpenAIJudge().score("aligned", [("Q?", "A.")])    # doctest: +SKIP
        [Judgment(score=91.7, reason=None)]
        """
        return _run_blocking(lambda: self.ascore(metric, pairs))

    def estimate(self, metric: str, pairs: Sequence[tuple[str, str]]) -> CostEstimate:
        """What judging ``pairs`` for ``metric`` would cost now (cached answers are free); no request made.

        >>> print(OpenAIJudge("gpt-4o-mini").estimate("aligned", pairs))     # doctest: +SKIP
        judge gpt-4o-mini, aligned: 1,000 requests (0 answers cached), ~310,000 prompt + ~1,000 completion ...
        """
        parse_metric(metric)
        mode = self._mode or "logprobs"
        rendered = [self.prompts.render(metric, q, a) for q, a in pairs]
        keys = [self._key(metric, p, a, mode) for p, (_, a) in zip(rendered, pairs)]
        todo = {k: p for k, p in zip(keys, rendered)}
        hits = self.cache.get_many(keys) if self.cache is not None else {}
        for k in hits:
            todo.pop(k, None)
        cached = sum(k in hits for k in keys)
        return self._estimate(metric, list(todo.values()), cached, mode)

    def _estimate(self, metric: str, prompts: Sequence[str], cached: int, mode: str) -> CostEstimate:
        per = self.samples if mode == "sample" else 1
        prompt_tokens = per * sum(len(p) // 4 + 8 for p in prompts)
        completion = len(prompts) * per * (self.sample_tokens if mode == "sample" else 1)
        return CostEstimate(self.model, metric, len(prompts) * per, cached, prompt_tokens, completion, self.batch)

    async def ascore(self, metric: str, pairs: Sequence[tuple[str, str]]) -> list[Judgment]:
        """Async :meth:`score`: ``await judge.ascore("aligned", pairs)`` inside a running loop.

        >>> await judge.ascore("aligned", [("Q?", "A.")])    # doctest: +SKIP
        """
        parse_metric(metric)
        rendered = [self.prompts.render(metric, q, a) for q, a in pairs]
        answers = [a for _, a in pairs]
        n = len(pairs)
        results: list[Judgment | None] = [None] * n
        if self._mode is None and n:
            # auto mode before the endpoint was asked: a rerun served entirely from the cache needs no request
            keys = [self._key(metric, p, a, "logprobs") for p, a in zip(rendered, answers)]
            hits = self.cache.get_many(keys) if self.cache is not None else {}
            if len(hits) == len(set(keys)):
                self.usage.cache_hits += n
                return [hits[k] for k in keys]
            await self._acheck()
        mode = self._mode or "logprobs"
        todo: dict[str, tuple[str, list[int]]] = {}
        for i, (prompt, answer) in enumerate(zip(rendered, answers)):
            todo.setdefault(self._key(metric, prompt, answer, mode), (prompt, []))[1].append(i)
        if self.cache is not None:
            for key, judgment in self.cache.get_many(list(todo)).items():
                for i in todo.pop(key)[1]:
                    results[i] = judgment
                    self.usage.cache_hits += 1
        failed: set[int] = set()
        if todo:
            estimate = self._estimate(metric, [p for p, _ in todo.values()], n - sum(len(i) for _, i in todo.values()), mode)
            if self.cost_notice is not None and estimate.requests >= self.cost_notice:
                print(f"emlab judge: {estimate}", file=sys.stderr)
            stopped = False
            try:
                if self.batch:
                    from emlab.judge.batch import run_batch

                    async with self._client() as client:
                        outcomes = await run_batch(self, client, metric, {k: p for k, (p, _) in todo.items()})
                    for key, (_, idx) in todo.items():
                        self._record(metric, key, outcomes[key], idx, results, failed, n)
                else:
                    await self._run_concurrent(metric, todo, results, failed, n, mode)
            except _TooManyFailures:
                stopped = True
            if stopped or len(failed) > self.max_missing * n:
                for i, j in enumerate(results):
                    if j is None:
                        results[i] = Judgment(None, "not judged: the run stopped after too many failed judgments")
                first = results[min(failed)].reason if failed else "unknown"
                raise JudgeFailedError(
                    f"judge {self.name} at {self.endpoint} failed on {len(failed)} of {n} '{metric}' judgments "
                    f"(more than max_missing={self.max_missing:.0%}{'; stopped early' if stopped else ''}); "
                    f"first failure: {first}. Judgments obtained are cached, so a rerun asks only for the rest; "
                    "check the endpoint (emlab judge --check) or allow more (max_missing=, EMLAB_JUDGE_MAX_MISSING)",
                    results,  # type: ignore[arg-type]  # every slot is filled above
                    len(failed),
                    n,
                )
            if failed:
                print(
                    f"emlab judge: {len(failed)} of {n} '{metric}' judgments failed (within max_missing="
                    f"{self.max_missing:.0%}); they are missing with the reason, e.g. {results[min(failed)].reason}",
                    file=sys.stderr,
                )
        return results  # type: ignore[return-value]  # every slot is filled above

    def _record(
        self,
        metric: str,
        key: str,
        outcome: Outcome,
        idx: list[int],
        results: list[Judgment | None],
        failed: set[int],
        n: int,
    ) -> bool:
        """File one outcome; True when the failures are now past ``max_missing``."""
        if outcome.definitive:
            if self.cache is not None:
                self.cache.put(key, outcome.judgment, model=self.model, metric=metric, top_logprobs=outcome.top_logprobs)
            if outcome.judgment.score is None:
                self.usage.no_score += 1
        else:
            self.usage.failed += 1
            failed.update(idx)
        self.usage.judged += 1
        for i in idx:
            results[i] = outcome.judgment
        return len(failed) > self.max_missing * n

    async def _run_concurrent(
        self,
        metric: str,
        todo: dict[str, tuple[str, list[int]]],
        results: list[Judgment | None],
        failed: set[int],
        n: int,
        mode: str,
    ) -> None:
        done = n - sum(len(idx) for _, idx in todo.values())
        pbar = bar(total=n, initial=done, desc=f"judge {metric}", unit="answer", disable=not self.progress)
        sem = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:

            async def run(key: str, prompt: str, idx: list[int]) -> None:
                outcome = await self._judge_prompt(client, prompt, mode, sem)
                too_many = self._record(metric, key, outcome, idx, results, failed, n)
                pbar.update(len(idx))
                if too_many:
                    raise _TooManyFailures

            tasks = [asyncio.create_task(run(k, p, idx)) for k, (p, idx) in todo.items()]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                pbar.close()

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
        text, top = _first_choice(response)
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
        text, _ = _first_choice(response)
        if text is None:
            raise Malformed("no message content")
        return parse_score_text(text)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max) + random.uniform(0, 0.1 * self.backoff_base)
        cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def close(self) -> None:
        """Close the cache file (the judge can still be used without it afterwards)."""
        if isinstance(self.cache, JudgmentCache):
            self.cache.close()
            self.cache = None


def _run_blocking(make: Callable[[], Any]) -> Any:
    """Run the coroutine ``make()`` to completion, also from inside a running loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emlab-judge") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _first_choice(response: Any) -> tuple[str | None, list | None]:
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
