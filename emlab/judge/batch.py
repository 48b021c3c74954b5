"""Judging through the OpenAI Batch API: upload a JSONL of requests, poll, download, cache; resumable.

The Batch API answers within 24 hours at half the list price, which suits paper-scale judging
(tens of thousands of answers). :class:`~emlab.judge.llm.OpenAIJudge` uses it with ``batch=True``:

1. answers already in the cache cost nothing;
2. answers that a batch submitted earlier will answer (its id is remembered in the cache file) are
   waited for, not resubmitted, so a run killed while waiting resumes where it stopped;
3. the rest is uploaded (``POST /files``, purpose ``batch``; at most 50,000 requests or 150 MB a
   batch) and submitted (``POST /batches``), and the batch id recorded at once;
4. every batch is polled (``GET /batches/{id}``) every ``batch_poll`` seconds until it ends or
   ``batch_wait`` runs out (then :class:`~emlab.judge.base.JudgeBatchPendingError`: rerun to resume);
5. the output and error files are downloaded (``GET /files/{id}/content``), each line parsed like a
   direct response, definitive judgments cached.

>>> judge = OpenAIJudge("gpt-4o-mini", batch=True, batch_poll=60)     # doctest: +SKIP
>>> judge.score("aligned", pairs)                                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import openai

from emlab.judge.base import JudgeBatchPendingError, JudgeError, JudgeUnavailableError, Judgment
from emlab.judge.outcomes import (
    API_FAILURES,
    CONFIG_STATUS,
    TRANSIENT_STATUS,
    Malformed,
    Outcome,
    short,
    transient_problem,
)

if TYPE_CHECKING:
    from emlab.judge.llm import OpenAIJudge

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_REQUESTS", "TERMINAL", "run_batch"]

log = logging.getLogger(__name__)

#: OpenAI's limit on requests in one batch.
MAX_BATCH_REQUESTS = 50_000
#: Stay well under OpenAI's 200 MB limit on a batch input file.
MAX_BATCH_BYTES = 150_000_000
#: Batch statuses after which nothing changes any more.
TERMINAL = ("completed", "failed", "expired", "cancelled")
_CHAT_URL = "/v1/chat/completions"


async def run_batch(judge: OpenAIJudge, client: Any, metric: str, todo: dict[str, str]) -> dict[str, Outcome]:
    """Judge the prompts ``todo`` (cache key -> rendered prompt) through the Batch API.

    Returns an outcome for every key (a failure with the reason when the batch gave none).
    """

    cache = judge.cache
    if cache is None:
        raise JudgeError("the Batch API judge needs a cache: it remembers batch ids there to resume after a kill")
    endpoint = judge.endpoint
    pending = cache.pending_batches(endpoint)
    resume = [b for b, keys in pending.items() if not todo.keys().isdisjoint(keys)]
    covered = {k for b in resume for k in pending[b]}
    if resume:
        print(f"emlab judge: resuming batch {', '.join(resume)} (submitted earlier)", file=sys.stderr)
    submitted = []
    for chunk in _chunks(judge, [k for k in todo if k not in covered], todo):
        submitted.append(await _submit(judge, client, metric, chunk))
    finished = await _wait(judge, client, resume + submitted)
    outcomes: dict[str, Outcome] = {}
    for batch_id, batch in finished.items():
        got = await _collect(judge, client, batch)
        keys = pending.get(batch_id) or cache.pending_batches(endpoint).get(batch_id, [])
        why = _batch_errors(batch)
        for key in keys:
            outcome = got.get(key) or Outcome(
                Judgment(None, f"batch {batch_id} ended '{batch.status}' without a result for this request{why}"),
                definitive=False,
            )
            if key in todo:
                outcomes[key] = outcome
            elif outcome.definitive:  # a resumed batch also answered prompts not asked for now: keep them
                cache.put(key, outcome.judgment, model=judge.model, metric=metric, top_logprobs=outcome.top_logprobs)
        cache.finish_batch(batch_id, batch.status)
    for key in todo:
        outcomes.setdefault(key, Outcome(Judgment(None, "no batch answered this request"), definitive=False))
    return outcomes


def _chunks(judge: OpenAIJudge, keys: list[str], todo: dict[str, str]) -> list[dict[str, bytes]]:
    """The request lines of each batch to submit (key -> JSONL line), within the Batch API's limits."""
    chunks: list[dict[str, bytes]] = []
    current: dict[str, bytes] = {}
    size = 0
    for key in keys:
        line = {"custom_id": key, "method": "POST", "url": _CHAT_URL, "body": judge._body(todo[key], "logprobs")}
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        if current and (len(current) >= MAX_BATCH_REQUESTS or size + len(data) > MAX_BATCH_BYTES):
            chunks.append(current)
            current, size = {}, 0
        current[key] = data
        size += len(data)
    if current:
        chunks.append(current)
    return chunks


