"""Study 05 (narrow vs general solution) in smoke mode on the micro organism, plus its small helpers;
its notebook steps run one by one give the study function's metrics, and a resumed run reads its
finished finetunes, evaluations and drift back."""

import json
import math

import pytest

from emlab.metrics import untimed
from emlab.studies import narrow_general as ng
from emlab.studies.common import StudyRun
from emlab.studies.narrow_general import (
    KINDS,
    narrow_general_study,
    summarize_seeds,
    technical_style_study,
)
from emlab.studies.narrow_probes import put_metric

REQUIRED = (
    "general_em_general", "general_em_narrow", "indomain_em_general", "indomain_em_narrow",
    "loss_at_matched_norm_general", "loss_at_matched_norm_narrow",
    "stability_r_at_eps_0.5_general", "stability_r_at_eps_0.5_narrow",
    "pretrain_kl_at_norm_general", "pretrain_kl_at_norm_narrow", "pretrain_kl_at_norm_random",
)
FIGURES = ("em_rates", "misaligned_rates", "efficiency", "stability", "pretrain_kl", "drift")


def _finite_or_explained(metrics: dict, key: str) -> None:
    assert key in metrics, f"missing metric {key}"
    value = metrics[key]
    if value is None:
        assert metrics.get("none_reasons", {}).get(key), f"{key} is None without a reason"
    else:
        assert isinstance(value, float | int) and math.isfinite(value), f"{key} = {value!r}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("05") / "run"
    return out, narrow_general_study(smoke=True, out_dir=out)


@pytest.mark.slow
def test_smoke_metrics_present_and_finite(smoke_run):
    out, metrics = smoke_run
    for key in REQUIRED:
        _finite_or_explained(metrics, key)
    stored = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert stored[key] == metrics[key]
    assert 0 < metrics["matched_norm"] == min(metrics["norm_general"], metrics["norm_narrow"])
    # the drift starts where the narrow solution ended
    assert metrics["drift_cosine_start"] == pytest.approx(metrics["cosine_general_narrow"], abs=1e-6)


@pytest.mark.slow
def test_smoke_figures_recorded(smoke_run):
    out, _ = smoke_run
    specs = json.loads((out / "figure_data.json").read_text())
    for name in FIGURES:
        assert name in specs, f"figure {name} not recorded"
        assert (out / "figures" / f"{name}.html").exists()
    assert specs["efficiency"]["kind"] == "loss_vs_norm"
    rows = specs["efficiency"]["data"]["rows"]
    norms = {s: [r["norm"] for r in rows if r["solution"] == s] for s in ("general", "narrow")}
    assert norms["general"] == norms["narrow"]  # both solutions at the same absolute norms
    kl_dirs = {r["direction"] for r in specs["pretrain_kl"]["data"]["rows"]}
    assert kl_dirs == {"general", "narrow", "random"}


@pytest.fixture(scope="module")
def tech_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("05t") / "tech"
    return out, technical_style_study(kind="rank1_lora", smoke=True, out_dir=out)


def _stored(out):
    return untimed(json.loads((out / "metrics.json").read_text()), r"runtime|per_second")  # training wall times


def _em_steps(study):
    """The notebook's cells of the first task, after start."""
    general, narrow = ng.train_solution(study, "general"), ng.train_solution(study, "narrow")
    evals = {which: ng.evaluate_solution(study, which) for which in ("general", "narrow", "chat")}
    curves, stab, kl = ng.probe_efficiency(study), ng.probe_stability(study), ng.probe_influence(study)
    drift = ng.train_on_without_kl(study)
    return general, narrow, evals, curves, stab, kl, drift, ng.tabulate(study), ng.plot(study)


@pytest.mark.slow
def test_the_steps_one_by_one_give_the_study_functions_metrics(smoke_run, tmp_path, monkeypatch):
    import emlab.evaluation

    out, metrics = smoke_run
    study = ng.start(smoke=True, out_dir=tmp_path / "steps")
    assert isinstance(study, StudyRun) and study.metrics == {"kl_lambda": metrics["kl_lambda"]}
    general, narrow, evals, curves, stab, kl, drift, table, figures = _em_steps(study)
    assert _stored(tmp_path / "steps") == _stored(out)  # every number, the training logs and probe curves included
    assert {k: v for k, v in study.run.metrics.items() if k in study.metrics} == metrics
    assert general is study.state["general"] and narrow.norm() == metrics["norm_narrow"]
    assert evals["narrow"]["general"].em == metrics["general_em_narrow"] and set(evals["chat"]) == {"general"}
    assert set(curves) == set(stab) == {"general", "narrow"} and {"random_0", "general"} <= set(kl)
    assert drift[-1]["step"] == metrics["drift_steps"]
    assert table.loc["general_em", "narrow"] == metrics["general_em_narrow"]
    assert table.loc["pretrain_kl_at_norm", "random"] == metrics["pretrain_kl_at_norm_random"]
    assert set(FIGURES) <= set(figures)

    # the same run again (a notebook rerun, a killed run resumed): finished finetunes are loaded, the
    # evaluations and the drift read back from the run folder, nothing sampled again
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(emlab.evaluation, "evaluate", no_sampling)
    again = ng.start(smoke=True, out_dir=tmp_path / "steps")
    assert _em_steps(again)[6] == drift
    assert _stored(tmp_path / "steps") == _stored(out)
    assert {k: v for k, v in again.run.metrics.items() if k in again.metrics} == metrics


