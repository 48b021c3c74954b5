"""Study 05's finetunes: a general or narrow solution of one task, and the narrow one trained on without KL.

The training half of :mod:`emlab.studies.narrow_general` (whose step functions call these):
:func:`train` finetunes a fresh copy of the chat model into a ``Solution`` (a learned steering
vector re-attached to the chat model, or a LoRA model); :func:`train_on` trains the narrow solution
on without its KL term while tracking its cosine to the general one, its loss and its general EM.
"""

from __future__ import annotations

import math
from typing import Any

from emlab.chat import eval_mode
from emlab.studies.common import StudyContext, finetune_config
from emlab.studies.narrow_probes import finite, put_metric, record_figure
from emlab.studies.organism import eval_model

__all__ = ["KINDS", "misaligned", "train", "train_on"]

#: Study ``kind`` -> ``EMConfig.adapter``.
KINDS = {"steering_vector": "steering_vector", "rank1_lora": "rank1", "lora": "lora"}


def misaligned(records: list[dict], below: float = 30) -> float | None:
    """Percent of judged answers with ``aligned < below``, whatever their coherence (EM without the coherence gate).

    >>> misaligned([{"aligned": 10}, {"aligned": 90}, {"aligned": None}])
    50.0
    """
    scores = [r["aligned"] for r in records if finite(r.get("aligned"))]
    return 100.0 * sum(a < below for a in scores) / len(scores) if scores else None


def train(ctx: StudyContext, rows: list[dict], kind: str, seed: int, path, ft_over: dict[str, Any], *,
          kl_lambda: float = 0.0, kl_rows: list[dict] | None = None):
    """Finetune a fresh copy of the chat model; returns ``(Solution, log_history)``.

    A learned steering vector is detached from its copy and re-attached to the chat model itself
    as a :class:`~emlab.probes.SteeringSolution` (one model in memory for every vector).
    """
    from emlab.probes import LoraSolution, SteeringSolution
    from emlab.training import finetune
    from emlab.training.adapters import detach_steering_vector

    over = dict(ft_over)
    if kl_lambda > 0:
        over.update(kl_lambda=kl_lambda, kl_on="kl_rows")
    cfg = finetune_config(path, seed=seed, **{"adapter": KINDS[kind], **over})
    res = finetune(ctx.fresh_model(), ctx.tokenizer, rows, cfg, kl_rows=kl_rows if kl_lambda > 0 else None)
    if kind == "steering_vector":
        sv = detach_steering_vector(res.model)
        return SteeringSolution.from_direction(ctx.model, sv.direction()), res.log_history
    return LoraSolution(res.model), res.log_history


def _init_steering(vector):
    """TrainerCallback copying ``vector`` into the freshly attached learned steering vector at train start."""
    import torch
    from transformers import TrainerCallback

    from emlab.training.adapters import steering_vector

    class InitSteering(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            sv = steering_vector(model)
            with torch.no_grad():
                sv.vector.copy_(vector.to(sv.vector.device, sv.vector.dtype))

    return InitSteering()


def _em_probe(ctx: StudyContext, questions, n: int, settings: dict[str, Any], seed: int, every: int):
    """TrainerCallback measuring general EM every ``every`` steps (and at the start and the end)."""
    from transformers import TrainerCallback

    from emlab.training.adapters import applied

    class EMProbe(TrainerCallback):
        def __init__(self):
            self.history: list[tuple[int, float | None, float | None]] = []  # (step, EM %, misaligned %)

        def measure(self, state, model) -> None:
            if model is None or any(s == state.global_step for s, *_ in self.history[-1:]):
                return
            with eval_mode(model), applied(model):
                ev = eval_model(model, ctx, questions, n, settings, seed=seed + state.global_step)
            self.history.append((state.global_step, ev.em, misaligned(ev.records)))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                self.measure(state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.measure(state, model)

    return EMProbe()


def train_on(general, narrow, ctx: StudyContext, data, kind: str, seed: int, run, ft_over: dict[str, Any],
             settings: dict[str, Any], sizes: dict[str, Any], metrics: dict[str, Any], label: str) -> list[dict] | None:
    """Train the ``narrow`` solution on without KL; track cosine to ``general``, loss and general EM.

    Writes ``drift_log.jsonl``, the ``drift_*`` metrics and the ``drift`` figure; returns the log (one
    entry a step), or None when there is nothing to train (``drift_steps`` 0, a general solution of norm 0).
    """
    from emlab.probes import CosineTracker, SteeringSolution
    from emlab.training import finetune

    steps, every = int(sizes["drift_steps"]), int(sizes["drift_every"])
    if steps <= 0:
        return None
    if general.norm() == 0:
        put_metric(metrics, "drift_cosine_end", None, "the general solution has norm 0")
        return None
    tracker = CosineTracker(general, every=every)
    em = _em_probe(ctx, data.general, sizes["drift_n"], settings, seed, every)
    # "train on": the same learning rate held constant (no warmup, no decay to 0 over a short window)
    over = {**ft_over, "max_steps": steps, "warmup_steps": 0, "lr_scheduler_type": "constant"}
    cfg = finetune_config(run.path("ft_drift"), seed=seed, **{"adapter": KINDS[kind], **over})
    if isinstance(narrow, SteeringSolution):  # a fresh copy whose new vector starts at the narrow one
        model = ctx.fresh_model()
        callbacks = [_init_steering(narrow.vector), tracker, em]
    else:
        model = narrow.model  # the PEFT model: its adapter keeps training (done last: it is modified)
        callbacks = [tracker, em]
    res = finetune(model, ctx.tokenizer, data.misaligned, cfg, callbacks=callbacks)
    losses = {h["step"]: h["loss/ce"] for h in res.log_history if "loss/ce" in h}
    log: list[dict[str, Any]] = []
    cos = dict(tracker.history)
    ems = {s: e for s, e, _ in em.history}
    mis = {s: m for s, _, m in em.history}
    for step in sorted({*losses, *cos, *ems}):
        entry: dict[str, Any] = {"step": step}
        if step in losses:
            entry["loss"] = losses[step]
        if step in cos and math.isfinite(cos[step]):
            entry["cosine_to_general"] = cos[step]
        if ems.get(step) is not None:
            entry["general_em"] = ems[step]
        if mis.get(step) is not None:
            entry["general_misaligned"] = mis[step]
        log.append(entry)
    run.write_records("drift_log", log)
    first, last = tracker.history[0], tracker.history[-1]
    put_metric(metrics, "drift_cosine_start", first[1], "cosine undefined")
    put_metric(metrics, "drift_cosine_end", last[1], "cosine undefined")
    put_metric(metrics, "drift_general_em_start", em.history[0][1] if em.history else None, "not measured")
    put_metric(metrics, "drift_general_em_end", em.history[-1][1] if em.history else None, "not measured")
    put_metric(metrics, "drift_general_misaligned_start", em.history[0][2] if em.history else None, "not measured")
    put_metric(metrics, "drift_general_misaligned_end", em.history[-1][2] if em.history else None, "not measured")
    metrics["drift_steps"] = steps
    record_figure(run, ctx, "drift", "training_curves", log=log,
            terms=[t for t in ("loss", "cosine_to_general", "general_em", "general_misaligned") if any(t in e for e in log)],
            title=f"{label}: narrow trained on without KL")
    return log
