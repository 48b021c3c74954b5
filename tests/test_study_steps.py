"""Study 00 as notebook steps (issue 17): the steps one by one give the study function's metrics, and a
finished evaluation of a run is read back from its folder instead of sampled again."""

from __future__ import annotations

import json

import pytest

from emlab import evaluation
from emlab.studies import organism

_TIMING = ("runtime", "per_second", "seconds", "time")


def _values(run_dir):
    from emlab.metrics import flatten

    flat = flatten(json.loads((run_dir / "metrics.json").read_text()))
    return {k: v for k, v in flat.items() if not any(t in k for t in _TIMING)}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "00"
    organism.em_organism(smoke=True, seed=1, out_dir=out)
    return out


def test_steps_one_by_one_equal_the_study_function(whole, tmp_path):
    study = organism.start(smoke=True, seed=1, out_dir=tmp_path / "00")
    assert study.data.misaligned and study.config["seed"] == 1
    chat = organism.evaluate_chat(study)
    assert study.metrics["chat_general_em"] == chat.em
    ft = organism.finetune_on(study, "misaligned")
    assert ft.log_history and (tmp_path / "00" / "ft_misaligned").is_dir()
    evals = organism.evaluate_finetune(study, ft)
    assert {"ft_general", "ft_indomain"} <= set(evals) and len(evals) == 2 + len(study.data.other_heldout)
    aligned = organism.evaluate_aligned(study, organism.finetune_on(study, "aligned"))
    assert study.metrics["aligned_ft_general_em"] == aligned.em
    metrics = organism.tabulate(study)
    assert (tmp_path / "00" / "figure_data.json").exists()
    assert _values(tmp_path / "00") == _values(whole)
    assert metrics["ft_other_domains_em"] == json.loads((whole / "metrics.json").read_text())["ft_other_domains_em"]


def test_a_finished_evaluation_is_read_back_and_an_incomplete_one_is_done_again(tmp_path, monkeypatch):
    study = organism.start(smoke=True, out_dir=tmp_path / "00")
    first = organism.evaluate_chat(study)
    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(k["name"]) or real(*a, **k))
    again = organism.evaluate_chat(study)
    assert calls == [] and again.summary == first.summary and again.records == first.records
    path = tmp_path / "00" / "chat_general_samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["aligned"] = None  # judged during an outage: sampled and judged again
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.saved_records("chat_general_samples", expected=len(rows)) is None
    redone = organism.evaluate_chat(study)
    assert calls == ["chat_general"] and redone.summary == first.summary
    rows[0]["aligned_retry"] = True  # an outage, as judge_records marks it: done again
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.saved_records("chat_general_samples", expected=len(rows)) is None
    rows[0]["aligned_retry"] = False  # the judge's final answer had no score (e.g. REFUSAL): kept
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.saved_records("chat_general_samples", expected=len(rows))[0]["aligned"] is None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # cut short by a kill
    assert study.saved_records("chat_general_samples", expected=len(rows)) is None
    assert study.saved_records("chat_general_samples", expected=len(rows) - 1, metrics=("coherent",)) is not None


def test_every_study_function_takes_exactly_its_start_parameters():
    import inspect

    from emlab.studies import beyond, defences, directions, evaluation, interleaving, narrow_general
    from emlab.studies.common import takes_parameters_of

    pairs = [(organism.em_organism, organism.start), (directions.directions_study, directions.start),
             (defences.defences_study, defences.start), (interleaving.interleaving_study, interleaving.start),
             (evaluation.evaluation_study, evaluation.start), (narrow_general.narrow_general_study, narrow_general.start),
             (narrow_general.technical_style_study, narrow_general.start_technical), (beyond.beyond_study, beyond.start)]
    for study_fn, start in pairs:
        shown = inspect.signature(study_fn)
        assert shown.parameters == inspect.signature(start).parameters, study_fn.__name__
        assert shown.return_annotation != "StudyRun", study_fn.__name__
    with pytest.raises(TypeError, match="domian"):
        organism.em_organism(smoke=True, domian="legal")

    @takes_parameters_of(lambda a, b=2: None)
    def f(*args, **kwargs) -> int:
        return 1

    assert list(inspect.signature(f).parameters) == ["a", "b"] and inspect.signature(f).return_annotation == "int"
