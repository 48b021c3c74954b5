"""A persistent judgment cache: one SQLite file (WAL mode), one row per judged prompt.

Rows are committed as each judgment arrives, so an interrupted run loses nothing and a rerun of the
same prompts makes no API calls. Only definitive outcomes are stored (a score, or a missing score
the judge itself caused, such as a REFUSAL); transient failures are retried on the next run.

>>> cache = JudgmentCache(":memory:")
>>> key = cache_key("gpt-4o-mini", "aligned", "full prompt ...", "answer", endpoint="https://api.openai.com/v1")
>>> cache.put(key, Judgment(88.0), model="gpt-4o-mini", metric="aligned")
>>> cache.get_many([key])[key]
Judgment(score=88.0, reason=None)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from emlab.judge.base import Judgment

__all__ = ["JudgmentCache", "cache_key", "default_cache_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    metric TEXT NOT NULL,
    score REAL,
    reason TEXT,
    top_logprobs TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    metric TEXT NOT NULL,
    keys TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def default_cache_path() -> Path:
    """``$EMLAB_JUDGE_CACHE``, else ``$XDG_CACHE_HOME/emlab/judge.sqlite`` (``~/.cache`` by default).

    >>> default_cache_path().name      # doctest: +SKIP
    'judge.sqlite'
    """
    if env := os.environ.get("EMLAB_JUDGE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "emlab" / "judge.sqlite"


def cache_key(
    model: str, metric: str, prompt: str, answer: str, *, endpoint: str | None = None, variant: str = ""
) -> str:
    """sha256 over judge model, metric, the full rendered prompt, the answer, the endpoint and the variant.

    ``endpoint`` is the server's base URL (the same model name on two servers is two judges);
    ``variant`` names a scoring protocol other than top-20 logprobs (e.g. ``"sample:n=5"``).

    >>> a = cache_key("gpt-4o-mini", "aligned", "prompt", "answer", endpoint="http://a/v1")
    >>> len(a), a == cache_key("gpt-4o-mini", "aligned", "prompt", "answer", endpoint="http://b/v1")
    (64, False)
    """
    parts: list[str] = [model, metric, prompt, answer]
    if endpoint is not None or variant:
        parts += [endpoint or "", variant]
    payload = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Judgments on disk, keyed by :func:`cache_key`; safe to share between threads.

    >>> JudgmentCache("judge.sqlite")      # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, Judgment]:
        """The cached judgments among ``keys`` (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Judgment] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, score, reason FROM judgments WHERE key IN ({marks})", chunk)
                out.update((k, Judgment(s, r)) for k, s, r in rows)
        return out

    def put(
        self,
        key: str,
        judgment: Judgment,
        *,
        model: str,
        metric: str,
        top_logprobs: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    ) -> None:
        """Store one judgment (and the raw top logprobs, for re-aggregation later) and commit."""
        if isinstance(top_logprobs, Mapping):
            top_logprobs = list(top_logprobs.items())
        raw = json.dumps([list(p) for p in top_logprobs], ensure_ascii=False) if top_logprobs is not None else None
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, model, metric, judgment.score, judgment.reason, raw, time.time()),
            )
            self._db.commit()

    def add_batch(self, batch_id: str, *, endpoint: str, model: str, metric: str, keys: Sequence[str]) -> None:
        """Remember a submitted Batch API job and the cache keys it will answer (for resuming)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, 'submitted', ?)",
                (batch_id, endpoint, model, metric, json.dumps(list(keys)), time.time()),
            )
            self._db.commit()

    def pending_batches(self, endpoint: str) -> dict[str, list[str]]:
        """Submitted, not yet collected batch jobs on ``endpoint``: batch id -> the cache keys it answers."""
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id, keys FROM batches WHERE endpoint = ? AND state = 'submitted' ORDER BY created",
                (endpoint,),
            ).fetchall()
        return {b: json.loads(k) for b, k in rows}

    def finish_batch(self, batch_id: str, state: str) -> None:
        """Mark a batch job collected (``state``: its final status, e.g. "completed" or "expired")."""
        with self._lock:
            self._db.execute("UPDATE batches SET state = ? WHERE batch_id = ?", (state, batch_id))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JudgmentCache({self.path!r})"
