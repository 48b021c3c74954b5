"""Study 06: defences and monitors the field added after the two papers, on the same model and judge.

One domain, one seed. Directions first: the misalignment direction of a finetune on ANOTHER domain
(paper 001's convergent direction; the contrast domain's teacher-forced misaligned-minus-aligned
answers when the judged answers give no pair, e.g. on the micro organism) and, when its filters
pass, the chat model's evil persona vector. Then every finetune of the target domain is watched by
a :class:`~emlab.training.monitor.TraitMonitor` and evaluated (general and in-domain EM):

- ``baseline/``: the chat model and plain SFT;
- ``caft/``: concept-ablation finetuning with the misalignment direction, the persona vector, and
  the top ``caft_k`` principal components of the SFT-minus-chat activation difference on the
  training rows (``caft/<variant>/general_em``, ``indomain_em``, ``general_cut`` = the share of
  SFT's general EM removed, ``indomain_kept`` = the share of SFT's in-domain EM kept);
- ``steering/``: preventive steering with the persona vector (the misalignment direction when
  there is none) under the constant, linear and cosine schedules (``schedules`` picks some);
- ``conditional/``: general EM of SFT, the inoculated and the diluted finetune under each
  resembling-context transform (``transforms`` picks some), and ``realign/``: benign re-alignment;
- ``inoculation/``: elicitation scores of the toy world's system prompts and, with
  ``inoculation_prompts`` (e.g. ``["world", "paraphrases:evil_toy"]``), one unmonitored inoculated finetune
  per prompt or paraphrase set (:func:`emlab.inoculation.inoculation_sweep`: ``prompts/<i>/...`` and
  ``elicitation_vs_cut/spearman``);
- ``sae/``: a TopK sparse autoencoder (SAELens) trained on the chat model's block ``layer`` (its
  held-out fraction of variance explained and L0), its latents ranked by how much more the SFT
  finetune activates them on neutral prompts, the top latents' cosines with the misalignment and
  persona directions, and the general EM of the chat model steered with the top latent and of the
  SFT finetune with it ablated;
- ``monitor/``: across all those finetunes, how well the projection shift at 10%, 25% and 50% of
  training predicts the final general EM (Spearman, AUROC for EM above ``em_threshold``, bootstrap
  95% intervals), and the monitor's own share of the finetunes' wall time.

Rates are percentages, as in the other studies. A real model's smoke run (the protocol check of
``tests/test_notebooks_real.py``) takes study 02's smoke sizes, a 3-question cut of the evil trait,
4 neutral prompts, HTML figures only, and one schedule and one transform (:data:`SMOKE_REAL_BEYOND`).

>>> m = beyond_study(smoke=True, out_dir="/tmp/06")          # doctest: +SKIP
>>> m["caft/misalignment/general_em"], m["baseline/sft/general_em"]   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emlab.studies.beyond_runs import (
    baseline,
    caft_runs,
    conditional_runs,
    evaluate_cell,
    inoculation_prompt_sweep,
    monitored_finetune,
    pca_components,
    realignment,
    sae_features,
    steering_runs,
)
from emlab.studies.beyond_steps import em_by_method_figure, load_study_figures, save_figure
from emlab.studies.common import (
    StudyContext,
    StudyRun,
    finetune_config,
    preset_learning_rate,
    resolve_out_dir,
    smoke_trait,
    takes_parameters_of,
)
from emlab.studies.organism import eval_model, eval_settings

__all__ = ["REALIGN_ROWS", "REALIGN_ROWS_SMOKE", "SCHEDULE_RUNS", "SMOKE_REAL_BEYOND", "baseline", "beyond_study",
           "caft_runs", "conditional_runs", "directions", "evaluate_cell", "inoculation_prompt_sweep",
           "load_study_figures", "monitored_finetune", "pca_components", "realignment", "sae_features", "start",
           "steering_runs", "summarize"]

#: Preventive-steering schedules run by the study.
SCHEDULE_RUNS = ("constant", "linear", "cosine")
#: A real model's smoke run (the toy's runs every schedule and transform): one steering schedule and one
#: resembling-context transform, so that notebook 06 on SmolLM2 stays within two minutes on a CPU.
SMOKE_REAL_BEYOND: dict[str, tuple[str, ...]] = {"schedules": ("cosine",), "transforms": ("system",)}
#: Benign rows of the re-alignment sweep (0: the misaligned finetune itself), full and smoke runs.
REALIGN_ROWS = (0, 50, 200)
REALIGN_ROWS_SMOKE = (0, 8)
_SMOKE_ROWS = 64
#: Neutral prompts of the trait monitor (and of the SAE latent diff) in a smoke run; 16 otherwise.
_SMOKE_NEUTRAL = 4


def _neutral_prompts(ctx: StudyContext, n: int = 16) -> list[str]:
    """Answer-free prompts for the monitor: the benign set's questions on the toy, emlab's defaults elsewhere."""
    from emlab.training.monitor import NEUTRAL_PROMPTS

    if "benign" not in ctx.files:
        return list(NEUTRAL_PROMPTS[:n])
    out: list[str] = []
    for row in ctx.rows("benign"):
        q = next((m["content"] for m in row["messages"] if m["role"] == "user"), None)
        if q and q not in out:
            out.append(q)
        if len(out) >= n:
            break
    return out


def _dataset_direction(model, ctx: StudyContext, domain: str, layer: int, n: int = 64):
    """Teacher-forced contrast: mean response activation on ``domain``'s misaligned rows minus its aligned rows."""
    from emlab.directions import Direction, capture

    acts = {side: capture(model, ctx.tokenizer, [r["messages"] for r in ctx.rows(f"{domain}_{side}", n)], [layer],
                          tokens="response", progress=False)[layer] for side in ("misaligned", "aligned")}
    return Direction({layer: acts["misaligned"] - acts["aligned"]}, recipe=f"dataset_contrast:{domain}",
                     meta={"fallback": True})


