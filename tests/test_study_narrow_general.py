"""Study 05 (narrow vs general solution) in smoke mode on the micro organism, plus its small helpers."""

import json
import math

import pytest

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


@pytest.mark.slow
def test_technical_style_smoke_on_a_rank1_lora(tmp_path):
    metrics = technical_style_study(kind="rank1_lora", smoke=True, out_dir=tmp_path / "tech")
    for who in ("chat", "general", "narrow"):
        for where in ("indomain", "other"):
            _finite_or_explained(metrics, f"technical_{where}_{who}")
            assert 0 <= metrics[f"technical_{where}_{who}"] <= 100
    for key in REQUIRED[4:]:
        _finite_or_explained(metrics, key)
    assert (tmp_path / "tech" / "figures" / "technical_rates.html").exists()


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
