"""Stability: how fast the loss rises when a solution is rotated away from itself at fixed norm (paper 001).

For each ``eps`` and seed the solution ``x`` becomes ``x' = sqrt(1 - eps^2) x + eps y`` (``y``
Gaussian, orthogonal to ``x``, rescaled to ``||x||``: a rotation by ``arcsin(eps)``), and the loss
rise is reported relative to the way back to the base model:
``R = 100 (L_pert - L_orig) / (L_base - L_orig)`` (0 = the trained solution, 100 = the base model).

>>> res = stability(LoraSolution(peft_model), tok, rows)       # doctest: +SKIP
>>> res.mean                                                   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from emlab.chat import Row, mean_nll
from emlab.probes._eval import chat_batches
from emlab.probes.solutions import Solution
from emlab.progress import bar as progress_bar

__all__ = ["EPS_GRID", "StabilityResult", "relative_loss_increase", "stability"]

#: Perturbation sizes of paper 001: 0.01, 0.05, then 0.1 to 1.0 in steps of 0.1 (sin of the angle).
EPS_GRID = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def relative_loss_increase(l_pert, l_orig: float, l_base: float):
    """``R = 100 (L_pert - L_orig) / (L_base - L_orig)``; works on floats and arrays.

    >>> relative_loss_increase(2.0, l_orig=1.0, l_base=3.0)
    50.0
    """
    gap = l_base - l_orig
    if gap == 0:
        return np.full_like(np.asarray(l_pert, dtype=float), np.nan) if np.ndim(l_pert) else float("nan")
    out = 100.0 * (np.asarray(l_pert, dtype=float) - l_orig) / gap
    return out if np.ndim(out) else float(out)


@dataclass
class StabilityResult:
    """Losses of perturbed solutions, ``losses[i][j]`` at ``eps[i]`` and ``seeds[j]``, with ``R`` summaries.

    >>> r = StabilityResult("x", [0.0, 1.0], [0, 1], [[1.0, 1.0], [2.0, 3.0]], loss=1.0, base_loss=3.0)
    >>> r.mean, r.std
    ([0.0, 75.0], [0.0, 35.35533905932738])
    """

    name: str
    eps: list[float]
    seeds: list[int]
    losses: list[list[float]]
    loss: float
    base_loss: float

    @property
    def relative(self) -> np.ndarray:
        """``R`` per (eps, seed), shape ``(len(eps), len(seeds))``."""
        return relative_loss_increase(np.asarray(self.losses), self.loss, self.base_loss)

    @property
    def mean(self) -> list[float]:
        """Mean ``R`` over seeds, per eps."""
        return self.relative.mean(axis=1).tolist()

    @property
    def std(self) -> list[float]:
        """Standard deviation of ``R`` over seeds (ddof=1; 0 with one seed), per eps."""
        rel = self.relative
        return (rel.std(axis=1, ddof=1) if rel.shape[1] > 1 else np.zeros(rel.shape[0])).tolist()

    def to_dict(self) -> dict:
        """Plain values for ``metrics.json`` (losses, R mean and std per eps).

        >>> res.to_dict()["mean"]                       # doctest: +SKIP
        """
        return {**asdict(self), "mean": self.mean, "std": self.std}


def stability(
    solution: Solution,
    tokenizer,
    rows: Sequence[Row],
    *,
    eps: Sequence[float] = EPS_GRID,
    seeds: Sequence[int] = range(10),
    name: str = "solution",
    batch_size: int = 8,
    max_length: int | None = 2048,
    progress: bool = True,
) -> StabilityResult:
    """Loss on ``rows`` under norm-preserving perturbations of ``solution`` for every ``eps`` x seed.

    ``L_orig`` is the loss of the solution itself and ``L_base`` of the base model (scale 0); the
    same seed gives the same noise at every ``eps``. For a LoRA each module's ``B`` is perturbed
    independently with ``A`` fixed (see :meth:`LoraSolution.perturbed`).

    >>> res = stability(sol, tok, rows, eps=[0.1, 0.5], seeds=range(10))   # doctest: +SKIP
    >>> res.mean                                                            # doctest: +SKIP
    [1.3, 22.0]
    """
    seeds = [int(s) for s in seeds]
    eps = [float(e) for e in eps]
    batches = chat_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length)
    model = solution.model
    with solution.scaled(0.0):
        base_loss = mean_nll(model, batches)
    with solution.scaled(1.0):
        loss = mean_nll(model, batches)
    if base_loss <= loss:
        warnings.warn(f"{name}: the base loss ({base_loss:.4g}) is not above the solution's ({loss:.4g}): "
                      "R is meaningless (negative or NaN)", stacklevel=2)
    losses = [[0.0] * len(seeds) for _ in eps]
    bar = progress_bar(total=len(eps) * len(seeds), desc=f"stability {name}", disable=not progress)
    for i, e in enumerate(eps):
        for j, seed in enumerate(seeds):
            with solution.perturbed(e, seed):
                losses[i][j] = mean_nll(model, batches)
            bar.update()
    bar.close()
    return StabilityResult(name=name, eps=eps, seeds=seeds, losses=losses, loss=loss, base_loss=base_loss)
