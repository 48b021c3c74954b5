"""No study crashes on missing judgments: gaps in the figures, None metrics with the reason recorded.

A judge that returns no score at all (an unreachable or weak judge) used to make ``directions_study``
write metrics.json and then raise KeyError in ``plots.steering_sweep`` (and ``defences_study`` /
``interleaving_study`` in ``plots.defence_scatter``). The studies run on the micro toy organism here
(seconds); ``tests/test_notebooks_real.py`` runs every notebook on SmolLM2.
"""

import json

import pytest

from emlab import plots
from emlab.judge import Judgment
from emlab.studies import common


class NullJudge:
    """Every judgment missing, with a reason, as an unreachable judge returns them."""

    name = "null"

    def score(self, metric, pairs):
        return [Judgment(None, "judge unreachable (test)") for _ in pairs]


# --- the figures -------------------------------------------------------------------------------


def test_steering_sweep_draws_gaps_for_missing_values():
    rows = [{"alpha": 0.0, "general_em": 0.1, "general_incoherent": 0.2},
            {"alpha": 1.0, "general_em": None, "general_incoherent": None},
            {"alpha": 2.0, "general_em": 0.3, "general_incoherent": 0.1}]
    fig = plots.steering_sweep(rows, coherence="general_incoherent")
    em = fig.data[0].y
    assert em[0] == pytest.approx(10.0) and em[1] != em[1] and em[2] == pytest.approx(30.0)  # NaN: a gap
    assert not fig.layout.annotations  # nothing to explain


def test_steering_sweep_without_any_judged_value_is_an_annotated_empty_figure():
    for rows in ([], [{"alpha": 0.0, "general_em": None, "general_incoherent": None}]):
        fig = plots.steering_sweep(rows, coherence="general_incoherent")
        assert any("no judged values" in a.text for a in fig.layout.annotations)


def test_steering_sweep_still_rejects_wrong_column_names():
    with pytest.raises(KeyError, match="general_em"):
        plots.steering_sweep([{"alpha": 0.0, "em": 0.1, "coherent": 80}])


def test_defence_scatter_and_table2_without_rates():
    metrics = {"sft/medical/train_ce": 1.2}  # every rate missing
    fig = plots.defence_scatter(metrics, x="general_em", y="general_incoherent")
    assert any("no judged values" in a.text for a in fig.layout.annotations)
    assert "| medical | Misaligned (SFT) | – | – | – | – |" in plots.table2_markdown(metrics)  # dashes, no crash


def test_quadrant_and_bars_without_judgments():
    fig = plots.quadrant_scatter([{"aligned": None, "coherent": None, "question_id": "q"}], color="question_id")
    assert fig.layout.title.text.endswith("no judged answers")
    assert any("no judged values" in a.text for a in plots.em_bars({}).layout.annotations)


def test_figures_with_gaps_round_trip_through_figure_data(tmp_path):
    plots.record(tmp_path, "sweep", "steering_sweep", formats=("html",), coherence="general_incoherent",
                 rows=[{"alpha": 0.0, "general_em": None, "general_incoherent": 0.5}])
    assert list(plots.load_figures(tmp_path)) == ["sweep"]


# --- the reasons -------------------------------------------------------------------------------


def test_missing_reason_counts_and_quotes_the_judge():
    recs = [{"aligned": None, "aligned_reason": "HTTP 500", "coherent": None, "coherent_reason": "HTTP 500"},
            {"aligned": 90, "coherent": 80}]
    why = common.missing_reason(recs)
    assert why.startswith("no judged answers: 1 of 2 answers") and "HTTP 500 (2x)" in why


def test_explain_nones_keeps_earlier_reasons_and_skips_values():
    m = {"a": None, "b": 1.0, "none_reasons": {"a": "first"}}
    common.explain_nones(m, "second", ["a", "b"])
    assert m["none_reasons"] == {"a": "first"}
    assert common.explain_nones({"x": 0.0}, "why") == {"x": 0.0}


# --- the studies, end to end -------------------------------------------------------------------

STUDIES = {
    "quickstart": ({}, ["chat_general_em"]),
    "em_organism": ({}, ["chat_general_em", "ft_general_em", "ft_indomain_em"]),
    "directions_study": ({}, ["chat_general_em", "ft_general_em", "steer_general_em", "steer_best_alpha"]),
    "defences_study": ({"methods": ["untrained", "sft"]}, ["sft/medical/general_em", "untrained/medical/indomain_em"]),
    "interleaving_study": ({"methods": ["interleaving"], "shares": [0.05]}, ["sft/medical/general_em"]),
    "evaluation_study": ({"judge2": None}, ["general_em"]),
    "narrow_general_study": ({"drift_steps": 0}, ["general_em_general", "general_em_narrow"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDIES))
def test_study_finishes_without_judgments(name, tmp_path):
    import emlab.studies as st

    kw, keys = STUDIES[name]
    getattr(st, name)(seed=0, out_dir=tmp_path, smoke=True, judge=NullJudge(), **kw)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    reasons = metrics["none_reasons"]
    for key in keys:
        assert metrics.get(key) is None, key
        assert "judge unreachable (test)" in reasons[key] or "no alpha" in reasons[key], (key, reasons.get(key))
    assert list((tmp_path / "figures").glob("*.html")), "no figure written"
