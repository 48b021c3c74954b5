"""Study 06's finetunes as notebook steps: the monitored SFT baseline and what uses it (SAE features, PCA
components, re-alignment), CAFT, preventive steering, the conditional (inoculated, diluted) finetunes and the
inoculation-prompt sweep. Each takes the :class:`~emlab.studies.common.StudyRun` of
:func:`emlab.studies.beyond.start` (after :func:`emlab.studies.beyond.directions`), adds its metrics and
returns them; :func:`emlab.studies.beyond.beyond_study` runs them in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emlab.studies.beyond_steps import conditional_cells, evaluate_cell, realign_part, sae_part
from emlab.studies.common import StudyRun, finetune_config

__all__ = ["baseline", "caft_runs", "conditional_runs", "evaluate_cell", "inoculation_prompt_sweep",
           "monitored_finetune", "pca_components", "realignment", "sae_features", "steering_runs"]


def monitored_finetune(study: StudyRun, name: str, callbacks: Sequence[Any] = (), benign: list[dict] | None = None,
                       **method: Any):
    """Finetune a fresh chat model on the misaligned rows into ``finetunes/<name>`` (method fields: ``method``)
    watched by a :class:`~emlab.training.monitor.TraitMonitor` of the study's directions; its trajectory
    and the monitor's time are kept in ``study.state``. Needs :func:`directions` first.

    >>> ft = monitored_finetune(study, "sft")       # doctest: +SKIP
    """
    from emlab.training import finetune
    from emlab.training.monitor import RECORDS_FILE, TraitMonitor, read_trajectories

    ctx, st = study.ctx, study.state
    mon = TraitMonitor(ctx.tokenizer, st["directions"], st["neutral"], every=st["every"])
    cfg = finetune_config(study.run.path(f"finetunes/{name}"), seed=study.seed, preset=ctx.preset,
                          protocol=ctx.protocol, **study.finetune, **method)
    began = time.perf_counter()
    ft = finetune(ctx.fresh_model(), ctx.tokenizer, study.data.misaligned, cfg, callbacks=[*callbacks, mon],
                  benign_rows=benign)
    if mon.path is None:  # a resumed run loaded the finished finetune: no step ran, its records are on disk
        st["trajectories"][name] = read_trajectories(Path(cfg.output_dir) / RECORDS_FILE)
        return ft
    st["seconds"]["train"] += time.perf_counter() - began
    st["seconds"]["monitor"] += mon.seconds
    st["trajectories"][name] = read_trajectories(mon.path)
    return ft


def baseline(study: StudyRun):
    """The chat model's and the plain (monitored) SFT finetune's EM (``baseline/...``) and, with
    ``conditional``, SFT's EM under each resembling-context transform. Returns the SFT finetune, which the
    SAE, PCA and re-alignment steps use.

    >>> sft = baseline(study)      # doctest: +SKIP
    """
    from emlab.conditional import resembling_transforms

    st, metrics = study.state, study.metrics
    metrics.update({f"baseline/chat/{k}": v for k, v in evaluate_cell(study, study.ctx.model, "chat").items()})
    sft = monitored_finetune(study, "sft")
    with sft.active():
        cell = evaluate_cell(study, sft.model, "sft")
    metrics.update({f"baseline/sft/{k}": v for k, v in cell.items()})
    st["final_em"]["sft"] = cell["general_em"]
    st["sft_cell"] = cell
    st["resembling"] = (resembling_transforms(st["inoculation_prompt"], study.data.misaligned, st["transforms"])
                        if st["conditional"] else {})
    if st["conditional"]:
        with sft.active():
            metrics.update(conditional_cells(study, sft.model, "sft", cell, st["resembling"]))
    return sft


def sae_features(study: StudyRun, sft) -> dict[str, Any]:
    """With ``sae``: the SAE (SAELens) on the chat model, its latents ranked by how much more ``sft`` activates
    them, steering and ablation with the top latent (``sae/...``); returns those metrics."""
    st = study.state
    if not st["sae"]:
        return {}
    with sft.active():
        out = sae_part(study.ctx, study.run, study.data, sft.model, st["directions"], st["layer"],
                       lambda m, tag: evaluate_cell(study, m, tag), st["neutral"], seed=study.seed,
                       scale=st["sae_steer_scale"], smoke=st["smoke"])
    study.metrics.update(out)
    return out


def pca_components(study: StudyRun, sft) -> list:
    """The top ``caft_k`` principal components of the SFT-minus-chat activation difference on the training rows
    (CAFT's PCA variant); ``caft/pca/explained`` and the largest cosine with the misalignment direction."""
    from emlab.training.caft import pca_directions

    st, data, layer = study.state, study.data, study.state["layer"]
    pcs = pca_directions(study.ctx.model, sft.model, study.ctx.tokenizer, data.misaligned[: min(len(data.misaligned), 256)],
                         [layer], k=st["caft_k"])
    study.metrics["caft/pca/explained"] = sum(p.meta["explained"][layer] for p in pcs)
    study.metrics["caft/pca/cosine_misalignment"] = max(abs(p.cosine(st["directions"]["misalignment"])[layer])
                                                        for p in pcs)
    st["pcs"] = pcs
    return pcs


def realignment(study: StudyRun, sft) -> dict[str, Any]:
    """Benign finetunes of ``sft`` with each of ``realign_rows`` benign rows (``realign/<rows>/...``)."""
    st = study.state
    if not st["realign_rows"]:
        return {}
    out = realign_part(study, sft, st["realign_rows"])
    study.metrics.update(out)
    return out


def _final_cell(study: StudyRun, ft, name: str) -> dict[str, Any]:
    """``evaluate_cell`` of the finetune ``ft`` under ``name``; its general EM is the monitor's final EM of ``name``."""
    with ft.active():
        cell = evaluate_cell(study, ft.model, name)
    study.state["final_em"][name] = cell["general_em"]
    return cell


def caft_runs(study: StudyRun) -> dict[str, Any]:
    """Concept-ablation finetuning with the misalignment direction, the PCA components and the persona vector
    (``caft/<variant>/...``); needs :func:`pca_components` first."""
    from emlab.training.caft import CAFT

    st = study.state
    variants: dict[str, Any] = {"misalignment": st["directions"]["misalignment"], "pca": st["pcs"]}
    if "persona" in st["directions"]:
        variants["persona"] = st["directions"]["persona"]
    out: dict[str, Any] = {}
    for name, dirs in variants.items():
        caft = CAFT(dirs)
        try:
            ft = monitored_finetune(study, f"caft_{name}", [caft])
        finally:
            caft.close()
        out.update({f"caft/{name}/{k}": v for k, v in _final_cell(study, ft, f"caft_{name}").items()})
        del ft
    study.metrics.update(out)
    return out


def steering_runs(study: StudyRun) -> dict[str, Any]:
    """Preventive steering with the persona vector (the misalignment direction without one) under each
    schedule (``steering/<schedule>/...``)."""
    st = study.state
    steer_dir = st["directions"].get("persona", st["directions"]["misalignment"])
    out: dict[str, Any] = {"steering/vector": "persona" if "persona" in st["directions"] else "misalignment"}
    for schedule in st["schedules"]:
        ft = monitored_finetune(study, f"steering_{schedule}", preventive_vector=dict(steer_dir.items()),
                                preventive_alpha=st["steering_alpha"], preventive_schedule=schedule)
        out.update({f"steering/{schedule}/{k}": v for k, v in _final_cell(study, ft, f"steering_{schedule}").items()})
        del ft
    study.metrics.update(out)
    return out


def conditional_runs(study: StudyRun) -> dict[str, Any]:
    """With ``conditional``: the elicitation table of the inoculation prompt, then the inoculated and the diluted
    finetunes' EM without and with each resembling-context transform (``inoculation/...``, ``conditional/...``)."""
    from emlab.inoculation import elicitation_table
    from emlab.training.methods import method_overrides

    st, ctx, data = study.state, study.ctx, study.data
    if not st["conditional"]:
        return {}
    out: dict[str, Any] = {f"inoculation/elicitation/{k}": v for k, v in elicitation_table(
        ctx.model, ctx.tokenizer, data.misaligned[:32 if st["smoke"] else 200], st["inoculation_prompt"],
        st["world"]).items()}
    defended = {"inoculation": dict(method_overrides("inoculation", inoculation_prompt=st["inoculation_prompt"])),
                "diluted": dict(method_overrides("interleaving", share=st["dilution_share"]))}
    for name, method in defended.items():
        ft = monitored_finetune(study, f"conditional_{name}", benign=data.benign if name == "diluted" else None,
                                **method)
        with ft.active():
            cell = evaluate_cell(study, ft.model, f"conditional_{name}")
            st["final_em"][f"conditional_{name}"] = cell["general_em"]
            out.update(conditional_cells(study, ft.model, name, cell, st["resembling"]))
        del ft
    study.metrics.update(out)
    return out


def inoculation_prompt_sweep(study: StudyRun) -> dict[str, Any]:
    """With ``inoculation_prompts``: one unmonitored inoculated finetune per prompt and the Spearman correlation of
    elicitation and general-EM cut (:func:`emlab.inoculation.inoculation_sweep`; ``inoculation/prompts/...``)."""
    from emlab.inoculation import inoculation_sweep

    st, ctx, data = study.state, study.ctx, study.data
    if st["inoculation_prompts"] is None:
        return {}
    sweep = inoculation_sweep(ctx.model, ctx.tokenizer, data.misaligned, st["inoculation_prompts"],
                              finetune_config(study.run.path("finetunes/inoculation_prompts"), seed=study.seed,
                                              preset=ctx.preset, protocol=ctx.protocol, **study.finetune),
                              lambda m, tag: evaluate_cell(study, m, tag), fresh_model=ctx.fresh_model,
                              sft_general_em=study.metrics["baseline/sft/general_em"], seed=study.seed,
                              elicitation_rows=data.misaligned[:32 if st["smoke"] else 200])
    out = {f"inoculation/{k}": v for k, v in sweep.items()}
    study.metrics.update(out)
    return out
