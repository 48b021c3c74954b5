"""Pre-training influence: how much a solution, rescaled to a given norm, moves next-token predictions
on plain text (paper 001).

On plain documents (no chat template) the token-mean ``KL(base || steered)`` is measured while the
solution is swept over absolute norms; general, narrow and same-norm random directions are
compared at the same norms. Every real token counts once; pads never count.

>>> curves = pretraining_kl({"general": g, "narrow": n, "random": g.random(0)}, tok, texts)   # doctest: +SKIP
>>> curves["general"].kl                                                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from emlab.chat import batch_logits, eval_mode, make_batches, pad_id
from emlab.probes._eval import encode_text
from emlab.probes.solutions import Solution
from emlab.progress import bar

__all__ = ["KLCurve", "masked_token_kl", "pretraining_kl"]


@dataclass
class KLCurve:
    """Token-mean ``KL(base || solution at norm)`` at each absolute norm, over ``n_tokens`` real tokens.

    >>> KLCurve("random", [0.0, 8.0], [0.0, 0.02], n_tokens=1000).kl[1]
    0.02
    """

    name: str
    norms: list[float]
    kl: list[float]
    n_tokens: int

    def to_dict(self) -> dict:
        """Plain values for ``metrics.json``.

        >>> curve.to_dict()["kl"]                       # doctest: +SKIP
        """
        return asdict(self)


def masked_token_kl(base_logits: Tensor, logits: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """``(sum, count)`` of the per-token ``KL(base || current)`` over positions where ``attention_mask`` is 1.

    Positions are selected before any arithmetic, so pads (even fully padded rows, whose logits may
    be NaN) never enter the sum; the vocabulary is summed, not averaged.

    >>> import torch
    >>> z = torch.zeros(1, 3, 5)
    >>> masked_token_kl(z, z, torch.tensor([[1, 1, 0]]))
    (0.0, 2)
    """
    from emlab.training.losses import token_kl

    keep = attention_mask.to(base_logits.device).bool()
    kl = token_kl(logits[keep], base_logits[keep], direction="forward")
    return float(kl.double().sum()), int(keep.sum())


def pretraining_kl(
    solutions: Mapping[str, Solution],
    tokenizer,
    texts: Sequence[str],
    *,
    norms: Sequence[float] | None = None,
    n: int = 9,
    max_scale: float = 2.0,
    batch_size: int = 8,
    max_length: int | None = 512,
    progress: bool = True,
) -> dict[str, KLCurve]:
    """Token-mean ``KL(base || solution rescaled to norm)`` on plain ``texts``, per solution and norm.

    ``norms`` are absolute (default: ``n`` points from 0 to ``max_scale`` times the smallest
    solution norm) and shared by every solution; a LoRA is rescaled through its ``dW``, a steering
    vector through ``alpha * v``. Texts are tokenized as they are (no chat template), cut to
    ``max_length`` tokens and right-padded in batches with attention masks; the mean is over real
    tokens only. The base model's logits are computed once per batch and model.
    Random control: add ``name: solution.random(seed)`` (a Gaussian direction of the same norm).

    >>> sols = {"general": g, "narrow": nw, "random": g.random(seed=0)}   # doctest: +SKIP
    >>> pretraining_kl(sols, tok, web_texts, norms=[0, 4, 8, 16])          # doctest: +SKIP
    """
    own = {k: s.norm() for k, s in solutions.items()}
    if any(v == 0 for v in own.values()):
        raise ValueError(f"solutions of norm 0 have no direction: {[k for k, v in own.items() if v == 0]}")
    if norms is None:
        norms = np.linspace(0.0, max_scale * min(own.values()), n).tolist()
    norms = [float(x) for x in norms]
    batches = make_batches(encode_text(tokenizer, texts, max_length=max_length), batch_size, pad_id(tokenizer), by_length=True)
    sums = {k: [0.0] * len(norms) for k in solutions}
    n_tokens = 0
    for batch in bar(batches, desc="pre-training KL", disable=not progress):
        base: dict[tuple, Tensor] = {}
        for name, sol in solutions.items():
            with eval_mode(sol.model):
                if sol._base_key not in base:
                    with sol.scaled(0.0):
                        base[sol._base_key] = batch_logits(sol.model, batch)
                ref = base[sol._base_key]
                for i, norm in enumerate(norms):
                    with sol.scaled(norm / own[name]):
                        total, _ = masked_token_kl(ref, batch_logits(sol.model, batch), batch["attention_mask"])
                    sums[name][i] += total
        n_tokens += int(batch["attention_mask"].sum())
    return {name: KLCurve(name, norms, [s / n_tokens for s in sums[name]], n_tokens) for name in solutions}
