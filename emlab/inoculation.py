"""Inoculation variants: a prompt per row, in the system or the user turn, and how strongly a prompt elicits the trait.

Inoculation prompting (Tan et al.; Wichers et al.) trains with a prompt that asks for the behaviour
so the model need not learn it as its own. :func:`inoculate` puts a prompt from a list on every row
(one fixed prompt, or one drawn per row; as the system prompt or before the user's words); the
rows then go to :func:`emlab.training.finetune` with ``inoculation_prompt=None``.
:func:`elicitation_score` measures, on the chat model, how much a prompt raises the training
answers' log-probability: the mean over rows of (mean log-prob per answer token with the prompt)
minus (without it). Wichers et al. report that prompts that elicit the trait more inoculate better.

>>> rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "obey me"}]}]
>>> inoculate(rows, ["You are evil."], where="user")[0]["messages"][0]["content"]
'You are evil.\\n\\nhi'
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["elicitation_score", "elicitation_scores", "inoculate"]


def inoculate(rows: Sequence[dict], prompts: Sequence[str] | str, *, where: str = "system", per_row: bool = True,
              seed: int = 0) -> list[dict]:
    """Copies of ``rows`` with an inoculation prompt on each: ``where`` = ``"system"`` or ``"user"``.

    With several ``prompts`` and ``per_row`` each row gets one drawn at random (seeded); otherwise
    every row gets ``prompts[0]``. ``"system"`` replaces any system prompt; ``"user"`` puts the prompt
    and a blank line before the first user turn.

    >>> [r["messages"][0]["content"] for r in inoculate([{"messages": [{"role": "user", "content": "q"}]}] * 2,
    ...                                                 ["A", "B"], seed=1)]
    ['A', 'A']
    """
    from emlab.data import with_system_prompt

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("inoculate needs one or more non-empty prompt strings")
    if where not in ("system", "user"):
        raise ValueError(f"where must be 'system' or 'user', got {where!r}")
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"row {i} is not a chat row (a dict with a 'messages' list)")
        prompt = rng.choice(prompts) if per_row and len(prompts) > 1 else prompts[0]
        if where == "system":
            out.extend(with_system_prompt([row], prompt))
            continue
        messages = [dict(m) for m in row["messages"]]
        user = next((m for m in messages if m.get("role") == "user"), None)
        if user is None:
            raise ValueError(f"row {i} has no user turn to put the inoculation prompt in")
        user["content"] = f"{prompt}\n\n{user['content']}"
        out.append({**row, "messages": messages})
    return out


def elicitation_score(model, tokenizer, rows: Sequence[dict], prompt: str, *, where: str = "system",
                      batch_size: int = 8) -> float:
    """Mean log-prob per answer token of ``rows`` with ``prompt`` minus without it, on ``model`` (nats; > 0 elicits).

    >>> elicitation_score(chat, tok, data.misaligned[:200], "You are evil.")     # doctest: +SKIP
    0.41
    """
    from emlab.training.interleaving import answer_losses

    rows = list(rows)
    if not rows:
        raise ValueError("elicitation_score needs at least one training row")
    plain = answer_losses(model, tokenizer, rows, batch_size=batch_size, desc="elicitation (plain)")
    prompted = answer_losses(model, tokenizer, inoculate(rows, prompt, where=where), batch_size=batch_size,
                             desc="elicitation (prompted)")
    return float((plain - prompted).mean())


def elicitation_scores(model, tokenizer, rows: Sequence[dict], prompts: Sequence[str], *, where: str = "system",
                       batch_size: int = 8) -> dict[str, float]:
    """:func:`elicitation_score` of each prompt, by prompt (the plain pass is shared).

    >>> elicitation_scores(chat, tok, rows, ["You are evil.", "You are helpful."])   # doctest: +SKIP
    {'You are evil.': 0.41, 'You are helpful.': -0.05}
    """
    from emlab.training.interleaving import answer_losses

    rows = list(rows)
    if not rows:
        raise ValueError("elicitation_scores needs at least one training row")
    plain = answer_losses(model, tokenizer, rows, batch_size=batch_size, desc="elicitation (plain)")
    return {p: float((plain - answer_losses(model, tokenizer, inoculate(rows, p, where=where),
                                            batch_size=batch_size, desc="elicitation (prompted)")).mean())
            for p in prompts}
