"""Study 05's probes of a trained pair of solutions: efficiency, stability and pre-training influence.

The measuring half of :mod:`emlab.studies.narrow_general` (which trains the general and the narrow
solution and evaluates their EM): its probe steps write the probe metrics and figures of one pair
into its run (:func:`matched_norm` first, then :func:`efficiency`, :func:`stability` and
:func:`influence`), with the metric helpers both halves share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emlab.studies.common import StudyContext

__all__ = ["SolutionPair", "efficiency", "finite", "influence", "matched_norm", "put_metric", "record_figure", "stability",
           "summarize_seeds"]

#: Rows per forward pass in the probes (larger batches are faster on CPU for small models).
_PROBE_BATCH = 32


@dataclass
class SolutionPair:
    """The two trained solutions of one task (``Solution`` objects) with their training logs."""

    general: Any
    narrow: Any
    logs: dict[str, list[dict]]


def record_figure(run, ctx: StudyContext, name: str, kind: str, **data: Any) -> None:
    """:func:`emlab.plots.record` into the run; HTML only in smoke mode (no Chromium start-up)."""
    from emlab import plots

    plots.record(run.dir, name, kind, formats=("html",) if ctx.smoke else ("html", "png"), **data)


def finite(value: Any) -> bool:
    """A real, finite number (bools and NaN / infinities are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def put_metric(metrics: dict[str, Any], key: str, value: Any, reason: str) -> None:
    """``metrics[key] = value`` when finite, else None with ``reason`` under ``metrics["none_reasons"]``."""
    if value is not None and finite(value):
        metrics[key] = float(value)
    else:
        metrics[key] = None
        metrics.setdefault("none_reasons", {})[key] = reason if value is None else f"{reason} (got {value})"


def _pretrain_texts(ctx: StudyContext, n: int) -> list[str] | None:
    """Plain documents of the ``pretrain`` file (JSONL with ``text``, or a text file, one document a line)."""
    if "pretrain" not in ctx.files:
        return None
    path = ctx.files["pretrain"]
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            texts.append(json.loads(line)["text"] if path.suffix == ".jsonl" else line)
            if len(texts) >= n:
                break
    return texts or None


#: Norms of the pre-training KL sweep, in units of the matched norm (1.0 is the reported point).
_KL_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def matched_norm(pair: SolutionPair, metrics: dict[str, Any]) -> float | None:
    """Both solutions' norms, their cosine and the matched norm (the smaller norm, where the probes
    compare them) into ``metrics``; returns the matched norm, or None when a solution has norm 0 (every
    probe metric is then None, with the reason)."""
    from emlab.probes import cosine

    sols = {"general": pair.general, "narrow": pair.narrow}
    norms = {k: s.norm() for k, s in sols.items()}
    for k, v in norms.items():
        put_metric(metrics, f"norm_{k}", v, "solution norm")
    if min(norms.values()) == 0:
        for key in ("loss_at_matched_norm", "stability_r_at_eps_0.5", "pretrain_kl_at_norm"):
            for k in (*sols, "random") if key == "pretrain_kl_at_norm" else sols:
                put_metric(metrics, f"{key}_{k}", None, "a solution has norm 0 (training did not move it)")
        return None
    matched = min(norms.values())
    metrics["matched_norm"] = matched
    put_metric(metrics, "cosine_general_narrow", cosine(pair.general, pair.narrow), "cosine undefined")
    return matched


def efficiency(pair: SolutionPair, ctx: StudyContext, rows: list[dict], matched: float, run,
               metrics: dict[str, Any], label: str, n_points: int = 11) -> dict[str, Any]:
    """Finetuning loss of both solutions at the same absolute norms (0 to twice the matched norm): the
    ``loss_*`` metrics, the ``efficiency`` figure; returns the curves (solution -> ``EfficiencyCurve``)."""
    from emlab.probes import compare_efficiency, efficiency_summary

    sols = {"general": pair.general, "narrow": pair.narrow}
    curves = compare_efficiency(sols, ctx.tokenizer, rows, n=n_points, batch_size=_PROBE_BATCH, progress=False)
    summary = efficiency_summary(curves, matched_norm=matched)
    for k in sols:
        put_metric(metrics, f"loss_at_matched_norm_{k}", summary[k]["loss_at_matched_norm"], "loss not measured")
        put_metric(metrics, f"loss_{k}", summary[k]["loss"], "loss not measured")
        put_metric(metrics, f"reduction_per_sq_norm_{k}", summary[k]["reduction_per_sq_norm"], "zero norm")
    put_metric(metrics, "base_loss", summary["general"]["base_loss"], "base loss not measured")
    run.log_metrics({"efficiency": {k: c.to_dict() for k, c in curves.items()}})
    record_figure(run, ctx, "efficiency", "loss_vs_norm",
            rows=[{"solution": k, "norm": x, "loss": y} for k, c in curves.items() for x, y in zip(c.norms, c.losses)],
            title=f"{label}: finetuning loss at the same absolute norms<br>(matched norm {matched:.3g})")
    return curves


def stability(pair: SolutionPair, ctx: StudyContext, rows: list[dict], sizes: dict[str, Any], run,
              metrics: dict[str, Any], label: str) -> dict[str, Any]:
    """R (and the raw loss rise) under norm-preserving rotations, every eps x seed: the ``stability_*``
    metrics, the ``stability`` figure; returns the results (solution -> ``StabilityResult``)."""
    from emlab.probes import EPS_GRID
    from emlab.probes import stability as rotate

    sols = {"general": pair.general, "narrow": pair.narrow}
    eps = tuple(sorted({*(sizes["eps"] or EPS_GRID), 0.5}))
    stab = {k: rotate(s, ctx.tokenizer, rows, eps=eps, seeds=range(sizes["stability_seeds"]), name=k,
                         batch_size=_PROBE_BATCH, progress=False) for k, s in sols.items()}
    i = eps.index(0.5)
    for k, res in stab.items():
        put_metric(metrics, f"stability_r_at_eps_0.5_{k}", res.mean[i], "R undefined: the base loss is not above the solution's")
        put_metric(metrics, f"stability_dloss_at_eps_0.5_{k}", sum(res.losses[i]) / len(res.losses[i]) - res.loss,
             "loss not measured")
    run.log_metrics({"stability": {k: r.to_dict() for k, r in stab.items()}})
    rel = {k: r.relative for k, r in stab.items()}
    record_figure(run, ctx, "stability", "stability_curves",
            rows=[{"solution": k, "eps": e, "seed": s, "R": float(rel[k][a, b])}
                  for k, r in stab.items() for a, e in enumerate(r.eps) for b, s in enumerate(r.seeds)
                  if math.isfinite(float(rel[k][a, b]))],
            title=f"{label}: stability, R vs eps ({sizes['stability_seeds']} seeds, {len(rows)} rows)")
    return stab


def influence(pair: SolutionPair, ctx: StudyContext, sizes: dict[str, Any], matched: float, run,
              metrics: dict[str, Any], label: str) -> dict[str, Any] | None:
    """KL(base || steered) on plain text for general, narrow and same-norm random solutions: the
    ``pretrain_kl_*`` metrics, the ``pretrain_kl`` figure; returns the curves (None without a corpus)."""
    from emlab.probes import pretraining_kl

    texts = _pretrain_texts(ctx, sizes["pretrain_docs"])
    if texts is None:
        for k in ("general", "narrow", "random"):
            put_metric(metrics, f"pretrain_kl_at_norm_{k}", None,
                 "no plain-text corpus: pass files={'pretrain': 'docs.jsonl'} (JSONL with 'text')")
        return None
    n_rand = sizes["random_seeds"]
    sols = {"general": pair.general, "narrow": pair.narrow,
            **{f"random_{j}": pair.general.random(seed=1000 + j) for j in range(n_rand)}}
    scales = tuple(sizes.get("kl_scales", _KL_SCALES))
    kl = pretraining_kl(sols, ctx.tokenizer, texts, norms=[matched * s for s in scales],
                        batch_size=_PROBE_BATCH, progress=False)
    at = scales.index(1.0)
    for k in ("general", "narrow"):
        put_metric(metrics, f"pretrain_kl_at_norm_{k}", kl[k].kl[at], "KL not measured")
    put_metric(metrics, "pretrain_kl_at_norm_random", sum(kl[f"random_{j}"].kl[at] for j in range(n_rand)) / n_rand,
         "KL not measured")
    metrics["pretrain_kl_docs"] = len(texts)
    run.log_metrics({"pretrain_kl": {k: c.to_dict() for k, c in kl.items()}})
    record_figure(run, ctx, "pretrain_kl", "kl_vs_norm",
            rows=[{"direction": "random" if k.startswith("random") else k, "norm": x, "kl": y}
                  for k, c in kl.items() for x, y in zip(c.norms, c.kl)],
            title=f"{label}: KL(base || steered) on {len(texts)} plain-text documents")
    return kl


def summarize_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Mean, standard deviation (ddof=1) and count over seeds of every numeric metric.

    >>> summarize_seeds([{"a": 1.0}, {"a": 3.0}])["a"]
    {'mean': 2.0, 'std': 1.4142135623730951, 'n': 2}
    """
    keys = dict.fromkeys(k for r in results for k, v in r.items() if finite(v))
    out: dict[str, dict[str, float | int | None]] = {}
    for k in keys:
        vals = [float(r[k]) for r in results if finite(r.get(k))]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        out[k] = {"mean": mean, "std": std, "n": len(vals)}
    return out
