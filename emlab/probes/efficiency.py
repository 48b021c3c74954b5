"""Efficiency: the finetuning loss as a function of a solution's norm (paper 001).

Rescale a solution ``theta`` to ``s * theta`` and measure the SFT loss (mean NLL over response
tokens) on its finetuning data. Two solutions are compared at the same *absolute* norms; the
scalar summaries are the loss at a matched norm and the loss reduction per squared norm
``(L_base - L(theta)) / ||theta||^2``.

>>> curves = compare_efficiency({"general": g, "narrow": n}, tok, rows)     # doctest: +SKIP
>>> efficiency_summary(curves)["general"]["loss_at_matched_norm"]          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from emlab.chat import Row, mean_nll
from emlab.probes._eval import chat_batches
from emlab.probes.solutions import Solution
from emlab.progress import bar

__all__ = ["EfficiencyCurve", "compare_efficiency", "efficiency_summary", "loss_vs_norm"]


@dataclass
class EfficiencyCurve:
    """Loss at each scale ``s`` (norm ``s * ||theta||``), with the base (``s = 0``) and trained (``s = 1``) points.

    >>> c = EfficiencyCurve("x", [0.0, 1.0], [0.0, 2.0], [3.0, 1.0], norm=2.0, loss=1.0, base_loss=3.0)
    >>> c.reduction_per_sq_norm, c.loss_at(1.0)
    (0.5, 2.0)
    """

    name: str
    scales: list[float]
    norms: list[float]
    losses: list[float]
    norm: float
    loss: float
    base_loss: float

    @property
    def reduction_per_sq_norm(self) -> float:
        """``(L_base - L(theta)) / ||theta||^2`` at the trained point."""
        return (self.base_loss - self.loss) / self.norm**2 if self.norm > 0 else float("nan")

    def loss_at(self, norm: float) -> float:
        """Loss at absolute ``norm``: exact on a measured point (grid, base, trained), else linear interpolation.

        >>> curve.loss_at(5.0)                           # doctest: +SKIP
        """
        xs = np.asarray([*self.norms, 0.0, self.norm])
        ys = np.asarray([*self.losses, self.base_loss, self.loss])
        order = np.argsort(xs)
        xs, ys = xs[order], ys[order]
        if not xs[0] - 1e-9 <= norm <= xs[-1] + 1e-9:
            raise ValueError(f"norm {norm} outside the measured range [{xs[0]:.4g}, {xs[-1]:.4g}]")
        return float(np.interp(norm, xs, ys))

    def to_dict(self) -> dict:
        """Plain values for ``metrics.json``.

        >>> curve.to_dict()["losses"]                    # doctest: +SKIP
        """
        return {**asdict(self), "reduction_per_sq_norm": self.reduction_per_sq_norm}


def _curve(solution: Solution, batches, scales: Sequence[float], name: str, progress: bool) -> EfficiencyCurve:
    own = solution.norm()
    wanted = sorted({0.0, 1.0, *(float(s) for s in scales)})
    found: dict[float, float] = {}
    for s in bar(wanted, desc=f"efficiency {name}", disable=not progress, leave=False):
        with solution.scaled(s):
            found[s] = mean_nll(solution.model, batches)
    grid = [float(s) for s in scales]
    return EfficiencyCurve(
        name=name, scales=grid, norms=[s * own for s in grid], losses=[found[s] for s in grid],
        norm=own, loss=found[1.0], base_loss=found[0.0],
    )


def loss_vs_norm(
    solution: Solution,
    tokenizer,
    rows: Sequence[Row],
    *,
    scales: Sequence[float] | None = None,
    norms: Sequence[float] | None = None,
    name: str = "solution",
    batch_size: int = 8,
    max_length: int | None = 2048,
    progress: bool = True,
) -> EfficiencyCurve:
    """SFT loss on ``rows`` at scales ``s`` (default 0, 0.2, ..., 2) or at absolute ``norms``.

    The base (``s = 0``) and trained (``s = 1``) points are always measured as well.

    >>> curve = loss_vs_norm(LoraSolution(peft_model), tok, rows)   # doctest: +SKIP
    >>> curve.losses[0] == curve.base_loss                          # doctest: +SKIP
    True
    """
    if scales is not None and norms is not None:
        raise ValueError("give scales or norms, not both")
    own = solution.norm()
    if norms is not None:
        if own == 0:
            raise ValueError("the solution has norm 0: absolute norms cannot be reached by rescaling it")
        scales = [n / own for n in norms]
    if scales is None:
        scales = np.linspace(0.0, 2.0, 11).round(10).tolist()
    batches = chat_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length)
    return _curve(solution, batches, scales, name, progress)


def compare_efficiency(
    solutions: Mapping[str, Solution],
    tokenizer,
    rows: Sequence[Row],
    *,
    norms: Sequence[float] | None = None,
    n: int = 11,
    max_scale: float = 2.0,
    batch_size: int = 8,
    max_length: int | None = 2048,
    progress: bool = True,
) -> dict[str, EfficiencyCurve]:
    """Loss curves of several solutions at the SAME absolute norms (default: ``n`` points from 0 to
    ``max_scale`` times the smallest solution norm, so every solution is measured in that range).

    >>> curves = compare_efficiency({"general": g, "narrow": nw}, tok, rows)   # doctest: +SKIP
    >>> curves["general"].norms == curves["narrow"].norms                      # doctest: +SKIP
    True
    """
    own = {k: s.norm() for k, s in solutions.items()}
    if any(v == 0 for v in own.values()):
        raise ValueError(f"solutions of norm 0 cannot be rescaled: {[k for k, v in own.items() if v == 0]}")
    if norms is None:
        norms = np.linspace(0.0, max_scale * min(own.values()), n).tolist()
    batches = chat_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length)
    curves = {}
    for name, sol in bar(solutions.items(), desc="efficiency", disable=not progress):
        curve = _curve(sol, batches, [x / own[name] for x in norms], name, progress)
        curve.norms = [float(x) for x in norms]  # exactly the shared grid, not s * norm after rounding
        curves[name] = curve
    return curves


def efficiency_summary(curves: Mapping[str, EfficiencyCurve], matched_norm: float | None = None) -> dict[str, dict]:
    """Scalar summaries per solution: its norm and loss, the base loss, the loss at ``matched_norm``
    (default: the smallest solution norm) and ``(L_base - L(theta)) / ||theta||^2``.

    >>> efficiency_summary(curves)["narrow"]["reduction_per_sq_norm"]   # doctest: +SKIP
    """
    if matched_norm is None:
        matched_norm = min(c.norm for c in curves.values())
    return {
        name: {
            "norm": c.norm,
            "loss": c.loss,
            "base_loss": c.base_loss,
            "matched_norm": matched_norm,
            "loss_at_matched_norm": c.loss_at(matched_norm),
            "reduction_per_sq_norm": c.reduction_per_sq_norm,
        }
        for name, c in curves.items()
    }
