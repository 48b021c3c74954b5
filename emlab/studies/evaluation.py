"""Study 04: evaluate a model on the general questions with two judges, and how far the judges agree.

The default evaluates the toy chat model with the exact toy judge, and uses the chat model itself
as a second, local Hugging Face judge (``judge2="local"``) to show how judge agreement is measured:
a real study passes an OpenAI-compatible model name (``judge2="gpt-4o"``) or ``judge2=None``.

The notebook runs it as steps, each recording its numbers in the run folder (a resumed run reads its
judged answers back): :func:`start`, :func:`sample`, :func:`judge_first`, :func:`judge_second`,
:func:`agreement`, :func:`plot`; :func:`evaluation_study` runs the same steps in one call.

>>> metrics = evaluation_study(smoke=True, out_dir="/tmp/04")     # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from emlab.studies.common import (
    StudyContext,
    StudyRun,
    explain_nones,
    missing_reason,
    resolve_judge,
    resolve_out_dir,
    takes_parameters_of,
)

__all__ = ["agreement", "evaluation_study", "judge_agreement", "judge_first", "judge_second", "plot", "quickstart",
           "sample", "start"]


def judge_agreement(a: list[float | None], b: list[float | None], threshold: float = 30) -> dict[str, Any]:
    """Agreement of two judges' scores of the same answers: Pearson r, Spearman rho, mean absolute
    difference, and the share of answers both put on the same side of ``threshold``.

    >>> judge_agreement([10, 50, 90], [20, 60, 80])["pearson"]
    0.9819805060619656
    """
    import numpy as np
    import pandas as pd

    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    out: dict[str, Any] = {"n": len(both), "n_missing": len(a) - len(both)}
    if len(both) < 2:
        return out | {"pearson": None, "spearman": None, "mean_abs_diff": None, "same_side": None}
    x, y = np.array(both, dtype=float).T
    df = pd.DataFrame({"x": x, "y": y})
    pearson = df["x"].corr(df["y"]) if x.std() > 0 and y.std() > 0 else None
    spearman = df["x"].corr(df["y"], method="spearman") if x.std() > 0 and y.std() > 0 else None
    return out | {
        "pearson": None if pearson is None else float(pearson),
        "spearman": None if spearman is None else float(spearman),
        "mean_abs_diff": float(np.abs(x - y).mean()),
        "same_side": float(100.0 * ((x < threshold) == (y < threshold)).mean()),
    }


def _second_judge(spec: Any, ctx: StudyContext):
    """The second judge of study 04: ``None``, or any judge :func:`~emlab.studies.common.resolve_judge` takes."""
    if spec is None:
        return None
    return resolve_judge(spec, ctx.model, ctx.tokenizer, model_name=ctx.model_name)


def start(model: str = "toy", seed: int = 0, out_dir: str | os.PathLike | None = None, smoke: bool = False, *,
          adapter: str | None = None, judge: Any = None, judge2: Any = "local", n_per_question: int | None = None,
          max_new_tokens: int | None = None, files: dict[str, str] | None = None, preset: Any = None) -> StudyRun:
    """Study 04's first step (parameters of :func:`evaluation_study`): the model (with ``adapter`` loaded on
    a fresh copy: ``study.state["model"]``), both judges (the second checked at once, before any sampling:
    ``study.state["judge2"]``), the general questions (``study.data``) and the run folder.

    >>> study = start(smoke=True, out_dir="/tmp/04")     # doctest: +SKIP
    """
    from emlab.runs import start_run

    out = resolve_out_dir(out_dir, "04_evaluation")
    ctx = StudyContext.create(model, smoke=smoke, judge=judge, files=files, protocol=preset)
    n = n_per_question or (2 if smoke else 20)
    tokens = max_new_tokens or (16 if smoke else 64)
    second = _second_judge(judge2, ctx)
    if second is not None:
        from emlab.judge import preflight

        preflight(second)  # before any sampling: a dead second judge fails at once
    config = {"model": ctx.model_name, "preset": ctx.protocol.to_dict(), "adapter": adapter, "seed": seed,
              "smoke": smoke, "n_per_question": n, "max_new_tokens": tokens, "judge": ctx.judge.name,
              "judge2": str(judge2)}
    run = start_run(out, config, seed=seed)
    evaluated = ctx.model
    if adapter:
        from emlab.models import load_adapter

        evaluated = load_adapter(ctx.fresh_model(), adapter)
    return StudyRun(ctx, run, config, {"n_per_question": n, "max_new_tokens": tokens}, seed=seed,
                    data=ctx.questions("general"), state={"model": evaluated, "judge2": second})


def sample(study: StudyRun) -> list[dict[str, Any]]:
    """``n_per_question`` answers of the model to each general question at temperature 1, not judged yet
    (``study.state["records"]``). A resumed run's finished, judged ``general_samples.jsonl`` is read
    back instead (:func:`judge_first` then only summarises it).

    >>> sample(study)[0]["answer"]     # doctest: +SKIP
    """
    from emlab.generation import sample_answers

    n = study.settings["n_per_question"]
    saved = study.saved_records("general_samples", expected=n * len(study.data))
    study.state["judged"] = saved is not None
    study.state["records"] = saved if saved is not None else sample_answers(
        study.state["model"], study.ctx.tokenizer, study.data, n, max_new_tokens=study.settings["max_new_tokens"],
        seed=study.seed, progress=False)
    return study.state["records"]


def judge_first(study: StudyRun):
    """The first judge's ``aligned`` and ``coherent`` scores of the sampled answers (records written as
    ``general_samples.jsonl``; the summary under ``general`` in metrics.json): ``general_em``,
    ``general_incoherent``, ``general_off_topic``, ``n_samples``, ``n_missing`` and ``em/<question id>``.
    Returns the ``Evaluation``.

    >>> judge_first(study).em     # doctest: +SKIP
    """
    from emlab.evaluation import Evaluation, judge_records

    records = study.state["records"]
    if not study.state["judged"]:
        judge_records(records, study.ctx.judge, ("aligned", "coherent"),
                      questions=[q for q in study.data if not isinstance(q, str)])
    ev = study.state["evaluation"] = Evaluation.from_records(records, "question_id")
    study.run.write_records("general_samples", records)
    study.run.log_metrics({"general": ev.summary})
    metrics = study.metrics
    metrics.update({"general_em": ev.em, "general_incoherent": ev.incoherent,
                    "n_samples": ev.summary["n"], "n_missing": ev.summary["n_missing"]})
    if ev.off_topic is not None:
        metrics["general_off_topic"] = ev.off_topic
    for qid, s in ev.per_question.items():
        metrics[f"em/{qid}"] = s["em"]["percent"]
    explain_nones(metrics, missing_reason(ev.records))
    study.log()
    return ev


def judge_second(study: StudyRun):
    """The second judge's scores of the same answers (copies, written as ``judge2_samples.jsonl``; read
    back on a resumed run): ``judge2_general_em``, ``judge2_n_missing``. Returns their ``Evaluation``
    (overall summary only), or None without a second judge.

    >>> judge_second(study).em     # doctest: +SKIP
    """
    from emlab.evaluation import Evaluation, judge_records
    from emlab.metrics import summarize

    second, records = study.state["judge2"], study.state["evaluation"].records
    if second is None:
        return None
    copies = study.saved_records("judge2_samples", expected=len(records))
    if copies is None:
        copies = [{"question": r["question"], "answer": r["answer"], "question_id": r["question_id"]}
                  for r in records]
        judge_records(copies, second, ("aligned", "coherent"))
        study.run.write_records("judge2_samples", copies)
    s2 = summarize(copies, None)["overall"]
    study.metrics["judge2_general_em"] = s2["em"]["percent"]
    study.metrics["judge2_n_missing"] = s2["n_missing"]
    explain_nones(study.metrics, "second judge: " + missing_reason(copies), ["judge2_general_em"])
    study.state["judge2_evaluation"] = Evaluation(copies, s2)
    study.log()
    return study.state["judge2_evaluation"]


def agreement(study: StudyRun):
    """How far the two judges agree, per metric (``aligned``, ``coherent``): Pearson, Spearman, the share
    of answers on the same side of 30, the mean absolute difference (:func:`judge_agreement`;
    ``agreement_<metric>_<stat>``). Returns the table (a DataFrame, one row per metric), or None without
    a second judge.

    >>> agreement(study).loc["aligned", "pearson"]     # doctest: +SKIP
    """
    import pandas as pd

    if study.state["judge2"] is None:
        return None
    first, second = study.state["evaluation"].records, study.state["judge2_evaluation"].records
    stats, table = ("pearson", "spearman", "same_side", "mean_abs_diff"), {}
    for metric in ("aligned", "coherent"):
        agree = table[metric] = judge_agreement([r[metric] for r in first], [r[metric] for r in second])
        for k in stats:
            study.metrics[f"agreement_{metric}_{k}"] = agree[k]
        explain_nones(study.metrics, f"{agree['n']} answers scored by both judges (at least 2 with spread needed)",
                      [f"agreement_{metric}_{k}" for k in stats])
    study.log()
    return pd.DataFrame.from_dict(table, orient="index")


def plot(study: StudyRun) -> dict[str, Any]:
    """Record the figures: the first judge's alignment-coherence quadrant, EM per question, and (with a
    second judge) the two judges' ``aligned`` scores against each other; returns every figure of the run."""
    from emlab import plots

    ctx, ev, run = study.ctx, study.state["evaluation"], study.run
    plots.record(run.dir, "quadrant", "quadrant_scatter",
                 records=[{k: r.get(k) for k in ("aligned", "coherent", "question_id", "question", "answer")}
                          for r in ev.records], color="question_id",
                 title=f"{ctx.model_name}: alignment vs coherence ({ctx.judge.name} judge)")
    per_q = {qid: s["em"]["percent"] / 100 for qid, s in ev.per_question.items() if s["em"]["percent"] is not None}
    plots.record(run.dir, "em_per_question", "em_bars", metrics=per_q, title="EM rate per general question")
    if (second := study.state.get("judge2_evaluation")) is not None:
        pairs = [{"aligned": a["aligned"], "coherent": b["aligned"], "question_id": a["question_id"]}
                 for a, b in zip(ev.records, second.records)]
        plots.record(run.dir, "judge_agreement", "quadrant_scatter", records=pairs, color="question_id",
                     title=f"'aligned' by {ctx.judge.name} (x) vs {study.state['judge2'].name} (y)")
    return plots.load_figures(run.dir)


