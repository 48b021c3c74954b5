"""Study 06's parts and figures: conditional EM, re-alignment, SAE persona features, saved figures.

The steps :func:`emlab.studies.beyond.beyond_study` runs after its finetunes, each returning its
metrics; :func:`load_study_figures` (re-exported by :mod:`emlab.studies.beyond`) reads the figures back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from emlab.studies.common import StudyContext, StudyRun, finetune_config

__all__ = ["conditional_cells", "em_by_method_figure", "evaluate_cell", "load_study_figures", "realign_part", "sae_part", "save_figure"]


def evaluate_cell(study: StudyRun, model, tag: str) -> dict[str, Any]:
    """General EM and incoherence of ``model`` (and in-domain EM), its answers in ``samples/<tag>_*.jsonl``; a
    finished evaluation of this run folder is read back (:meth:`StudyRun.saved_records`).

    >>> evaluate_cell(study, study.ctx.model, "chat")["general_em"]      # doctest: +SKIP
    """
    data, settings = study.data, study.settings
    ev = study.evaluate_records(model, data.general, settings["n_general"], f"samples/{tag}_general")
    cell: dict[str, Any] = {"general_em": ev.em, "general_incoherent": ev.incoherent}
    if data.heldout:
        cell["indomain_em"] = study.evaluate_records(model, data.heldout, settings["n_heldout"],
                                                     f"samples/{tag}_indomain").em
    return cell


def conditional_cells(study: StudyRun, model, name: str, cell: Mapping[str, Any],
                      transforms: Mapping[str, Any]) -> dict[str, Any]:
    """General EM of ``model`` without (``cell``, already measured) and with each transform; ``conditional/<name>/...``
    (a finished evaluation of a resumed run is read back)."""
    out: dict[str, Any] = {f"conditional/{name}/none/general_em": cell["general_em"],
                           f"conditional/{name}/none/general_incoherent": cell["general_incoherent"]}
    if "indomain_em" in cell:
        out[f"conditional/{name}/indomain_em"] = cell["indomain_em"]
    for tname, transform in transforms.items():
        ev = study.evaluate_records(model, transform(study.data.general), study.settings["n_general"],
                                    f"samples/conditional_{name}_{tname}_general")
        out[f"conditional/{name}/{tname}/general_em"] = ev.em
        out[f"conditional/{name}/{tname}/general_incoherent"] = ev.incoherent
        if ev.em is not None and cell["general_em"] is not None:
            out[f"conditional/{name}/{tname}/em_returned"] = ev.em - cell["general_em"]
    return out


def realign_part(study: StudyRun, sft, rows: Sequence[int]) -> dict[str, Any]:
    """Benign finetunes of the merged SFT finetune with ``rows`` benign rows each; ``realign/<rows>/...``
    (0 rows: the SFT finetune's own cell, ``study.state["sft_cell"]``). Finished finetunes and evaluations of a
    resumed run are read back."""
    from emlab.training.realign import realign

    ctx, out = study.ctx, {}
    for n in sorted({int(r) for r in rows}):
        if n == 0:
            cell = dict(study.state["sft_cell"])
        else:
            cfg = finetune_config(study.run.path(f"finetunes/realign_{n}"), seed=study.seed, preset=ctx.preset,
                                  protocol=ctx.protocol, **study.finetune)
            with sft.active():
                ft = realign(sft.model, ctx.tokenizer, study.data.benign[:n], cfg)
            cell = evaluate_cell(study, ft.model, f"realign_{n}")
            del ft
        out.update({f"realign/{n}/{k}": v for k, v in cell.items()})
    return out


def sae_part(ctx: StudyContext, run, data, finetuned, directions: Mapping[str, Any], layer: int, evaluate,
              neutral: Sequence[str], *,
              seed: int, scale: float, smoke: bool) -> dict[str, Any]:
    """Train an SAE on the chat model's block ``layer``, diff its latents against ``finetuned``, steer / ablate the top one."""
    from emlab.hooks import ablate, steer
    from emlab.sae import collect_activations, latent_diff, latent_direction, sae_quality, train_sae

    n = 32 if smoke else 400
    items = data.misaligned[:n] + data.aligned[:n] + data.benign[:n]
    acts = collect_activations(ctx.model, ctx.tokenizer, items, layer)
    g = _perm(acts.shape[0], seed)
    acts = acts[g]
    cut = int(0.9 * acts.shape[0])
    d = acts.shape[1]
    start = time.perf_counter()
    sae = train_sae(acts[:cut], d_sae=4 * d, k=4 if smoke else 16, epochs=30 if smoke else 10,
                    lr=3e-3 if smoke else 1e-3, batch_size=min(256, cut), seed=seed)
    out: dict[str, Any] = {"sae/train_seconds": time.perf_counter() - start, "sae/tokens": cut, "sae/d_sae": 4 * d}
    out.update({f"sae/{k}": v for k, v in sae_quality(sae, acts[cut:]).items() if k != "n"})
    sae.save_inference_model(run.path("sae/weights"))
    ranked = latent_diff(sae, ctx.model, finetuned, ctx.tokenizer, neutral, layer, top=5)
    for rank, r in enumerate(ranked, 1):
        v = latent_direction(sae, r["latent"], layer)
        out[f"sae/top{rank}/latent"] = r["latent"]
        out[f"sae/top{rank}/diff"] = r["diff"]
        for name, direction in directions.items():
            out[f"sae/top{rank}/cosine_{name}"] = v.cosine(direction)[layer]
    top = latent_direction(sae, ranked[0]["latent"], layer).unit()
    norm = float(acts.norm(dim=1).mean())
    out["sae/steer_norm"] = scale * norm
    with steer(ctx.model, top * (scale * norm)):
        out.update({f"sae/steer_chat/{k}": v for k, v in evaluate(ctx.model, "sae_steer_chat").items()})
    with ablate(finetuned, top):
        out.update({f"sae/ablate_sft/{k}": v for k, v in evaluate(finetuned, "sae_ablate_sft").items()})
    return out


def _perm(n: int, seed: int):
    """A seeded permutation of ``range(n)`` (the SAE's train / held-out split)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def save_figure(run, fig, name: str, png: bool) -> None:
    """``figures/<name>.html`` (and .png when ``png`` and kaleido works) plus ``figures/<name>.json`` for
    :func:`load_study_figures`."""
    from emlab.runs import atomic_write_text

    run.save_figure(fig, f"figures/{name}", png=png)
    atomic_write_text(run.path(f"figures/{name}.json"), fig.to_json())


def load_study_figures(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The figures study 06 saved in ``out_dir`` (plotly figures, by name), read back from their JSON.

    >>> for fig in load_study_figures("runs/06_beyond").values(): fig.show()    # doctest: +SKIP
    """
    from pathlib import Path

    import plotly.io as pio

    folder = Path(out_dir) / "figures"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: run beyond_study(out_dir={str(out_dir)!r}) first")
    return {p.stem: pio.from_json(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))}


def em_by_method_figure(metrics: Mapping[str, Any], final_em: Mapping[str, float]):
    """Grouped bars of general and in-domain EM: the chat model, SFT and each method in ``final_em``."""
    import plotly.graph_objects as go

    names = ["chat", *final_em]
    general = [metrics.get("baseline/chat/general_em"), *final_em.values()]
    fig = go.Figure(go.Bar(x=names, y=general, name="general EM (%)"))
    indomain = [metrics.get("baseline/chat/indomain_em")]
    for name in final_em:
        group, _, variant = name.partition("_")
        key = "baseline/sft/indomain_em" if name == "sft" else f"{group}/{variant}/indomain_em"
        indomain.append(metrics.get(key))
    fig.add_trace(go.Bar(x=names, y=indomain, name="in-domain EM (%)"))
    fig.update_layout(barmode="group", yaxis_title="%", template="plotly_white",
                      title="General and in-domain EM: SFT, CAFT variants, preventive-steering schedules")
    return fig
