"""The probes' inputs: chat rows through :mod:`emlab.chat` (response-token NLL), and plain texts.

Rows are right-padded (so real tokens keep their positions and never attend to pads) and sorted by
length (less padding; token means do not depend on order). The encoding, batches and NLL are
:mod:`emlab.chat`'s, the same the trainer's loss terms take.
"""

from __future__ import annotations

from collections.abc import Sequence

from emlab.chat import Encoded, Row, encode_chat, make_batches, mean_nll, pad_id

__all__ = ["response_loss"]


def chat_batches(tokenizer, rows: Sequence[Row], *, batch_size: int, max_length: int | None) -> list:
    """Padded batches of chat rows, longest first; rows without a response token are skipped with a warning.

    >>> chat_batches(tok, rows, batch_size=8, max_length=2048)[0]["labels"]    # doctest: +SKIP
    """
    encoded = encode_chat(tokenizer, rows, max_length=max_length, skip_empty=True)
    return make_batches(encoded, batch_size, pad_id(tokenizer), by_length=True)


def encode_text(tokenizer, texts: Sequence[str], *, max_length: int | None = 512) -> list[Encoded]:
    """``(ids, ids)`` of plain texts (every token counts; no chat template; the tokenizer's own special
    tokens), cut to ``max_length``.

    >>> encode_text(tok, ["the cat sat"])                    # doctest: +SKIP
    [([785, 8251, 7578], [785, 8251, 7578])]
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if max_length is not None:
            ids = ids[:max_length]
        if ids:
            out.append((list(ids), list(ids)))
    if not out:
        raise ValueError("no text to score: every text is empty")
    return out


def response_loss(model, tokenizer, rows: Sequence[Row], *, batch_size: int = 8, max_length: int | None = 2048) -> float:
    """The finetuning loss: mean NLL over response (assistant-mask) tokens, token-weighted over all rows.

    >>> response_loss(model, tok, rows)                      # doctest: +SKIP
    2.31
    """
    return mean_nll(model, chat_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length))