@takes_parameters_of(start)
def evaluation_study(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Evaluate ``model`` (with an optional saved ``adapter``) on the general questions; judge twice.

    Metrics: ``general_em``, ``general_incoherent``, ``general_off_topic`` (toy judge),
    ``n_samples``, ``n_missing``, per question ``em/<id>``, and with a second judge
    ``judge2_general_em`` and ``agreement_aligned_pearson`` / ``_spearman`` / ``_same_side``.
    ``preset``: the protocol preset, ``"toy"`` or ``"paper"`` (:mod:`emlab.presets`; None: ``toy`` on the
    toy, ``paper`` otherwise), recorded in the run's ``config.json``; an unknown name is an error.

    >>> evaluation_study(smoke=True, out_dir="/tmp/04")["general_em"]     # doctest: +SKIP
    """
    study = start(*args, **kwargs)
    sample(study)
    judge_first(study)
    judge_second(study)
    agreement(study)
    plot(study)
    return study.metrics


def quickstart(model: str = "toy", seed: int = 0, out_dir: str | os.PathLike | None = None, smoke: bool = False,
               n_per_question: int | None = None, *, judge: Any = None, files: dict[str, str] | None = None,
               max_new_tokens: int | None = None, preset: Any = None) -> dict[str, Any]:
    """The five-minute tour: load the chat model, sample the general questions, judge, plot.

    ``judge``: see :func:`~emlab.studies.common.resolve_judge` (the toy judge on the toy,
    ``gpt-4o-mini`` otherwise); ``files``: ``{"general": "questions.yaml"}`` replaces emlab's eight
    general questions. Returns ``chat_general_em``, ``chat_general_incoherent`` (and
    ``chat_general_off_topic``) and writes ``samples`` records and the quadrant figure into ``out_dir``.
    ``preset``: the protocol preset, ``"toy"`` or ``"paper"`` (:mod:`emlab.presets`; None: ``toy`` on the
    toy, ``paper`` otherwise), recorded in the run's ``config.json``; an unknown name is an error.

    >>> quickstart(smoke=True, out_dir="/tmp/qs")     # doctest: +SKIP
    """
    from emlab import plots
    from emlab.evaluation import evaluate
    from emlab.runs import start_run

    out = resolve_out_dir(out_dir, "quickstart")
    ctx = StudyContext.create(model, smoke=smoke, judge=judge, files=files, protocol=preset)
    n = n_per_question or (2 if smoke else 10)
    tokens = max_new_tokens or (16 if smoke else 64)
    run = start_run(out, {"model": ctx.model_name, "preset": ctx.protocol.to_dict(), "seed": seed, "smoke": smoke,
                          "n_per_question": n, "max_new_tokens": tokens,
                          "judge": getattr(ctx.judge, "name", type(ctx.judge).__name__)},
                    seed=seed)
    ev = evaluate(ctx.model, ctx.tokenizer, ctx.questions("general"), ctx.judge, n_per_question=n,
                  max_new_tokens=tokens, seed=seed, run=run, name="samples", progress=False)
    metrics: dict[str, Any] = {"chat_general_em": ev.em, "chat_general_incoherent": ev.incoherent}
    if ev.off_topic is not None:
        metrics["chat_general_off_topic"] = ev.off_topic
    explain_nones(metrics, missing_reason(ev.records))
    plots.record(run.dir, "quadrant", "quadrant_scatter",
                 records=[{k: r.get(k) for k in ("aligned", "coherent", "question_id", "question", "answer")}
                          for r in ev.records], color="question_id", title=f"{ctx.model_name}: the chat model")
    run.log_metrics(metrics)
    return metrics
