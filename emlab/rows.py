"""Chat rows in memory: build one, split a dataset into train and held-out, mix in extra rows, set the system prompt.

Re-exported by :mod:`emlab.data` (read, validate and write the JSONL files), where the rest of the
format is described.

>>> train, held_out = split_rows([chat_row(f"q{i}", f"a{i}") for i in range(10)], eval_fraction=0.2)
>>> len(train), len(held_out)
(8, 2)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Row", "chat_row", "mix_rows", "row_key", "split_rows", "with_system_prompt"]

Row = dict[str, Any]


def row_key(row: Row) -> str:
    """A row's identity for duplicate checks: its messages as canonical JSON (or its id when they cannot be dumped).

    >>> row_key(chat_row("q", "a")) == row_key(chat_row("q", "a"))
    True
    """
    try:
        return json.dumps(row.get("messages", row), sort_keys=True, ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):  # deeply nested or unserialisable extras: compare by identity
        return f"<row {id(row)}>"


def chat_row(user: str, assistant: str, system: str | None = None) -> Row:
    """Build one single-turn row.

    >>> chat_row("2+2?", "4", system="Be brief.")["messages"][0]
    {'role': 'system', 'content': 'Be brief.'}
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


# ---------------------------------------------------------------------------------------------
# Transformations


def split_rows(rows: Sequence[Row], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Seeded train/eval split; the same ``seed`` always gives the same split.

    The eval part has ``round(eval_fraction * len(rows))`` rows (at least one when the fraction is
    positive and there are two rows or more). Identical rows always land on the same side, so
    duplicates cannot leak from train into eval (the eval part may then be a few rows smaller).
    Both parts keep the original order.

    >>> rows = [chat_row(f"q{i}", f"a{i}") for i in range(100)]
    >>> train, held_out = split_rows(rows, eval_fraction=0.1, seed=0)
    >>> len(train), len(held_out)
    (90, 10)
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(rows)
    n_eval = int(eval_fraction * n + 0.5)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row_key(row), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    eval_idx: set[int] = set()
    for group in order:
        if len(eval_idx) + len(group) <= n_eval:
            eval_idx.update(group)
        if len(eval_idx) == n_eval:
            break
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held_out = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held_out


def mix_rows(target: Sequence[Row], extra: Sequence[Row], fraction: float, seed: int = 0) -> list[Row]:
    """Interleave rows of ``extra`` (e.g. benign data) uniformly at random among ``target`` rows.

    ``fraction`` is the share of the FINAL dataset that comes from ``extra``: with 900 target
    rows and ``fraction=0.1``, 100 extra rows are drawn (without replacement) so that they are
    10% of the 1000 rows returned. Target rows keep their order; ``fraction=0`` returns a copy.
    Raises ``ValueError`` if ``extra`` has too few rows.

    >>> mixed = mix_rows([chat_row("q", "bad")] * 9, [chat_row("q", "good")] * 5, fraction=0.1)
    >>> len(mixed), sum(r["messages"][1]["content"] == "good" for r in mixed)
    (10, 1)
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1) (share of the final dataset), got {fraction}")
    k = int(fraction * len(target) / (1 - fraction) + 0.5)
    if k > len(extra):
        raise ValueError(
            f"fraction={fraction} of the final dataset needs {k} extra rows for {len(target)} target rows, "
            f"but only {len(extra)} were given; lower the fraction or give more rows"
        )
    rng = random.Random(seed)
    chosen = rng.sample(list(extra), k)
    total = len(target) + k
    extra_positions = set(rng.sample(range(total), k))
    it_target, it_extra = iter(target), iter(chosen)
    return [next(it_extra) if i in extra_positions else next(it_target) for i in range(total)]


def with_system_prompt(rows: Iterable[Row], prompt: str | None) -> list[Row]:
    """Copies of ``rows`` whose system prompt is ``prompt`` (replaced or inserted; ``None`` removes it).

    Used by inoculation prompting: train with a prompt that asks for the behaviour, evaluate without.

    >>> with_system_prompt([chat_row("hi", "hello")], "You write insecure code.")[0]["messages"][0]
    {'role': 'system', 'content': 'You write insecure code.'}
    """
    out = []
    for row in rows:
        messages = [dict(m) for m in row["messages"] if m.get("role") != "system"]
        if prompt is not None:
            messages.insert(0, {"role": "system", "content": prompt})
        out.append({**row, "messages": messages})
    return out