@pytest.mark.slow
def test_the_technical_steps_one_by_one_give_the_study_functions_metrics(tech_run, tmp_path):
    out, metrics = tech_run
    tech = ng.start_technical(kind="rank1_lora", smoke=True, out_dir=tmp_path / "tech")
    assert set(tech.state["questions"]) >= {"medical", "legal"} and tech.state["rows"]
    for which in ("general", "narrow"):
        ng.train_solution(tech, which)
    style = {which: ng.evaluate_style(tech, which) for which in ("chat", "general", "narrow")}
    assert set(style["narrow"]) == set(tech.state["questions"])
    ng.probe_efficiency(tech), ng.probe_stability(tech), ng.probe_influence(tech)
    assert "technical_rates" in ng.plot(tech)
    assert _stored(tmp_path / "tech") == _stored(out)
    assert ng.tabulate(tech).loc["technical_other", "narrow"] == metrics["technical_other_narrow"]


def test_a_step_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="which must be"):
        ng.train_solution(None, "both")
    untrained = StudyRun(None, None, {}, {}, state={"general": object()})
    with pytest.raises(ValueError, match="train the narrow solution first"):
        ng.probe_efficiency(untrained)


def test_tabulate_puts_one_solution_a_column():
    study = StudyRun(None, None, {}, {}, metrics={
        "kl_lambda": 3.0, "general_em_general": 10.0, "general_em_narrow": 1.0, "general_em_chat": 0.0,
        "pretrain_kl_at_norm_random": 0.5, "cosine_general_narrow": 0.9, "none_reasons": {"x_general": "why"}})
    table = ng.tabulate(study)
    assert list(table.columns) == ["general", "narrow", "chat", "random"]
    assert table.loc["general_em"].tolist()[:3] == [10.0, 1.0, 0.0]
    assert set(table.index) == {"general_em", "pretrain_kl_at_norm"}


@pytest.mark.slow
def test_technical_style_smoke_on_a_rank1_lora(tech_run):
    out, metrics = tech_run
    for who in ("chat", "general", "narrow"):
        for where in ("indomain", "other"):
            _finite_or_explained(metrics, f"technical_{where}_{who}")
            assert 0 <= metrics[f"technical_{where}_{who}"] <= 100
    for key in REQUIRED[4:]:
        _finite_or_explained(metrics, key)
    assert (out / "figures" / "technical_rates.html").exists()


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        narrow_general_study(kind="full", smoke=True)
    assert set(KINDS) == {"steering_vector", "rank1_lora", "lora"}


def test_put_keeps_finite_values_and_explains_the_rest():
    m: dict = {}
    put_metric(m, "a", 1.5, "unused")
    put_metric(m, "b", float("nan"), "R undefined")
    put_metric(m, "c", None, "not measured")
    assert m["a"] == 1.5 and m["b"] is None and m["c"] is None
    assert m["none_reasons"] == {"b": "R undefined (got nan)", "c": "not measured"}


def test_summarize_seeds_mean_and_std():
    out = summarize_seeds([{"x": 1.0, "y": None}, {"x": 3.0, "y": 2.0}, {"x": 5.0}])
    assert out["x"] == {"mean": 3.0, "std": 2.0, "n": 3}
    assert out["y"] == {"mean": 2.0, "std": None, "n": 1}


def test_kl_weight_and_learning_rate_per_kind_come_from_the_preset(tmp_path):
    """Study 05's narrow settings live in the preset (emlab.presets ``narrow``): the toy's values by default,
    a changed preset's values when one is passed, an explicit argument over both."""
    from emlab.presets import NARROW_KL_LAMBDA, PAPER, TOY

    assert TOY.narrow == {"kl_lambda": {"steering_vector": 3.0, "rank1_lora": 3.0, "lora": 10.0},
                          "learning_rates": {"rank1_lora": 3e-4}}
    assert PAPER.narrow == {"kl_lambda": NARROW_KL_LAMBDA, "learning_rates": {}}
    study = ng.start(kind="rank1_lora", smoke=True, out_dir=tmp_path / "a")
    assert study.config["kl_lambda"] == 3.0 and study.finetune["learning_rate"] == 3e-4
    assert study.config["preset"]["narrow"] == TOY.narrow
    mine = TOY.replace(narrow={"kl_lambda": {"rank1_lora": 7.0}, "learning_rates": {"rank1_lora": 0.5}})
    study = ng.start(kind="rank1_lora", smoke=True, out_dir=tmp_path / "b", preset=mine)
    assert study.config["kl_lambda"] == 7.0 and study.finetune["learning_rate"] == 0.5
    study = ng.start(kind="rank1_lora", smoke=True, out_dir=tmp_path / "c", preset=mine, kl_lambda=1.5,
                     learning_rate=0.25)
    assert study.config["kl_lambda"] == 1.5 and study.finetune["learning_rate"] == 0.25
    with pytest.raises(ValueError, match="no narrow-solution KL weight for kind 'lora'"):
        ng.start(kind="lora", smoke=True, out_dir=tmp_path / "d", preset=mine)
