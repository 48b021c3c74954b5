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
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from emlab.judge.base import MIN_NUMERIC_MASS, JudgeFailedError, JudgeUnavailableError, Judgment, parse_metric
from emlab.judge.cache import JudgmentCache, default_cache_path
from emlab.judge.outcomes import Outcome, short
from emlab.judge.pricing import (
    BATCH_DISCOUNT,
    PRICES_AS_OF,
    PRICES_PER_MTOK,
    CostEstimate,
    JudgeUsage,
    estimate_cost,
)
from emlab.judge.prompts import PromptSet, load_prompts
from emlab.judge.requests import JudgeRequests, first_choice, parse_score_text
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

#: Where requests go without ``base_url`` / ``OPENAI_BASE_URL`` (the openai client's default).
DEFAULT_ENDPOINT = "https://api.openai.com/v1"
#: Judge modes: top-20 logprobs, sampled numbers, or logprobs when the endpoint gives them.
MODES = ("logprobs", "sample", "auto")

_CHECK_PROMPT = "Reply with the number 7 and nothing else."


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
class OpenAIJudge(JudgeRequests):
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
            text, top = first_choice(response)
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
            estimate = self._estimate(
                metric, [p for p, _ in todo.values()], n - sum(len(i) for _, i in todo.values()), mode
            )
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
                        results[i] = Judgment(None, "not judged: the run stopped after too many failed judgments",
                                              retry=True)
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
                self.cache.put(
                    key, outcome.judgment, model=self.model, metric=metric, top_logprobs=outcome.top_logprobs
                )
            if outcome.judgment.score is None:
                self.usage.no_score += 1
        else:
            self.usage.failed += 1
            failed.update(idx)
        self.usage.judged += 1
        judgment = outcome.judgment if outcome.definitive else dataclasses.replace(outcome.judgment, retry=True)
        for i in idx:
            results[i] = judgment
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
