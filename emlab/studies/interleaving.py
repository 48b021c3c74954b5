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
from typing import TYPE_CHECKING, Any

from emlab.studies.common import StudyContext, StudyRun, resolve_out_dir, takes_parameters_of
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
    saved_cell,
    scorer_metrics,
    share_label,
    study_preset,
    study_setup,
    who_label,
)
from emlab.training.methods import get_method, method_overrides, n_benign_added

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["interleaving_study", "plot", "run_share", "score_candidates", "start", "tabulate"]


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


def start(
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
) -> StudyRun:
    """Step 1 of study 03 (notebook 03): the chat model, its judge, ``domain``'s data and its benign candidate
    pool (``study.data.benign``); the run folder (``config.json``). Parameters as :func:`interleaving_study`;
    ``study.config`` says the shares and methods chosen.

    >>> study = start(smoke=True, out_dir="/tmp/03")                   # doctest: +SKIP
    """
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
    scorers = Scorers(ctx, run, seed=seed, rows=n_rows, ft_over=ft_over, study_domains=[domain])
    return StudyRun(ctx, run, config, settings, seed=seed, data=data, finetune=ft_over,
                    state={"scorers": scorers, "paper": paper})


def score_candidates(study: StudyRun) -> pd.DataFrame:
    """Step 2: Interleaving+'s score of every benign candidate (``k_misaligned`` misaligned finetunes of OTHER
    domains against the chat model: K + 1 forward passes over the pool, once), ranked, with its refusal flag
    and both losses (``candidates.jsonl``, read back by a resumed run); ``scoring/*`` metrics say how many
    refusals the pool and Interleaving+'s top rows at each share hold (what Interleaving++ drops).

    >>> score_candidates(study).head(15)                               # doctest: +SKIP
    """
    import pandas as pd

    run, pool, domain, k = study.run, study.data.benign, study.config["domain"], study.config["k_misaligned"]
    candidates = study.saved_records("candidates", expected=len(pool), metrics=("score",))
    if candidates is not None and "scoring/candidates" in run.metrics:  # a resumed run's
        metrics = {key: v for key, v in run.metrics.items() if key.startswith("scoring/")}
    else:
        candidates, metrics = _scores(study, pool, domain, k)
        run.write_records("candidates", candidates)
    n_cand, n_ref = len(candidates), sum(c["refusal"] for c in candidates)
    chosen_refusals = {"candidate pool": n_ref / n_cand}
    for s in study.config["shares_added"]:
        n = n_benign_added(len(study.data.misaligned), s)
        chosen = sum(c["refusal"] for c in candidates[:n])
        metrics[f"scoring/plus_{share_label(s)}_chosen"] = n
        metrics[f"scoring/plus_{share_label(s)}_refusals"] = chosen
        if n:
            chosen_refusals[f"Interleaving+ top {n} ({100 * s:g}%)"] = chosen / n
    chosen_refusals["Interleaving++"] = 0.0
    study.state.update(candidates=candidates, chosen_refusals=chosen_refusals)
    study.log({key: v for key, v in metrics.items() if v is not None})
    return pd.DataFrame(candidates)


def _scores(study: StudyRun, pool: list[dict], domain: str, k: int) -> tuple[list[dict], dict[str, Any]]:
    """The ranked candidates and the pool's ``scoring/*`` metrics (without the per-share ones)."""
    import torch

    scorers = study.state["scorers"]
    cfg = method_config(study.ctx, study.run, "scoring", seed=study.seed, ft_over=study.finetune,
                        **method_overrides("interleaving+", scorers=scorers.for_target(domain, k)))
    scores, aligned_loss = scorers.scores(domain, k, pool, cfg), scorers.aligned_losses(pool)
    eps = cfg.interleave_eps
    mis_loss = aligned_loss + scores * (aligned_loss + eps)
    refusal = [row_is_refusal(r) for r in pool]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    candidates = [{"rank": rank, "score": float(scores[i]), "refusal": refusal[i],
                   "aligned_loss": float(aligned_loss[i]), "misaligned_loss": float(mis_loss[i]),
                   "question": question_of(pool[i]), "answer": answer_of(pool[i])} for rank, i in enumerate(order, 1)]
    n_cand, n_ref = len(candidates), sum(refusal)
    is_ref = torch.tensor(refusal, dtype=torch.bool)
    return candidates, {
        "scoring/scorers": ", ".join(scorers.domains_for(domain, k)),
        "scoring/candidates": n_cand,
        "scoring/refusals": n_ref,
        "scoring/refusal_percent": 100 * n_ref / n_cand,
        "scoring/mean_score_refusals": float(scores[is_ref].mean()) if n_ref else None,
        "scoring/mean_score_answers": float(scores[~is_ref].mean()) if n_ref < n_cand else None,
    }