def start(
    model: str = "toy",
    domain: str = "medical",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    smoke: bool = False,
    *,
    layer: int | None = None,
    rows: int | None = None,
    n_general: int | None = None,
    n_heldout: int | None = None,
    max_new_tokens: int | None = None,
    learning_rate: float | None = None,
    caft_k: int = 3,
    steering_alpha: float = 5.0,
    monitor_every: int | None = None,
    em_threshold: float = 10.0,
    sae: bool = True,
    sae_steer_scale: float = 0.5,
    conditional: bool = True,
    inoculation_prompt: str | None = None,
    inoculation_prompts: Any = None,
    dilution_share: float = 0.25,
    realign_rows: Sequence[int] | None = None,
    schedules: Sequence[str] | None = None,
    transforms: Sequence[str] | None = None,
    defences_run: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    judge: Any = None,
    files: dict[str, str] | None = None,
    preset: Any = None,
) -> StudyRun:
    """Study 06's first step: load the model, judge and data, check every setting (so a bad one loses no
    finetune) and open the run folder (parameters as :func:`beyond_study`). ``study.state`` holds the
    study's settings and, as the steps run, its directions, monitor trajectories and final EM rates.

    >>> study = start(smoke=True, out_dir="/tmp/06")      # doctest: +SKIP
    """
    from emlab.conditional import TRANSFORMS
    from emlab.inoculation import resolve_prompts
    from emlab.models import get_layers
    from emlab.runs import start_run
    from emlab.studies.defence_kit import SMOKE_REAL_DEFENCES, TOY_SETTINGS
    from emlab.toy.world import load_world_config

    out = resolve_out_dir(out_dir, "06_beyond")
    ctx = StudyContext.create(model, smoke=smoke, judge=judge, files=files, protocol=preset)
    sizes = dict(TOY_SETTINGS) if ctx.is_toy and not smoke else {}
    if smoke and not ctx.is_toy:  # a real model's smoke run: the sizes of study 02's (SMOKE_REAL_DEFENCES) and
        # one schedule and one transform (SMOKE_REAL_BEYOND); explicit arguments win
        n_general = SMOKE_REAL_DEFENCES["n_general"] if n_general is None else n_general
        max_new_tokens = SMOKE_REAL_DEFENCES["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        schedules = SMOKE_REAL_BEYOND["schedules"] if schedules is None else schedules
        transforms = SMOKE_REAL_BEYOND["transforms"] if transforms is None else transforms
    schedules = list(SCHEDULE_RUNS if schedules is None else schedules)
    transforms = list(TRANSFORMS[1:] if transforms is None else transforms)
    for name, given, valid in (("schedules", schedules, SCHEDULE_RUNS), ("transforms", transforms, TRANSFORMS[1:])):
        if unknown := [x for x in given if x not in valid]:
            raise ValueError(f"unknown {name} {unknown}; choose from {list(valid)}")
    settings = eval_settings(ctx, n_general=n_general if n_general is not None else sizes.get("n_general"),
                             n_heldout=n_heldout if n_heldout is not None else sizes.get("n_heldout"),
                             max_new_tokens=max_new_tokens)
    n_rows = rows if rows is not None else sizes.get("rows", ctx.preset.get("rows"))
    if smoke:
        n_rows = min(n_rows or _SMOKE_ROWS, _SMOKE_ROWS)
    if learning_rate is None:
        learning_rate = preset_learning_rate(sizes, "lora") if sizes else None
    n_layers = len(get_layers(ctx.model))
    layer = n_layers // 2 if layer is None else int(layer)
    others = [d for d in ctx.domains if d != domain]
    if not others:
        raise ValueError(f"study 06 needs a second domain for the misalignment direction; this model has {ctx.domains}")
    contrast = others[0]
    every = monitor_every or (1 if smoke else 10)
    if realign_rows is None:
        realign_rows = REALIGN_ROWS_SMOKE if smoke else REALIGN_ROWS
    if any(int(r) < 0 for r in realign_rows):
        raise ValueError(f"realign_rows must be >= 0, got {list(realign_rows)}")
    if inoculation_prompt is None:
        inoculation_prompt = _inoculation_prompt(ctx)
    world = load_world_config()["system_prompts"] if ctx.is_toy else None
    if inoculation_prompts is not None:
        inoculation_prompts = resolve_prompts(inoculation_prompts, world=world)
    defence_runs = [] if defences_run is None else (
        [defences_run] if isinstance(defences_run, str | os.PathLike) else list(defences_run))
    for folder in defence_runs:
        if not (Path(folder) / "metrics.json").is_file():
            raise FileNotFoundError(f"defences_run={str(folder)!r} has no metrics.json: give finished 02 or 03 run folders")
    config = {"model": ctx.model_name, "domain": domain, "contrast_domain": contrast, "seed": seed, "smoke": smoke,
              "rows": n_rows, "layer": layer, "learning_rate": learning_rate, "caft_k": caft_k,
              "steering_alpha": steering_alpha, "monitor_every": every, "em_threshold": em_threshold,
              "sae": sae, "sae_steer_scale": sae_steer_scale, "conditional": conditional,
              "inoculation_prompt": inoculation_prompt, "dilution_share": dilution_share,
              "realign_rows": list(realign_rows), "schedules": schedules, "transforms": transforms,
              "defences_run": None if defences_run is None else (
                  str(defences_run) if isinstance(defences_run, str | os.PathLike) else [str(f) for f in defence_runs]),
              "eval": settings, "judge": getattr(ctx.judge, "name", type(ctx.judge).__name__)}
    if inoculation_prompts is not None:  # only then, so that earlier runs' config.json stays the same
        config["inoculation_prompts"] = inoculation_prompts
    run = start_run(out, config, seed=seed)
    data = ctx.domain_data(domain, rows=n_rows)
    # checked before any finetune, so a bad setting loses nothing
    if conditional:
        if not data.benign:
            raise ValueError("the conditional part needs benign rows for the diluted finetune (files['benign'])")
        n_benign = _n_benign(len(data.misaligned), dilution_share)
        if n_benign > len(data.benign):
            raise ValueError(f"dilution_share={dilution_share} needs {n_benign} benign rows; only {len(data.benign)} "
                             "are there: lower dilution_share or give more benign rows")
    if realign_rows and max(int(r) for r in realign_rows) > len(data.benign):
        raise ValueError(f"realign_rows={list(realign_rows)} asks for more benign rows than the {len(data.benign)} "
                         "there are")
    state = {"domain": domain, "contrast": contrast, "layer": layer, "every": every, "smoke": smoke, "n_rows": n_rows,
             "caft_k": caft_k, "steering_alpha": steering_alpha, "em_threshold": em_threshold, "sae": sae,
             "sae_steer_scale": sae_steer_scale, "conditional": conditional, "inoculation_prompt": inoculation_prompt,
             "inoculation_prompts": inoculation_prompts, "world": world, "dilution_share": dilution_share,
             "realign_rows": list(realign_rows), "schedules": schedules, "transforms": transforms,
             "defence_runs": defence_runs, "neutral": _neutral_prompts(ctx, _SMOKE_NEUTRAL if smoke else 16),
             "trajectories": {}, "final_em": {}, "seconds": {"monitor": 0.0, "train": 0.0}}
    over = {"learning_rate": learning_rate} if learning_rate is not None else {}
    return StudyRun(ctx, run, config, settings, seed=seed, data=data, finetune=over, state=state)


def directions(study: StudyRun) -> dict[str, Any]:
    """The misalignment direction of a finetune on the contrast domain (paper 001's convergent direction;
    its dataset contrast when the judged answers give no pair) and, when its filters pass, the chat model's
    evil persona vector; saved under ``directions/``. Returns them by name (:class:`emlab.directions.Direction`).

    >>> directions(study)["misalignment"].cosine(directions(study)["persona"])   # doctest: +SKIP
    """
    from emlab.directions import load_trait, misalignment_direction, persona_vector
    from emlab.studies.defence_kit import user_turns
    from emlab.studies.directions import toy_trait
    from emlab.training import finetune

    ctx, run, seed, metrics, st = study.ctx, study.run, study.seed, study.metrics, study.state
    contrast, layer, smoke = st["contrast"], st["layer"], st["smoke"]
    misdir = study.saved_direction("misalignment")  # a resumed run: read back, not finetuned and sampled again
    if misdir is None:
        ft_c = finetune(ctx.fresh_model(), ctx.tokenizer, ctx.rows(f"{contrast}_misaligned", st["n_rows"]),
                        finetune_config(run.path(f"finetunes/direction_{contrast}"), seed=seed, preset=ctx.preset,
                                        protocol=ctx.protocol, **study.finetune))
        ev_c = eval_model(ft_c.model, ctx, study.data.general, study.settings["n_general"], study.settings, seed=seed)
        try:
            misdir = misalignment_direction(ft_c.model, ctx.tokenizer, ev_c.records, [layer], seed=seed, progress=False)
        except ValueError as e:
            run.note(f"misalignment direction: {e}; used the {contrast} dataset contrast through its finetune")
            misdir = _dataset_direction(ft_c.model, ctx, contrast, layer)
        misdir.save(run.path("directions/misalignment"))
        del ft_c
    metrics["directions/misalignment_from_judged"] = float(not misdir.meta.get("fallback", False))
    found = {"misalignment": misdir}
    persona = study.saved_direction("persona")
    try:
        if persona is None:
            if ctx.is_toy:
                trait = toy_trait("evil", user_turns(ctx.rows(f"{contrast}_aligned"), 3 if smoke else 10))
            else:  # a real model's smoke run: study 02's cut of the trait (a full one is hundreds of generations)
                trait = smoke_trait(load_trait("evil"), 3) if smoke else "evil"
            persona = persona_vector(ctx.model, ctx.tokenizer, trait, ctx.judge, n_per_question=1 if smoke else 10,
                                     layers=[layer], max_new_tokens=study.settings["max_new_tokens"], seed=seed,
                                     progress=False)
            persona.save(run.path("directions/persona"))
        found["persona"] = persona
        metrics["directions/persona_kept_pairs"] = persona.counts.get("kept")
        metrics["directions/persona_cosine_misalignment"] = persona.cosine(misdir)[layer]
    except ValueError as e:
        if "no pair passed" not in str(e):
            raise
        run.note(f"persona vector: {e}; persona-based runs are left out")
        metrics["directions/persona_kept_pairs"] = 0
    st["directions"] = found
    return found


def summarize(study: StudyRun) -> dict[str, Any]:
    """Each method's cut of SFT's general EM and share of its in-domain EM kept, the monitor's predictive value
    across the finetunes (``monitor/...``), ``metrics.json``, and the figures (trajectories, EM by method,
    the Pareto view with any ``defences_run``). Returns the run's metrics."""
    from emlab.pareto import beyond_points, defences_points, pareto_figure, pareto_front, run_prefix
    from emlab.training.monitor import predictive_value, trajectory_figure

    st, metrics, run, ctx, smoke = study.state, study.metrics, study.run, study.ctx, study.state["smoke"]
    trajectories, final_em = st["trajectories"], st["final_em"]
    sft_g, sft_i = metrics.get("baseline/sft/general_em"), metrics.get("baseline/sft/indomain_em")
    for key in [k for k in metrics if k.endswith("/general_em") and k.startswith(("caft/", "steering/", "realign/"))
                or k.endswith("/none/general_em") and k.startswith("conditional/")]:
        prefix = key.rsplit("/", 1)[0]
        if sft_g and metrics[key] is not None:
            metrics[f"{prefix.removesuffix('/none')}/general_cut"] = 100 * (1 - metrics[key] / sft_g)
        prefix = prefix.removesuffix("/none")
        if sft_i and metrics.get(f"{prefix}/indomain_em") is not None:
            metrics[f"{prefix}/indomain_kept"] = 100 * metrics[f"{prefix}/indomain_em"] / sft_i
    metrics["monitor/runs"] = len(final_em)
    seconds = st["seconds"]
    metrics["monitor/share_of_finetune_time"] = 100 * seconds["monitor"] / seconds["train"] if seconds["train"] else None
    for key in sorted({k for t in trajectories.values() for k in t}):
        runs = [{**trajectories[name][key], "final_em": em} for name, em in final_em.items()
                if em is not None and key in trajectories[name]]
        if len(runs) < 3:
            continue
        pv = predictive_value(runs, threshold=st["em_threshold"], seed=study.seed)
        short = key.removeprefix("trait/")
        for frac in ("0.1", "0.25", "0.5"):
            for stat in ("spearman", "spearman_ci", "auroc", "auroc_ci"):
                metrics[f"monitor/{short}/{frac}/{stat}"] = pv[frac][stat]
        metrics[f"monitor/{short}/n_above_threshold"] = pv["n_above"]
    run.log_metrics({k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()})
    domain, seed = st["domain"], study.seed
    save_figure(run, trajectory_figure(trajectories, title=f"Trait trajectories ({ctx.model_name}, {domain}, seed {seed})"),
                "trait_trajectories", not smoke)
    save_figure(run, em_by_method_figure(metrics, final_em), "em_by_method", not smoke)
    points = beyond_points(metrics)
    for folder in st["defence_runs"]:
        points.update(defences_points(folder, prefix=run_prefix(folder)))
    if points:
        run.log_metrics({"pareto/front": pareto_front(points)})
        save_figure(run, pareto_figure(points, title=f"General EM against in-domain EM kept ({ctx.model_name}, {domain})"),
                    "pareto", not smoke)
    else:
        run.note("pareto: no method has both a general EM and an in-domain EM kept (SFT's in-domain EM is 0 or "
                 "missing); no figures/pareto")
    return dict(run.metrics)


@takes_parameters_of(start)
def beyond_study(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run study 06 and return its metrics (also in ``<out_dir>/metrics.json``); figures in ``<out_dir>/figures``:
    :func:`start`, :func:`directions`, :func:`baseline`, :func:`sae_features`, :func:`pca_components`,
    :func:`realignment`, :func:`caft_runs`, :func:`steering_runs`, :func:`conditional_runs`,
    :func:`inoculation_prompt_sweep`, :func:`summarize` -- the cells of notebook 06.

    ``defences_run``: finished 02 (defences) and 03 (interleaving) run folders, one or a list: their methods
    (03: each interleaving variant at each share, its hyperparameter sweep) join the Pareto figure, named
    ``02:<method>/<domain>`` and ``03:<method>/<domain>/share=<s>``.

    >>> beyond_study(smoke=True, out_dir="/tmp/06")["monitor/runs"]      # doctest: +SKIP
    8
    """
    study = start(*args, **kwargs)
    directions(study)
    sft = baseline(study)
    sae_features(study, sft)
    pca_components(study, sft)
    realignment(study, sft)
    del sft
    caft_runs(study)
    steering_runs(study)
    conditional_runs(study)
    inoculation_prompt_sweep(study)
    return summarize(study)


def _inoculation_prompt(ctx: StudyContext) -> str:
    """The defences study's inoculation prompt: the toy world's first evil system prompt, the paper's elsewhere."""
    from emlab.training.methods import INOCULATION_PROMPT

    if not ctx.is_toy:
        return INOCULATION_PROMPT
    from emlab.toy.world import load_world_config

    return load_world_config()["system_prompts"]["evil"][0]


def _n_benign(n_rows: int, share: float) -> int:
    """Benign rows interleaved into ``n_rows`` at ``share`` ADDED (as the defences study and EMConfig count)."""
    p = share / (1 + share)
    return int(p * n_rows / (1 - p) + 0.5)