async def _submit(judge: OpenAIJudge, client: Any, metric: str, chunk: dict[str, bytes]) -> str:
    data = b"".join(chunk.values())
    upload = await _retry(
        judge,
        "upload the batch input",
        lambda: client.files.create(file=("emlab-judge.jsonl", data, "application/jsonl"), purpose="batch"),
    )
    batch = await _retry(
        judge,
        "create the batch",
        lambda: client.batches.create(
            input_file_id=upload.id,
            endpoint=_CHAT_URL,
            completion_window="24h",
            metadata={"emlab": f"judge {judge.model} {metric}"[:512]},
        ),
    )
    judge.cache.add_batch(batch.id, endpoint=judge.endpoint, model=judge.model, metric=metric, keys=list(chunk))
    judge.usage.batch_requests += len(chunk)
    print(
        f"emlab judge: submitted batch {batch.id} ({len(chunk):,} requests); its id is kept in "
        f"{judge.cache.path}, so a rerun after a kill waits for it instead of resubmitting",
        file=sys.stderr,
    )
    return batch.id


async def _wait(judge: OpenAIJudge, client: Any, ids: list[str]) -> dict[str, Any]:
    deadline = time.monotonic() + judge.batch_wait
    finished: dict[str, Any] = {}
    status: dict[str, str] = {}
    remaining = list(ids)
    while True:
        for batch_id in list(remaining):
            batch = await _retry(judge, f"poll batch {batch_id}", lambda b=batch_id: client.batches.retrieve(b))
            if batch.status != status.get(batch_id):
                counts = getattr(batch, "request_counts", None)
                done = f" ({counts.completed}/{counts.total} done)" if counts is not None and counts.total else ""
                print(f"emlab judge: batch {batch_id}: {batch.status}{done}", file=sys.stderr)
            status[batch_id] = batch.status
            if batch.status in TERMINAL:
                finished[batch_id] = batch
                remaining.remove(batch_id)
        if not remaining:
            return finished
        left = deadline - time.monotonic()
        if left <= 0:
            states = ", ".join(f"{b} ({status[b]})" for b in remaining)
            raise JudgeBatchPendingError(
                f"batch {states} not finished after waiting {judge.batch_wait:g} s (batch_wait); the ids are kept "
                f"in {judge.cache.path}: rerun the same judging to resume waiting (nothing is resubmitted)",
                remaining,
            )
        log.info("waiting for batches: %s", status)
        await asyncio.sleep(min(judge.batch_poll, left))


async def _collect(judge: OpenAIJudge, client: Any, batch: Any) -> dict[str, Outcome]:
    """Outcomes by cache key from a finished batch's output and error files."""

    out: dict[str, Outcome] = {}
    for file_id in (getattr(batch, "output_file_id", None), getattr(batch, "error_file_id", None)):
        if not file_id:
            continue
        content = await _retry(judge, f"download {file_id}", lambda f=file_id: client.files.content(f))
        text = content.content.decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = row["custom_id"]
            except (ValueError, KeyError, TypeError):
                log.warning("batch %s file %s line %d: not a result line, skipped", batch.id, file_id, lineno)
                continue
            response = row.get("response") if isinstance(row.get("response"), dict) else {}
            body = response.get("body")
            if row.get("error") or response.get("status_code") != 200:
                error = row.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
                message = error.get("message") if isinstance(error, dict) else str(error)
                code = response.get("status_code")
                out[key] = Outcome(
                    Judgment(None, f"batch request failed (HTTP {code}): {short(str(message or 'no message'))}"),
                    definitive=False,
                )
                continue
            judge._count_tokens(body, batch=True)
            try:
                out[key] = judge._parse_logprobs(body)
            except Malformed as e:
                out[key] = Outcome(Judgment(None, f"malformed batch response ({e})"), definitive=False)
    return out


def _batch_errors(batch: Any) -> str:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    messages = [getattr(e, "message", None) or getattr(e, "code", None) for e in errors]
    messages = [m for m in messages if m]
    return f": {'; '.join(messages[:3])}" if messages else ""


async def _retry(judge: OpenAIJudge, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    """One Batch API call with the judge's retries on rate limits, server errors and timeouts."""

    problem = "no attempt made"
    for attempt in range(1, judge.max_attempts + 1):
        retry_after = None
        try:
            return await call()
        except API_FAILURES as e:
            if isinstance(e, openai.APIStatusError):
                if e.status_code in CONFIG_STATUS:
                    raise JudgeUnavailableError(
                        f"Batch API refused to {what} (HTTP {e.status_code}): {CONFIG_STATUS[e.status_code]}"
                    ) from None
                if e.status_code not in TRANSIENT_STATUS and e.status_code < 500:
                    raise JudgeError(
                        f"Batch API refused to {what} (HTTP {e.status_code}): {short(e.message)}"
                    ) from None
            problem, retry_after = transient_problem(e, judge.timeout)
        if attempt < judge.max_attempts:
            judge.usage.retries += 1
            await asyncio.sleep(judge._delay(attempt, retry_after))
    raise JudgeError(f"could not {what} after {judge.max_attempts} attempts: {problem}")
