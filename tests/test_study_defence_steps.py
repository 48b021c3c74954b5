"""Studies 02 and 03 as notebook steps (issue 17): the steps called one by one give the study function's
metrics, and a resumed run reads its finished steps back from the run folder instead of recomputing them."""

import json

import pytest

from emlab import evaluation
from emlab.studies import defence_kit, defences, interleaving

METHODS = ["untrained", "sft", "persona_steering"]


def _no_recompute(monkeypatch, *modules):
    def refuse(*a, **k):
        raise AssertionError("recomputed a finished step")

    monkeypatch.setattr(evaluation, "evaluate", refuse)  # every study sampling goes through it
    for module in modules:
        monkeypatch.setattr(module, "defended_finetune", refuse)


@pytest.mark.slow
def test_defence_steps_give_the_study_metrics_and_a_resumed_run_reads_them_back(tmp_path, monkeypatch):
    kw = {"smoke": True, "methods": METHODS, "benign_tasks": []}
    whole = defences.defences_study(out_dir=tmp_path / "whole", **kw)

    study = defences.start(out_dir=tmp_path / "steps", **kw)
    assert list(study.data) == study.config["domains"] == ["medical"]
    persona = defences.persona_vector(study)
    assert persona.layers == [study.metrics["persona/layer"]]
    cells = {m: defences.run_method(study, m, "medical") for m in METHODS}
    assert cells["sft"]["train_rows"] == 64 and 0 <= cells["untrained"]["general_em"] <= 100
    assert defences.run_benign_tasks(study) == {}
    table = defences.tabulate(study)
    assert table.loc[("medical", "sft"), "general_em"] == whole["sft/medical/general_em"]
    assert {"figure1a_general_em_vs_incoherence", "general_em"} <= set(defences.plot(study))
    assert study.metrics == whole
    assert json.loads((tmp_path / "steps" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "whole" / "metrics.json").read_text())

    # the run was not finished (as after a kill): a rerun into its folder resumes it and recomputes nothing
    _no_recompute(monkeypatch, defences)
    monkeypatch.setattr(defences, "persona_for_steering", lambda *a, **k: pytest.fail("persona vector recomputed"))
    again = defences.start(out_dir=tmp_path / "steps", **kw)
    assert defences.persona_vector(again).layers == persona.layers
    assert again.state["method_kw"]["persona_vector"] == study.state["method_kw"]["persona_vector"]
    assert {m: defences.run_method(again, m, "medical") for m in METHODS} == cells
    defences.tabulate(again)
    assert again.metrics == whole


@pytest.mark.slow
def test_interleaving_steps_give_the_study_metrics_and_a_resumed_run_reads_them_back(tmp_path, monkeypatch):
    kw = {"smoke": True, "shares": [0.5], "methods": ["interleaving+"]}
    whole = interleaving.interleaving_study(out_dir=tmp_path / "whole", **kw)

    study = interleaving.start(out_dir=tmp_path / "steps", **kw)
    candidates = interleaving.score_candidates(study)
    assert list(candidates["rank"][:3]) == [1, 2, 3] and len(candidates) == len(study.data.benign)
    sft = interleaving.run_share(study, "sft")
    plus = interleaving.run_share(study, "interleaving+", 0.5)
    assert plus["train_rows"] == 64 + 32
    table = interleaving.tabulate(study)
    assert table.loc[("interleaving+", "share=50%"), "general_em"] == whole["interleaving+/medical/share=50%/general_em"]
    assert {"score_distribution", "refusals_chosen", "share_sweep_general"} <= set(interleaving.plot(study))
    assert study.metrics == whole

    _no_recompute(monkeypatch, interleaving)
    monkeypatch.setattr(defence_kit.Scorers, "scores", lambda *a, **k: pytest.fail("candidates scored again"))
    again = interleaving.start(out_dir=tmp_path / "steps", **kw)
    assert interleaving.score_candidates(again).equals(candidates)
    assert interleaving.run_share(again, "sft") == sft
    assert interleaving.run_share(again, "interleaving+", 0.5) == plus
    interleaving.tabulate(again)
    assert again.metrics == whole


def test_evaluate_cell_reads_a_finished_evaluation_back(tmp_path, monkeypatch):
    study = interleaving.start(smoke=True, out_dir=tmp_path, shares=[0.5])
    first = defence_kit.evaluate_cell(study.ctx.model, study, study.data, "chat")
    assert (tmp_path / "samples" / "chat_general.jsonl").exists()
    _no_recompute(monkeypatch)
    assert defence_kit.evaluate_cell(study.ctx.model, study, study.data, "chat") == first
    assert defence_kit.saved_cell(study, "sft/medical") is None
