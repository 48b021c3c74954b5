"""Emergent re-alignment: a benign finetune of an already misaligned model.

:func:`merged_copy` folds a finetune's adapter into a copy of its weights (PEFT's
``merge_and_unload``), so the benign finetune trains a NEW adapter on top of the misaligned model
(the misaligned finetune itself is left as it was); :func:`realign` then runs :func:`finetune` on
the benign rows.

>>> again = realign(sft.model, tok, benign_rows[:200], EMConfig(output_dir="runs/realign200"))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

__all__ = ["merged_copy", "realign"]


def merged_copy(model):
    """A plain model equal to ``model`` with any PEFT adapter merged in (a deep copy; ``model`` is untouched).

    >>> plain = merged_copy(sft.model)      # doctest: +SKIP
    """
    from emlab.training.adapters import SteeringVector

    if any(isinstance(m, SteeringVector) for m in model.modules()):
        raise ValueError("realign: a steering_vector finetune cannot be merged; re-align a lora, rank1 or full finetune")
    out = copy.deepcopy(model)
    if hasattr(out, "merge_and_unload"):
        out = out.merge_and_unload()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def realign(model, tokenizer, benign_rows: Sequence[dict], config, *, callbacks: list[Any] | None = None):
    """Finetune a merged copy of the misaligned ``model`` on ``benign_rows`` with ``config``; a :class:`FinetuneResult`.

    >>> again = realign(sft.model, tok, benign[:50], EMConfig(output_dir="runs/r50"))   # doctest: +SKIP
    """
    from emlab.training import finetune

    if not benign_rows:
        raise ValueError("realign needs at least one benign row (0 rows: evaluate the misaligned model itself)")
    return finetune(merged_copy(model), tokenizer, list(benign_rows), config, callbacks=callbacks)
