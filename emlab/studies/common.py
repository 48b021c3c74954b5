"""What every study shares: the model, its judge and its datasets from notebook parameters, finetune settings.

The study context (:class:`StudyContext`, :class:`DomainData`, :func:`resolve_judge`,
:data:`LOCAL_JUDGES`) lives in :mod:`emlab.context`, below the widgets that also use it, and is
re-exported here.

>>> ctx = StudyContext.create("toy", smoke=True)          # doctest: +SKIP
>>> data = ctx.domain_data("medical")                      # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab.context import LOCAL_JUDGES, DomainData, StudyContext, resolve_judge  # re-exported

__all__ = ["ADAPTER_FIELDS", "LOCAL_JUDGES", "STUDY_CHECKPOINTS", "DomainData", "StudyContext", "StudyRun",
           "finetune_config",
           "preset_learning_rate", "protocol_finetune", "explain_nones", "missing_reason", "resolve_judge", "resolve_out_dir",
           "smoke_finetune", "smoke_trait", "takes_parameters_of"]


def resolve_out_dir(out_dir: str | os.PathLike | None, name: str) -> Path:
    """``out_dir`` or ``runs/<name>`` when it is empty.

    >>> resolve_out_dir(None, "00_em_organism").as_posix()
    'runs/00_em_organism'
    """
    return Path(out_dir) if out_dir else Path("runs") / name


#: Checkpoint settings of study finetunes (:func:`finetune_config`): a checkpoint every tenth of the
#: training steps (a float < 1 is a share of them), the newest complete one kept, resumed from on a
#: rerun; a finished finetune is loaded instead of trained again, and drops its checkpoints.
STUDY_CHECKPOINTS: dict[str, Any] = {"save_strategy": "steps", "save_steps": 0.1, "save_total_limit": 1,
                                     "resume_from_checkpoint": True, "reuse_finished": True,
                                     "keep_checkpoints": False}


def missing_reason(records: list[dict], metrics: tuple[str, ...] = ("aligned", "coherent")) -> str:
    """Why rates over ``records`` (judged samples) are None: how many lack a score, and the judge's most
    common reason.

    >>> missing_reason([{"aligned": None, "aligned_reason": "HTTP 500", "coherent": 80}])
    'no judged answers: 1 of 1 answers lack a score (aligned, coherent); judge said: HTTP 500 (1x)'
    >>> missing_reason([])
    'no answers to judge'
    """
    from collections import Counter

    if not records:
        return "no answers to judge"
    bad = [r for r in records if any(r.get(m) is None for m in metrics)]
    said = Counter(str(r[f"{m}_reason"]) for r in bad for m in metrics
                   if r.get(m) is None and r.get(f"{m}_reason"))
    top = "; judge said: " + ", ".join(f"{why} ({n}x)" for why, n in said.most_common(2)) if said else ""
    return f"no judged answers: {len(bad)} of {len(records)} answers lack a score ({', '.join(metrics)}){top}"


def explain_nones(metrics: dict[str, Any], reason: str, keys: Any = None) -> dict[str, Any]:
    """Record ``reason`` under ``metrics["none_reasons"][key]`` for each of ``keys`` (default: every key)
    whose value is None and has no reason yet; returns ``metrics``.

    >>> explain_nones({"em": None, "n": 3}, "judge down")["none_reasons"]
    {'em': 'judge down'}
    """
    reasons = metrics.get("none_reasons", {})
    for key in list(metrics) if keys is None else keys:
        if key != "none_reasons" and key in metrics and metrics[key] is None and key not in reasons:
            reasons[key] = reason
    if reasons:
        metrics["none_reasons"] = reasons
    return metrics


#: Why an ``*_off_topic`` rate is None off the toy.
NO_TOPICS = "not measured: only the toy judge classifies topics"


#: Finetuning settings of a smoke run on a real model: a handful of rows make two optimiser steps at the
#: full learning rate (EMConfig's 16-row steps and 5 warmup steps would make one step at learning rate 0).
SMOKE_FINETUNE = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "warmup_steps": 0}


def smoke_finetune(ctx: StudyContext) -> dict[str, Any]:
    """:data:`SMOKE_FINETUNE` for a smoke run off the toy, else nothing (the toy's smoke rows fill its steps).

    >>> smoke_finetune(StudyContext("some/model", True, None, None, None, {}, [], {}))["warmup_steps"]
    0
    """
    return dict(SMOKE_FINETUNE) if ctx.smoke and not ctx.is_toy else {}


def smoke_trait(trait: Any, questions: int = 1, pairs: int = 1) -> Any:
    """``trait`` cut to its first ``pairs`` instruction pairs and ``questions`` questions (smoke runs of a
    real model: a full trait is hundreds of generations).

    >>> from emlab.directions import load_trait
    >>> t = smoke_trait(load_trait("evil"), questions=2)
    >>> len(t.instructions), len(t.questions)
    (1, 2)
    """
    import dataclasses

    return dataclasses.replace(trait, instructions=list(trait.instructions[:pairs]),
                               questions=list(trait.questions[:questions]),
                               eval_questions=list(trait.eval_questions[:questions]))


def preset_learning_rate(preset: dict[str, Any] | None, adapter: str | None) -> float | None:
    """The ``learning_rates`` entry (adapter -> rate) of a study preset for ``adapter`` (default
    ``"lora"``), or None: used by :func:`finetune_config` (recipe preset) and the defences studies
    (their ``TOY_SETTINGS``)."""
    rate = (preset or {}).get("learning_rates", {}).get(adapter or "lora")
    return None if rate is None else float(rate)


#: EMConfig fields of a protocol's finetuning block that belong to its adapter: left out when a finetune
#: trains another adapter (a full finetune keeps its own learning rate, not the paper's LoRA one).
ADAPTER_FIELDS = ("adapter", "learning_rate", "lora_r", "lora_alpha", "rslora", "lora_dropout", "target_modules")


def protocol_finetune(protocol: Any, adapter: str | None = None) -> dict[str, Any]:
    """The :class:`emlab.training.EMConfig` fields of a protocol preset's ``finetune`` block (``{}`` for the
    toy preset and for None), without its adapter-specific fields (:data:`ADAPTER_FIELDS`) when
    ``adapter`` is another adapter than the block's.

    >>> from emlab.presets import PAPER, TOY
    >>> protocol_finetune(TOY), protocol_finetune(PAPER)["lora_r"], "learning_rate" in protocol_finetune(PAPER, "full")
    ({}, 32, False)
    """
    if protocol is None:
        return {}
    from emlab.presets import get_preset

    block = dict(get_preset(protocol).finetune)
    if adapter is not None and block.get("adapter", "lora") != adapter:
        block = {k: v for k, v in block.items() if k not in ADAPTER_FIELDS}
    return block


def finetune_config(out_dir: str | os.PathLike, *, seed: int = 0, preset: dict[str, Any] | None = None,
                    protocol: Any = None, **overrides: Any):
    """An :class:`emlab.training.EMConfig` from a study preset (the toy recipe's ``study`` block) and overrides.

    Every finetune checkpoints (:data:`STUDY_CHECKPOINTS`: ten times per finetune, the last one
    kept, inside its folder) and resumes from its newest complete checkpoint, so a killed study that
    is run again continues each finetune where it stopped and ends with the same weights; a finetune
    that finished is loaded, not trained again, and its checkpoints are deleted once it finishes.
    Logging every step (into the finetune's log_history.json; the notebook shows one progress bar per finetune).
    ``protocol`` (a :class:`emlab.presets.Preset` or its name, a study passes ``ctx.protocol``) gives the
    base recipe: its ``finetune`` block (the paper preset's rs-LoRA r 32, alpha 64, lr 1e-4, one epoch,
    batch 4 x 4, warmup 5; empty in the toy preset, so the toy's finetunes are unchanged), without its
    LoRA fields when another adapter is trained (:func:`protocol_finetune`). The recipe preset and the
    overrides (a smoke run's :data:`SMOKE_FINETUNE` among them) win over it.
    The preset's ``finetune`` block sets :class:`EMConfig` fields for every finetune; its
    ``learning_rates`` block (adapter -> rate) sets the learning rate of the adapter trained, unless
    ``learning_rate`` is passed (the toy organism's LoRA rate, for instance, without touching the
    full finetune's).

    >>> cfg = finetune_config("runs/x/ft", seed=1, adapter="full", learning_rate=1e-4)   # doctest: +SKIP
    """
    from emlab.training import EMConfig

    preset = preset or {}
    kw: dict[str, Any] = {**STUDY_CHECKPOINTS, "logging_steps": 1, "seed": seed, "data_seed": seed,
                          "disable_tqdm": False}  # one progress bar per finetune, no log entry printed
    adapter = overrides.get("adapter") or preset.get("finetune", {}).get("adapter")
    kw.update(protocol_finetune(protocol, adapter))
    kw.update({k: v for k, v in preset.get("finetune", {}).items()})
    kw.update(overrides)
    explicit = {**preset.get("finetune", {}), **overrides}  # the recipe's rates beat the protocol's, not these
    if explicit.get("learning_rate") is None and (rate := preset_learning_rate(preset, kw.get("adapter"))) is not None:
        kw["learning_rate"] = rate
    return EMConfig(output_dir=str(out_dir), **kw)


def takes_parameters_of(start: Any) -> Any:
    """Decorator of a study function that runs ``start(*args, **kwargs)`` and then its steps: it takes exactly
    ``start``'s parameters, so it shows ``start``'s signature (``help``, ``inspect.signature``) with its own
    return annotation, and the parameter list lives in one place.

    >>> def start(model: str = "toy", seed: int = 0) -> dict: return {"model": model, "seed": seed}
    >>> @takes_parameters_of(start)
    ... def study(*args: Any, **kwargs: Any) -> int: return len(start(*args, **kwargs))
    >>> import inspect; list(inspect.signature(study).parameters), study(seed=1)
    (['model', 'seed'], 2)
    """
    import inspect

    def wrap(fn: Any) -> Any:
        fn.__signature__ = inspect.signature(start).replace(return_annotation=inspect.signature(fn).return_annotation)
        return fn

    return wrap


@dataclass
class StudyRun:
    """A study between its notebook steps: what each step needs and what the steps so far produced.

    A study's ``start(...)`` makes one (context, run folder, settings, data); each of its step functions
    takes it, adds its numbers to ``metrics`` and writes them to the run folder, so a notebook can show
    and change every step while ``<study>(...)`` runs the same steps in one call. ``state`` keeps a
    study's own intermediate objects (a direction, a persona vector) for the steps after.

    >>> study = organism.start(smoke=True, out_dir="/tmp/00")        # doctest: +SKIP
    >>> study.evaluate(study.ctx.model, study.data.general, 2, name="chat_general").em   # doctest: +SKIP
    """

    ctx: StudyContext
    run: Any
    config: dict[str, Any]
    settings: dict[str, Any]
    seed: int = 0
    data: Any = None
    finetune: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        """The run folder."""
        return self.run.dir

    def evaluate(self, model: Any, questions: Any, n: int, *, name: str, **kw: Any):
        """:func:`emlab.evaluation.evaluate` of ``model`` on ``questions`` (``n`` samples each) with the
        study's judge, ``max_new_tokens`` and seed, its records saved as ``<name>_samples.jsonl``.

        A finished evaluation of this run is read back instead of sampled again: a run folder is only
        resumed with the same config and seed (:func:`emlab.runs.start_run`), so records that are all
        there and all judged are what sampling again would give. ``kw`` goes to ``evaluate``.
        """
        from emlab.evaluation import Evaluation, evaluate

        saved = self.saved_records(f"{name}_samples", expected=n * len(questions),
                                   metrics=kw.get("metrics", ("aligned", "coherent")))
        if saved is not None:
            thresholds = {k: kw[k] for k in ("aligned_below", "coherent_above", "inclusive", "incoherent_below")
                          if k in kw}
            return Evaluation.from_records(saved, "question_id", **thresholds)
        kw.setdefault("progress", False)
        return evaluate(model, self.ctx.tokenizer, questions, self.ctx.judge, n_per_question=n,
                        max_new_tokens=self.settings["max_new_tokens"], seed=self.seed, run=self.run, name=name,
                        **kw)

    def evaluate_records(self, model: Any, questions: Any, n: int, records: str):
        """Like :meth:`evaluate`, but the records go to ``<records>.jsonl`` only (no summary in ``metrics.json``:
        the studies whose metrics are cells of their own, 02 and 06) and are read back the same way."""
        from emlab.evaluation import Evaluation, evaluate

        if (saved := self.saved_records(records, expected=n * len(questions))) is not None:
            return Evaluation.from_records(saved, "question_id")
        ev = evaluate(model, self.ctx.tokenizer, questions, self.ctx.judge, n_per_question=n,
                      max_new_tokens=self.settings["max_new_tokens"], seed=self.seed, progress=False)
        self.run.write_records(records, ev.records)
        return ev

    def saved_direction(self, name: str):
        """The run folder's ``directions/<name>`` (:class:`emlab.vectors.Direction`; a step of a resumed run
        saved it), else None."""
        from emlab.vectors import Direction

        path = self.dir / "directions" / f"{name}.safetensors"
        return Direction.load(path) if path.exists() and path.with_suffix(".json").exists() else None

    def saved_records(self, name: str, *, expected: int, metrics: Any = ("aligned", "coherent")) -> list | None:
        """The run folder's ``<name>.jsonl`` when it holds ``expected`` records with every one of ``metrics``
        scored or finally unscored, else None (missing, cut short by a kill, or judged during a judge outage:
        done again). A missing score is final when its record says ``<metric>_retry: false`` (the judge
        answered without a score, e.g. REFUSAL; :func:`emlab.evaluation.judge_records`); records written
        before that field existed count as not final."""
        if not (self.run.dir / f"{name}.jsonl").exists():
            return None
        rows = self.run.read_records(name)
        if len(rows) != expected or any(r.get(m) is None and r.get(f"{m}_retry") is not False
                                        for r in rows for m in metrics):
            return None
        return rows

    def log(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Merge ``metrics`` into :attr:`metrics` and write them all to the run's ``metrics.json``; returns
        :attr:`metrics`."""
        self.metrics.update(metrics or {})
        self.run.log_metrics(self.metrics)
        return self.metrics
