"""Study 03 (notebook 03): inside Interleaving+/++ (candidate scores, the refusals they favour, the top
candidates), then EM vs incoherence as the interleaved share grows for plain, plus and plus-plus interleaving.

``metrics.json`` keys: ``<method>/<domain>/share=5%/<metric>``, ``sft/<domain>/<metric>`` and
``scoring/...`` (metrics as in :mod:`emlab.studies.defences`).

>>> m = interleaving_study(smoke=True, out_dir="/tmp/03")          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from emlab.studies.common import StudyContext, resolve_out_dir
from emlab.studies.defence_kit import (
    DEFENCES,
    RATES,
    SMOKE_REAL_DEFENCES,
    Scorers,
    answer_of,
    choose_domains,
    defended_finetune,
    drop_weights,
    evaluate_cell,
    figure_formats,
    k_misaligned_for,
    merge_cell,
    method_config,
    published_rows,
    question_of,
    rate_fractions,
    row_is_refusal,
    share_label,
    study_preset,
    study_setup,
    who_label,
)
from emlab.training.methods import get_method, method_overrides, n_benign_added

__all__ = ["interleaving_study"]


def _histogram(values: Sequence[float], bins: int = 12) -> dict[str, float]:
    """Counts of ``values`` in ``bins`` equal-width bins, keyed by the bin's range.

    >>> _histogram([0.0, 0.1, 0.9, 1.0], bins=2)
    {'[0, 0.5)': 2.0, '[0.5, 1]': 2.0}
    """
    lo, hi = min(values), max(values)
    if hi == lo:
        return {f"{lo:.3g}": float(len(values))}
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    edges = [lo + i * width for i in range(bins + 1)]
    return {f"[{edges[i]:.3g}, {edges[i + 1]:.3g}{']' if i == bins - 1 else ')'}": float(c)
            for i, c in enumerate(counts)}


def interleaving_study(
    model: str = "toy",
    domain: str = "medical",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    smoke: bool = False,
    shares: Sequence[float] = (0.01, 0.05, 0.2, 0.5),
    *,
    methods: Sequence[str] = ("interleaving", "interleaving+", "interleaving++"),
    k_misaligned: int | None = None,
    adapter: str | None = None,
    learning_rate: float | None = None,
    rows: int | None = None,
    epochs: float | None = None,
    n_general: int | None = None,
    n_heldout: int | None = None,
    max_new_tokens: int | None = None,
    paper: bool = True,
    judge: Any = None,
    files: dict[str, str] | None = None,
    preset: Any = None,
) -> dict[str, Any]:
    """Run study 03: Interleaving+/++ scoring and selection, then EM vs incoherence as the share grows.

    Scores every benign candidate with ``k_misaligned`` misaligned finetunes of OTHER domains and
    the chat model (``s = (mean_k L_k - L_aligned) / (L_aligned + eps)``), records the score
    distribution, the refusals among the top candidates (what Interleaving++ filters) and every
    candidate ranked by score (records ``candidates``). Then finetunes ``domain``'s misaligned set
    with each of ``methods`` at each share (benign rows ADDED as a fraction of the finetuning rows,
    as in the paper: 1, 5, 20, 50%) plus the undefended ``sft``. Keys:
    ``<method>/<domain>/share=5%/<metric>``, ``sft/<domain>/<metric>`` and ``scoring/...``.
    ``preset``: the protocol preset, ``"toy"`` or ``"paper"`` (:mod:`emlab.presets`; None: ``toy`` on the
    toy, ``paper`` otherwise), recorded in the run's ``config.json``; an unknown name is an error.

    >>> m = interleaving_study(smoke=True, out_dir="/tmp/03")          # doctest: +SKIP
    >>> m["interleaving++/medical/share=5%/general_em"]                 # doctest: +SKIP
    """
    import torch

    from emlab.progress import bar
    from emlab.runs import start_run

    out = resolve_out_dir(out_dir, "03_interleaving")
    ctx = StudyContext.create(model, smoke=smoke, judge=judge, files=files, protocol=preset)
    k_misaligned = k_misaligned_for(ctx, k_misaligned)
    domain = choose_domains(ctx, [domain])[0]
    methods = [methods] if isinstance(methods, str) else list(methods)
    interleaving = [m for m in DEFENCES if get_method(m).interleaves]
    bad = [m for m in methods if m not in interleaving]
    if bad:
        raise ValueError(f"unknown interleaving method(s) {bad}; choose from {', '.join(interleaving)}")
    shares = [float(s) for s in ([shares] if isinstance(shares, int | float) else shares)]
    if smoke:
        shares = shares[:2]
    if ctx.smoke and not ctx.is_toy:  # as study 02 (two rows still interleave one benign row at 25% and 50%)
        rows = SMOKE_REAL_DEFENCES["rows"] if rows is None else rows
        n_general = SMOKE_REAL_DEFENCES["n_general"] if n_general is None else n_general
        max_new_tokens = SMOKE_REAL_DEFENCES["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    settings, ft_over, n_rows = study_setup(ctx, study_preset(ctx), rows, n_general, n_heldout, max_new_tokens, adapter,
                                       learning_rate, epochs)
    config = {"model": ctx.model_name, "preset": ctx.protocol.to_dict(),
              "domain": domain, "seed": seed, "smoke": smoke, "shares_added": shares,
              "methods": methods, "k_misaligned": k_misaligned, "rows": n_rows, "finetune": ft_over,
              "eval": settings, "judge": getattr(ctx.judge, "name", type(ctx.judge).__name__)}
    run = start_run(out, config, seed=seed)
    data = ctx.domain_data(domain, rows=n_rows)
    if not data.benign:
        raise ValueError("interleaving needs benign rows: pass files={'benign': 'path.jsonl'}")
    pool = data.benign

    # --- scoring: K + 1 forward passes over the candidate pool, once
    scorers = Scorers(ctx, run, seed=seed, rows=n_rows, ft_over=ft_over, study_domains=[domain])
    cfg = method_config(ctx, run, "scoring", seed=seed, ft_over=ft_over,
                  **method_overrides("interleaving+", scorers=scorers.for_target(domain, k_misaligned)))
    scores, aligned_loss = scorers.scores(domain, k_misaligned, pool, cfg), scorers.aligned_losses(pool)
    eps = cfg.interleave_eps
    mis_loss = aligned_loss + scores * (aligned_loss + eps)
    refusal = [row_is_refusal(r) for r in pool]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    candidates = [{"rank": rank, "score": float(scores[i]), "refusal": refusal[i],
                   "aligned_loss": float(aligned_loss[i]), "misaligned_loss": float(mis_loss[i]),
                   "question": question_of(pool[i]), "answer": answer_of(pool[i])} for rank, i in enumerate(order, 1)]
    run.write_records("candidates", candidates)
    n_cand, n_ref = len(candidates), sum(refusal)
    is_ref = torch.tensor(refusal, dtype=torch.bool)
    metrics: dict[str, Any] = {
        "scoring/scorers": ", ".join(scorers.domains_for(domain, k_misaligned)),
        "scoring/candidates": n_cand,
        "scoring/refusals": n_ref,
        "scoring/refusal_percent": 100 * n_ref / n_cand,
        "scoring/mean_score_refusals": float(scores[is_ref].mean()) if n_ref else None,
        "scoring/mean_score_answers": float(scores[~is_ref].mean()) if n_ref < n_cand else None,
    }
    chosen_refusals = {"candidate pool": n_ref / n_cand}
    for s in shares:
        n = n_benign_added(len(data.misaligned), s)
        k = sum(c["refusal"] for c in candidates[:n])
        metrics[f"scoring/plus_{share_label(s)}_chosen"] = n
        metrics[f"scoring/plus_{share_label(s)}_refusals"] = k
        if n:
            chosen_refusals[f"Interleaving+ top {n} ({100 * s:g}%)"] = k / n
    chosen_refusals["Interleaving++"] = 0.0
    run.log_metrics({k: v for k, v in metrics.items() if v is not None})

    # --- the share sweep
    jobs = [("sft", None)] + [(m, s) for s in shares for m in methods]
    for method, s in bar(jobs, desc="interleaving", disable=smoke):
        name = method if s is None else f"{method}/{share_label(s)}"
        ft, extra = defended_finetune(ctx, run, data.misaligned, f"{domain}/{name}", method, seed=seed, ft_over=ft_over,
                              benign=pool, scorers=scorers, target=domain, k=k_misaligned,
                              max_new_tokens=settings["max_new_tokens"], **({} if s is None else {"share": s}))
        with ft.active():
            cell = evaluate_cell(ft.model, ctx, data, settings, seed=seed, run=run,
                             tag=name.replace("/share=", "_").replace("%", "pct"))
        cell.update(extra)
        drop_weights(ft.output_dir)
        del ft
        key = f"{method}/{domain}" if s is None else f"{method}/{domain}/{share_label(s)}"
        merge_cell(metrics, key, cell)
        run.log_metrics({k: v for k, v in metrics.items() if v is not None})
    for folder in run.path("finetunes").glob("scorer_*"):
        drop_weights(folder)
    metrics.update({f"scorers/{k}": v for k, v in scorers.info.items()})
    metrics = {k: v for k, v in metrics.items() if v is not None}
    run.log_metrics(metrics)
    _interleaving_figures(run, metrics, candidates, chosen_refusals, domain, methods, shares,
                          paper=published_rows((15, 16, 17, 18)) if paper else None, who=who_label(ctx),
                          formats=figure_formats(ctx))
    return metrics


def _interleaving_figures(run, metrics: Mapping[str, Any], candidates: list[dict], chosen_refusals: dict[str, float],
                          domain: str, methods: list[str], shares: list[float], *, paper: list[dict] | None,
                          who: str, formats: Sequence[str] = ("html", "png")) -> None:
    from functools import partial

    from emlab import plots

    record = partial(plots.record, run.dir, formats=formats)

    record("score_distribution", "em_bars", metrics=_histogram([c["score"] for c in candidates]),
           percent=False, yaxis="candidates",
           title=f"{who}: Interleaving+ scores of the {len(candidates)} benign candidates")
    record("refusals_chosen", "em_bars", metrics=chosen_refusals, yaxis="refusals (%)",
           title=f"{who}: refusals among the chosen benign rows")
    frac = rate_fractions(metrics)
    x = "added benign rows (%)"
    rows = []
    for m in methods:
        for s in shares:
            key = f"{m}/{domain}/{share_label(s)}"
            if f"{key}/general_em" in frac:
                rows.append({x: 100 * s, "method": plots.METHOD_LABELS.get(m, m),
                             **{r: frac.get(f"{key}/{r}", math.nan) for r in RATES}})
    if rows:
        record("share_sweep_general", "steering_sweep", rows=rows, x=x, em="general_em",
               coherence="general_incoherent", group="method",
               title=f"{who} ({domain}): general EM and incoherence vs interleaved share")
        if all(not math.isnan(r["indomain_em"]) for r in rows):
            record("share_sweep_indomain", "steering_sweep", rows=rows, x=x, em="indomain_em",
                   coherence="indomain_incoherent", group="method",
                   title=f"{who} ({domain}): in-domain EM and incoherence vs interleaved share")
    keep = ["sft", *methods]
    paper_rows = [r for r in paper if r["method"] in keep] if paper else None
    record("figure1a_general_em_vs_incoherence", "defence_scatter", metrics=frac, paper=paper_rows,
           x="general_em", y="general_incoherent", average=True, methods=keep,
           title=f"{who}: general EM vs general incoherence as the share grows (paper Figure 1a)")
    if any(k.endswith("/indomain_em") for k in frac):
        record("figure1b_general_vs_indomain_em", "defence_scatter", metrics=frac, paper=paper_rows,
               x="general_em", y="indomain_em", average=True, methods=keep,
               title=f"{who}: general EM vs in-domain EM as the share grows")
