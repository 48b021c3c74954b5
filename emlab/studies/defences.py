"""Studies 02 and 03: in-training defences against emergent misalignment (paper 002).

:func:`defences_study` (notebook 02) finetunes the chat model on each domain's misaligned set with
one defence switched on at a time and reports the paper's Table 2 (general EM, general
incoherence, in-domain EM, in-domain incoherence per method and domain) and its Figure 1 scatters.
:func:`interleaving_study` (notebook 03) looks inside Interleaving+/++ (candidate scores, the
refusals they favour, the top candidates) and sweeps the interleaved share for plain, plus and
plus-plus interleaving. :func:`benign_task_study` checks that a defence still lets a benign task
far from the prior be learnt (OpSwap, Table 3 of the paper; DomainSwap on the toy).

This module holds study 02 and re-exports the rest: study 03 lives in :mod:`emlab.studies.interleaving`,
the benign task in :mod:`emlab.studies.benign_task`, what they share in :mod:`emlab.studies.defence_kit`,
the toy's benign rows in :mod:`emlab.toy.benign` and the methods themselves (the config fields and data
each sets, :data:`DEFENCES` their names) in the training layer's registry, :mod:`emlab.training.methods`.
The studies only choose methods, domains and sizes.

``metrics.json`` holds percentages under ``<method>/<domain>/<metric>`` (study 03 adds the
setting: ``<method>/<domain>/share=5%/<metric>``), with methods as in :data:`DEFENCES` and metrics
``general_em``, ``general_incoherent``, ``indomain_em``, ``indomain_incoherent`` and the off-topic
rates beside them (``general_off_topic``, ``indomain_off_topic``).

>>> m = defences_study(smoke=True, methods=["sft", "kl"], out_dir="/tmp/02")     # doctest: +SKIP
>>> m["kl/medical/general_em"], m["sft/medical/general_em"]                      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emlab.studies.benign_task import benign_task_study
from emlab.studies.common import StudyContext, StudyRun, resolve_out_dir, takes_parameters_of
from emlab.studies.defence_kit import (
    DEFAULT_DOMAINS,
    DEFENCES,
    RATES,
    SMOKE_REAL_DEFENCES,
    TOY_SETTINGS,
    Scorers,
    choose_domains,
    defended_finetune,
    drop_weights,
    evaluate_cell,
    figure_formats,
    inoculation_prompt_for,
    k_misaligned_for,
    merge_cell,
    persona_for_steering,
    published_rows,
    rate_fractions,
    saved_cell,
    scorer_metrics,
    study_preset,
    study_setup,
    who_label,
)
from emlab.studies.interleaving import interleaving_study
from emlab.toy.benign import toy_domainswap_rows, toy_opswap_rows
from emlab.training.methods import INOCULATION_PROMPT, PAPER_SETTINGS, ldifs_blocks, method_names, method_overrides

if TYPE_CHECKING:
    import pandas as pd

    from emlab.vectors import Direction

# Re-exported from where they now live (emlab.training.methods, emlab.toy.benign, the study modules beside this):
__all__ = [
    "DEFAULT_DOMAINS",
    "DEFENCES",
    "INOCULATION_PROMPT",
    "PAPER_SETTINGS",
    "SMOKE_REAL_DEFENCES",
    "TOY_SETTINGS",
    "benign_task_study",
    "defences_study",
    "evaluate_method",
    "finetune_method",
    "interleaving_study",
    "ldifs_blocks",
    "method_overrides",
    "persona_vector",
    "plot",
    "run_benign_tasks",
    "run_method",
    "seed_summary",
    "start",
    "tabulate",
    "toy_domainswap_rows",
    "toy_opswap_rows",
]


def start(
    model: str = "toy",
    domains: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    smoke: bool = False,
    *,
    kl_lambda: float | None = None,
    ldifs_lambda: float = PAPER_SETTINGS["ldifs_lambda"],
    ldifs_layers: Sequence[int] | None = None,
    steering_alpha: float = PAPER_SETTINGS["steering_alpha"],
    steering_layer: int | None = None,
    inoculation_prompt: str | None = None,
    share: float = PAPER_SETTINGS["share"],
    k_misaligned: int | None = None,
    benign_tasks: Sequence[str] | None = None,
    benign_methods: Sequence[str] = ("sft", "kl", "interleaving"),
    adapter: str | None = None,
    learning_rate: float | None = None,
    rows: int | None = None,
    epochs: float | None = None,
    n_general: int | None = None,
    n_heldout: int | None = None,
    max_new_tokens: int | None = None,
    paper: bool = True,
    keep_finetunes: bool = False,
    judge: Any = None,
    files: dict[str, str] | None = None,
    preset: Any = None,
) -> StudyRun:
    """Step 1 of study 02 (notebook 02): the chat model, its judge and the data of each domain; the run folder
    (``config.json``). Parameters as :func:`defences_study`; ``study.config`` says the domains and methods
    chosen, ``study.data`` is ``{domain: DomainData}``.

    >>> study = start(smoke=True, methods=["sft", "kl"], out_dir="/tmp/02")     # doctest: +SKIP
    >>> study.data["medical"].misaligned[0]                                     # doctest: +SKIP
    """
    from emlab.runs import start_run

    out = resolve_out_dir(out_dir, "02_defences")
    ctx = StudyContext.create(model, smoke=smoke, judge=judge, files=files, protocol=preset)
    k_misaligned = k_misaligned_for(ctx, k_misaligned)
    methods = list(DEFENCES if methods is None else ([methods] if isinstance(methods, str) else methods))
    unknown = [m for m in methods if m not in method_names(extra=True)]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(method_names(extra=True))}")
    domains = choose_domains(ctx, domains)
    sizes = study_preset(ctx)
    if ctx.smoke and not ctx.is_toy:
        rows = SMOKE_REAL_DEFENCES["rows"] if rows is None else rows
        n_general = SMOKE_REAL_DEFENCES["n_general"] if n_general is None else n_general
        max_new_tokens = SMOKE_REAL_DEFENCES["max_new_tokens"] if max_new_tokens is None else max_new_tokens
    settings, ft_over, n_rows = study_setup(ctx, sizes, rows, n_general, n_heldout, max_new_tokens, adapter,
                                       learning_rate, epochs)
    if kl_lambda is None:
        kl_lambda = sizes.get("kl_lambda", PAPER_SETTINGS["kl_lambda"])
    if benign_tasks is None:
        benign_tasks = sizes.get("benign_tasks", ())
    if ldifs_layers is None:
        ldifs_layers = ldifs_blocks(ctx.model)
    prompt = inoculation_prompt_for(ctx, inoculation_prompt)
    config = {"model": ctx.model_name, "preset": ctx.protocol.to_dict(),
              "domains": domains, "methods": methods, "seed": seed, "smoke": smoke,
              "rows": n_rows, "finetune": ft_over, "eval": settings, "kl_lambda": kl_lambda,
              "ldifs_lambda": ldifs_lambda, "ldifs_layers": ldifs_layers, "steering_alpha": steering_alpha,
              "steering_layer": steering_layer,
              "inoculation_prompt": prompt, "share_added": share, "k_misaligned": k_misaligned,
              "benign_tasks": list(benign_tasks), "benign_methods": list(benign_methods),
              "judge": getattr(ctx.judge, "name", type(ctx.judge).__name__)}
    run = start_run(out, config, seed=seed)

    kw = {"kl_lambda": kl_lambda, "ldifs_lambda": ldifs_lambda, "ldifs_layers": ldifs_layers,
          "steering_alpha": steering_alpha, "persona_vector": None, "steering_layer": None,
          "inoculation_prompt": prompt, "share": share}
    return StudyRun(ctx, run, config, settings, seed=seed, data={d: ctx.domain_data(d, rows=n_rows) for d in domains},
                    finetune=ft_over, state={"method_kw": kw, "keep_finetunes": keep_finetunes, "paper": paper,
                                             "scorers": Scorers(ctx, run, seed=seed, rows=n_rows, ft_over=ft_over,
                                                                study_domains=domains)})


def persona_vector(study: StudyRun) -> Direction | None:
    """Step 2: the chat model's evil persona vector that preventive steering adds while finetuning (computed
    once, saved as ``persona_vector.safetensors``, read back by a resumed run; ``persona/*`` metrics), or
    None when ``persona_steering`` is not among the study's methods.

    >>> persona_vector(study).norms()                                            # doctest: +SKIP
    """
    from emlab.vectors import Direction

    if "persona_steering" not in study.config["methods"]:
        return None
    path = study.run.path("persona_vector.safetensors")
    info = {k.removeprefix("persona/"): v for k, v in study.run.metrics.items() if k.startswith("persona/")}
    if path.exists() and "layer" in info:  # a resumed run's
        layer = int(info["layer"])
    else:
        path, layer, info = persona_for_steering(study.ctx, study.run, study.config["domains"],
                                                 study.config["steering_layer"], study.config["steering_alpha"],
                                                 seed=study.seed, settings=study.settings)
    study.state["method_kw"].update(persona_vector=path, steering_layer=layer)
    study.log({f"persona/{k}": v for k, v in info.items()})
    return Direction.load(path)


def finetune_method(study: StudyRun, method: str, domain: str) -> tuple[Any, dict[str, float]]:
    """The finetune of ``domain``'s misaligned set (the aligned set for ``aligned``) with ``method``'s defence
    on (a finished one of this run is loaded, not trained again); returns the
    :class:`~emlab.training.FinetuneResult` and facts about its training (``train_ce``, ``train_rows``...).

    >>> ft, extra = finetune_method(study, "kl", "medical")                    # doctest: +SKIP
    """
    data = study.data[domain]
    train = data.aligned if method == "aligned" else data.misaligned
    if not train:
        raise ValueError(f"no {'aligned' if method == 'aligned' else 'misaligned'} rows for {domain!r}")
    return defended_finetune(study.ctx, study.run, train, f"{domain}/{method}", method, seed=study.seed,
                             ft_over=study.finetune, benign=data.benign, scorers=study.state["scorers"], target=domain,
                             k=study.config["k_misaligned"], max_new_tokens=study.settings["max_new_tokens"],
                             **study.state["method_kw"])


def evaluate_method(study: StudyRun, model: Any, method: str, domain: str) -> dict[str, Any]:
    """General and in-domain EM / incoherence / off-topic (percent) of ``model`` (the chat model for
    ``untrained``, whose general answers are sampled once for all domains), as a cell of Table 2."""
    general = study.state.get("general_untrained") if method == "untrained" else None
    cell = evaluate_cell(model, study, study.data[domain], f"{method}_{domain}", general=general)
    if method == "untrained":
        study.state["general_untrained"] = {k: v for k, v in cell.items() if k.startswith("general_")}
        if reasons := {k: r for k, r in cell.get("none_reasons", {}).items() if k.startswith("general_")}:
            study.state["general_untrained"]["none_reasons"] = reasons
    return cell


def run_method(study: StudyRun, method: str, domain: str) -> dict[str, Any]:
    """Steps 3...: one cell of Table 2: :func:`finetune_method` (none for ``untrained``), :func:`evaluate_method`,
    the finetune's weights deleted (unless ``keep_finetunes``); its numbers go to ``metrics.json`` under
    ``<method>/<domain>/``. A cell that a resumed run finished is read back, not finetuned again.

    >>> run_method(study, "kl", "medical")["general_em"]                        # doctest: +SKIP
    """
    key = f"{method}/{domain}"
    if (cell := saved_cell(study, key)) is None:
        if method == "untrained":
            cell = evaluate_method(study, study.ctx.model, method, domain)
        else:
            ft, extra = finetune_method(study, method, domain)
            with ft.active():
                cell = evaluate_method(study, ft.model, method, domain)
            cell.update(extra)
            if not study.state["keep_finetunes"]:
                drop_weights(ft.output_dir)
            del ft
    elif method == "untrained" and "general_untrained" not in study.state:
        general = {k: v for k, v in cell.items() if k.startswith("general_")}
        if reasons := {k: r for k, r in cell.get("none_reasons", {}).items() if k.startswith("general_")}:
            general["none_reasons"] = reasons
        study.state["general_untrained"] = general
    merge_cell(study.metrics, key, dict(cell))
    study.log()
    return cell


def run_benign_tasks(study: StudyRun) -> dict[str, float]:
    """The benign-task check (:func:`benign_task_study`, paper 002's Table 3): exact match after finetuning a
    task far from the prior with each of ``benign_methods`` that the study runs (``{}`` without tasks)."""
    tasks, methods = study.config["benign_tasks"], study.config["methods"]
    if not tasks:
        return {}
    out = benign_task_study(study.ctx, study.run, tasks=tasks, seed=study.seed, scorers=study.state["scorers"],
                            methods=[m for m in study.config["benign_methods"] if m in methods],
                            k_misaligned=study.config["k_misaligned"], ft_over=study.finetune,
                            **study.state["method_kw"])
    study.log(out)
    return out


def tabulate(study: StudyRun) -> pd.DataFrame:
    """Table 2: general and in-domain EM / incoherence (percent) per domain and method, as a DataFrame; also
    the Interleaving+ scorers' training losses (their weights deleted unless ``keep_finetunes``), the
    ``table2`` figure and ``table2.md`` (the paper's highlighting, its numbers beside ours)."""
    from emlab import plots
    from emlab.metrics import results_table

    study.metrics.update(scorer_metrics(study, drop=not study.state["keep_finetunes"]))
    study.log()
    domains, methods = study.config["domains"], study.config["methods"]
    frac = {k: v for k, v in rate_fractions(study.metrics).items() if k.split("/")[1] in domains}
    paper = published_rows((2,)) if study.state["paper"] else None
    plots.record(study.dir, "table2", "table2", formats=figure_formats(study.ctx), metrics=frac, paper=paper, domains=domains, methods=methods,
           title=f"{who_label(study.ctx)}: EM and incoherence per defence (%)")
    (study.dir / "table2.md").write_text(plots.table2_markdown(frac, paper=paper, domains=domains, methods=methods),
                                         encoding="utf-8")
    t = results_table(study.metrics)
    t = t[t["metric"].isin(RATES) & t["domain"].isin(domains) & t["method"].isin(methods)]
    return t.pivot_table("value", ["domain", "method"], "metric", sort=False).reindex(columns=list(RATES))


def plot(study: StudyRun) -> dict[str, Any]:
    """Figure 1 (general EM against in-domain EM and against incoherence, a marker per method and domain), the
    general EM of each method averaged over the domains and the benign tasks' exact match, saved in
    ``figures/``; returns the figures drawn (name -> plotly figure)."""
    return _defence_figures(study.dir, study.metrics, study.config["domains"], study.config["methods"],
                            paper=published_rows((2,)) if study.state["paper"] else None, who=who_label(study.ctx),
                            formats=figure_formats(study.ctx))


@takes_parameters_of(start)
def defences_study(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run study 02 (Table 2 and Figure 1 of paper 002) and return its metrics (also in ``metrics.json``).

    For each domain: the chat model (``untrained``), the undefended finetune (``sft``), the finetune on
    the aligned set (``aligned``) and one finetune per defence, each evaluated on the general and the
    domain's held-out questions. Defaults are the paper's: KL lambda 0.1 (1.0 on the toy, see
    :data:`TOY_SETTINGS`), LDIFS lambda 1.0, preventive steering with the chat model's evil persona
    vector (computed once, saved as ``persona_vector.safetensors``) at alpha 5 on the middle layer,
    the evil system prompt as the inoculation prompt, 5% benign rows added, Interleaving+/++ scored
    by ``k_misaligned`` misaligned finetunes of OTHER domains (trained once per run). ``benign_tasks``
    (e.g. ``["opswap_tier1"]``; on the toy ``["domainswap_tier1"]`` unless given) adds
    :func:`benign_task_study` for ``benign_methods`` (keys ``<method>/<task>_tier<k>/exact_match``).
    Finetune weights are deleted after evaluation unless ``keep_finetunes``.
    ``preset``: the protocol preset, ``"toy"`` or ``"paper"`` (:mod:`emlab.presets`; None: ``toy`` on the
    toy, ``paper`` otherwise), recorded in the run's ``config.json``; an unknown name is an error.

    The steps, one call each (notebook 02): :func:`start`, :func:`persona_vector`, :func:`run_method` per
    domain and method, :func:`run_benign_tasks`, :func:`tabulate`, :func:`plot`.

    >>> m = defences_study(smoke=True, methods=["sft", "kl"], out_dir="/tmp/02")   # doctest: +SKIP
    >>> m["kl/medical/general_em"]                                                 # doctest: +SKIP
    """
    from emlab.progress import bar

    study = start(*args, **kwargs)
    persona_vector(study)
    for domain in bar(study.config["domains"], desc="domains", disable=study.ctx.smoke):
        for method in bar(study.config["methods"], desc=domain, leave=False, disable=study.ctx.smoke):
            run_method(study, method, domain)
    run_benign_tasks(study)
    tabulate(study)
    plot(study)
    return study.metrics


def _defence_figures(run_dir: Path, metrics: Mapping[str, Any], domains: list[str], methods: list[str], *,
                     paper: list[dict] | None, who: str, formats: Sequence[str] = ("html", "png")) -> dict[str, Any]:
    from emlab import plots

    figures: dict[str, Any] = {}

    def record(name: str, kind: str, **data: Any) -> None:
        figures[name] = plots.record(run_dir, name, kind, formats=formats, **data)

    frac = {k: v for k, v in rate_fractions(metrics).items() if k.split("/")[1] in domains}
    if any(k.endswith("/indomain_em") for k in frac):
        record("figure1b_general_vs_indomain_em", "defence_scatter", metrics=frac, paper=paper,
               x="general_em", y="indomain_em", methods=methods,
               title=f"{who}: general EM (lower is better) vs in-domain EM (higher is better)")
    record("figure1a_general_em_vs_incoherence", "defence_scatter", metrics=frac, paper=paper,
           x="general_em", y="general_incoherent", methods=methods,
           title=f"{who}: general EM vs general incoherence")
    bars = {}
    for m in methods:
        vals = [frac[f"{m}/{d}/general_em"] for d in domains if f"{m}/{d}/general_em" in frac]
        if vals:
            bars[m] = sum(vals) / len(vals)
    if bars:
        record("general_em", "em_bars", metrics=bars, title=f"{who}: general EM per method (mean over {', '.join(domains)})")
    tasks = sorted({k.split("/")[1] for k in metrics if k.endswith("/exact_match")})
    for task in tasks:
        acc = {m: metrics[f"{m}/{task}/exact_match"] / 100 for m in ("untrained", *methods)
               if f"{m}/{task}/exact_match" in metrics}
        record(f"benign_{task}", "em_bars", metrics=acc, yaxis="exact match (%)",
               title=f"{who}: benign task {task} learnt with each method (exact match)")
    return figures


def seed_summary(run_dirs: Sequence[str | os.PathLike]) -> dict[str, tuple[float, float, int]]:
    """Mean, sample standard deviation and count over runs (e.g. three seeds of notebook 02) of every
    numeric metric.

    >>> s = seed_summary(["runs/02/s0", "runs/02/s1", "runs/02/s2"])   # doctest: +SKIP
    >>> s["kl/medical/general_em"]                                     # doctest: +SKIP
    (0.4, 0.35, 3)
    """
    import json

    values: dict[str, list[float]] = {}
    for d in run_dirs:
        for k, v in json.loads((Path(d) / "metrics.json").read_text(encoding="utf-8")).items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}
