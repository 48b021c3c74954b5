"""One chat-encoding path: chat rows -> token ids and labels -> padded batches -> answer NLL.

A row is ``{"messages": [...]}`` or a bare list of messages. The tokenizer's chat template renders
it, and its ``{% generation %}`` markers (:mod:`emlab.chat_templates`,
``emlab.models.ensure_chat_template``) mark the answer tokens: the assistant turns, end-of-turn
token included. Labels are the token ids there and :data:`IGNORE_INDEX` elsewhere. Batches are
right-padded, so real tokens keep their positions and never attend to pads. Training
(interleaving's scores, GRPO's SFT steps, CAFT), the probes, directions and the studies all encode
through here; the loss terms of :mod:`emlab.training.losses` take the same labels.

>>> import torch
>>> batch = pad_batch([([1, 2, 3], [-100, 2, 3]), ([1, 2], [-100, 2])], pad_id=0)
>>> batch["labels"].tolist()
[[-100, 2, 3], [-100, 2, -100]]
>>> row_nll(torch.zeros(2, 3, 4), batch["labels"])   # uniform over 4 tokens: log 4 per answer token
tensor([1.3863, 1.3863])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "Row",
    "batch_logits",
    "encode_chat",
    "encode_messages",
    "eval_mode",
    "make_batches",
    "mean_nll",
    "messages_of",
    "next_token_mask",
    "nll_sum",
    "pad_batch",
    "pad_id",
    "row_nll",
    "upcast",
]

#: Label of a token that carries no loss (the Hugging Face convention).
IGNORE_INDEX = -100

Row = Mapping[str, Any] | Sequence[Mapping[str, str]]
#: ``(input_ids, labels)`` of one row; labels are :data:`IGNORE_INDEX` outside the answer tokens.
Encoded = tuple[list[int], list[int]]


def messages_of(row: Row, index: int = 0) -> list:
    """The messages of a row (``{"messages": [...]}`` or a bare message list); ``index`` names it in errors.

    >>> messages_of({"messages": [{"role": "user", "content": "hi"}]})
    [{'role': 'user', 'content': 'hi'}]
    """
    if isinstance(row, Mapping):
        if "messages" not in row:
            raise ValueError(f"row {index} has no 'messages' key (keys: {sorted(row)})")
        return list(row["messages"])
    return list(row)


def encode_messages(tokenizer, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of one conversation through the chat template, and its 0/1 answer mask.

    >>> encode_messages(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])  # doctest: +SKIP
    ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])
    """
    enc = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, add_generation_prompt=add_generation_prompt)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def encode_chat(tokenizer, rows: Sequence[Row], *, max_length: int | None = None,
                skip_empty: bool = False) -> list[Encoded]:
    """``(input_ids, labels)`` per row, cut to ``max_length`` tokens; labels are -100 outside the answer.

    A row with no answer token to predict (none after its first token, once cut) is an error naming
    the row, or with ``skip_empty=True`` dropped with a warning (an error only if every row is).

    >>> ids, labels = encode_chat(tok, [chat_row("hi", "hello")])[0]    # doctest: +SKIP
    """
    out, dropped = [], []
    for i, row in enumerate(rows):
        ids, mask = encode_messages(tokenizer, messages_of(row, i))
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            if not skip_empty:
                raise ValueError(
                    f"row {i} has no answer token to predict{'' if max_length is None else f' within {max_length} tokens'}: "
                    "does the chat template carry {% generation %} markers (emlab.models.ensure_chat_template), and "
                    "does the row end with an assistant turn?")
            dropped.append(i)
            continue
        out.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    if skip_empty and not out:
        raise ValueError(
            f"none of the {len(rows)} rows has an answer (assistant) token to score: does the tokenizer's chat template "
            "carry {% generation %} markers (emlab.models.ensure_chat_template), and do the rows end with an "
            "assistant turn?")
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(rows)} rows have no answer token within max_length, skipped "
                      f"(rows {dropped[:10]})", stacklevel=2)
    return out


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token, else 0.

    >>> pad_id(type("T", (), {"pad_token_id": None, "eos_token_id": 2})())
    2
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_batch(encoded: Sequence[Encoded], pad_id: int | None, device=None) -> dict[str, Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs into ``input_ids`` / ``attention_mask`` / ``labels`` tensors.

    ``pad_id=None`` pads with 0 (pads are masked and carry no loss, so their id never counts).

    >>> pad_batch([([5, 6], [-100, 6]), ([7], [7])], pad_id=0)["attention_mask"].tolist()
    [[1, 1], [1, 0]]
    """
    if not encoded:
        raise ValueError("no rows to pad into a batch")
    pad = 0 if pad_id is None else pad_id
    n = max(len(ids) for ids, _ in encoded)
    return {
        "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x, _ in encoded], device=device),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in encoded], device=device),
        "labels": torch.tensor([y + [IGNORE_INDEX] * (n - len(y)) for _, y in encoded], device=device),
    }


def make_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int | None, *,
                 by_length: bool = False) -> list[dict[str, Tensor]]:
    """Padded batches of ``batch_size`` rows (on the CPU), in order or longest first (``by_length``: less padding).

    >>> [b["input_ids"].shape[1] for b in make_batches([([1], [1]), ([1, 2, 3], [1, 2, 3])], 1, 0, by_length=True)]
    [3, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = sorted(encoded, key=lambda e: len(e[0]), reverse=True) if by_length else list(encoded)
    return [pad_batch(rows[start:start + batch_size], pad_id) for start in range(0, len(rows), batch_size)]


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model.eval()`` and no gradients inside; the training flag comes back on exit.

    >>> m = torch.nn.Linear(2, 2)
    >>> with eval_mode(m):
    ...     m.training, torch.is_grad_enabled()
    (False, False)
    >>> m.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def batch_logits(model, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of a padded batch, moved to the model's device first.

    >>> batch_logits(model, pad_batch(encode_chat(tok, rows), pad_id(tok))).shape   # doctest: +SKIP
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors are upcast to float32 for log-softmax and sums; float32/float64 are kept.

    >>> upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype
    torch.float32
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def next_token_mask(labels: Tensor) -> Tensor:
    """Boolean mask over logit positions ``[:, :-1]`` whose next token carries loss (label != -100).

    Position ``t`` of the logits predicts token ``t + 1``, so the mask is ``labels[:, 1:] != -100``.

    >>> next_token_mask(torch.tensor([[-100, -100, 7, 8]]))
    tensor([[False,  True,  True]])
    """
    return labels[:, 1:] != IGNORE_INDEX


def nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token NLL of every token with a label (0, still on the graph, when there is none).

    >>> nll_sum(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]]))   # 2 tokens, log 4 each
    tensor(2.7726)
    """
    mask = next_token_mask(labels)
    lg = upcast(logits[:, :-1][mask])
    return F.cross_entropy(lg, labels[:, 1:][mask], reduction="sum") if lg.numel() else logits.sum() * 0


def row_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL of each row's tokens that carry loss, shape ``(batch,)`` (NaN for a row without any).

    This is L(d) of Interleaving+: the mean negative log-likelihood of the answer tokens given the prompt.

    >>> row_nll(torch.zeros(2, 3, 4), torch.tensor([[-100, 1, 2], [-100, -100, 3]]))
    tensor([1.3863, 1.3863])
    """
    mask = next_token_mask(labels)
    lp = torch.log_softmax(upcast(logits[:, :-1]), dim=-1)
    target = labels[:, 1:].clamp(min=0)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    count = mask.sum(-1)
    out = (nll * mask).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


def mean_nll(model, batches: Sequence[Mapping[str, Tensor]]) -> float:
    """Token-weighted mean next-token NLL over every token with a label, across all batches (eval mode).

    >>> mean_nll(model, make_batches(encode_chat(tok, rows), 8, pad_id(tok)))   # doctest: +SKIP
    2.31
    """
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            out = batch_logits(model, batch)
            labels = batch["labels"].to(out.device)
            total += float(nll_sum(out, labels))
            count += int(next_token_mask(labels).sum())
    return total / count