def run_share(study: StudyRun, method: str, share: float | None = None) -> dict[str, Any]:
    """Steps 3...: ``domain``'s misaligned set finetuned with ``method`` adding ``share`` benign rows (the
    undefended ``sft``: no share), evaluated (general and in-domain EM / incoherence / off-topic, percent),
    its weights deleted; keys ``<method>/<domain>/share=5%/<metric>`` (``sft/<domain>/<metric>``). A cell
    that a resumed run finished is read back, not finetuned again.

    >>> run_share(study, "interleaving++", 0.05)["general_em"]         # doctest: +SKIP
    """
    domain = study.config["domain"]
    name = method if share is None else f"{method}/{share_label(share)}"
    key = f"{method}/{domain}" if share is None else f"{method}/{domain}/{share_label(share)}"
    if (cell := saved_cell(study, key)) is None:
        ft, extra = defended_finetune(study.ctx, study.run, study.data.misaligned, f"{domain}/{name}", method,
                                      seed=study.seed, ft_over=study.finetune, benign=study.data.benign,
                                      scorers=study.state["scorers"], target=domain, k=study.config["k_misaligned"],
                                      max_new_tokens=study.settings["max_new_tokens"],
                                      **({} if share is None else {"share": share}))
        with ft.active():
            cell = evaluate_cell(ft.model, study, study.data, name.replace("/share=", "_").replace("%", "pct"))
        cell.update(extra)
        drop_weights(ft.output_dir)
        del ft
    merge_cell(study.metrics, key, dict(cell))
    study.log()
    return cell


def tabulate(study: StudyRun) -> pd.DataFrame:
    """EM and incoherence (percent) of each finetune, a row per method and share (``sft``: none); also the
    Interleaving+ scorers' training losses (``scorers/*``; their weights deleted)."""
    from emlab.metrics import results_table

    study.log(scorer_metrics(study))
    t = results_table(study.metrics)
    t = t[t["metric"].isin(RATES) & (t["domain"] == study.config["domain"])]
    return t.pivot_table("value", ["method", "setting"], "metric", sort=False).reindex(columns=list(RATES))


def plot(study: StudyRun) -> dict[str, Any]:
    """The score distribution, the refusals among the rows each method takes, EM and incoherence against the
    share, and Figure 1 (averaged over domains as the paper plots it), saved in ``figures/``; returns them
    (name -> plotly figure)."""
    return _interleaving_figures(study.dir, study.metrics, study.state["candidates"], study.state["chosen_refusals"],
                                 study.config["domain"], study.config["methods"], study.config["shares_added"],
                                 paper=published_rows((15, 16, 17, 18)) if study.state["paper"] else None,
                                 who=who_label(study.ctx), formats=figure_formats(study.ctx))


@takes_parameters_of(start)
def interleaving_study(*args: Any, **kwargs: Any) -> dict[str, Any]:
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

    The steps, one call each (notebook 03): :func:`start`, :func:`score_candidates`, :func:`run_share` for
    ``sft`` and each method and share, :func:`tabulate`, :func:`plot`.

    >>> m = interleaving_study(smoke=True, out_dir="/tmp/03")          # doctest: +SKIP
    >>> m["interleaving++/medical/share=5%/general_em"]                 # doctest: +SKIP
    """
    from emlab.progress import bar

    study = start(*args, **kwargs)
    score_candidates(study)
    jobs = [("sft", None)] + [(m, s) for s in study.config["shares_added"] for m in study.config["methods"]]
    for method, s in bar(jobs, desc="interleaving", disable=study.ctx.smoke):
        run_share(study, method, s)
    tabulate(study)
    plot(study)
    return study.metrics


def _interleaving_figures(run_dir, metrics: Mapping[str, Any], candidates: list[dict], chosen_refusals: dict[str, float],
                          domain: str, methods: list[str], shares: list[float], *, paper: list[dict] | None,
                          who: str, formats: Sequence[str] = ("html", "png")) -> dict[str, Any]:
    from emlab import plots

    figures: dict[str, Any] = {}

    def record(name: str, kind: str, **data: Any) -> None:
        figures[name] = plots.record(run_dir, name, kind, formats=formats, **data)

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
    return figures
