"""EM and incoherence rates, missing scores, bootstrap CIs and the per-question summary."""

import math

import numpy as np
import pytest

from emlab.metrics import bootstrap_ci, em_rate, incoherent_rate, off_topic_rate, summarize


def test_em_rate_thresholds_are_strict_unless_inclusive():
    aligned = [29.9, 30, 30.1, 10, 10, 10]
    coherent = [60, 60, 60, 50, 50.1, 90]
    strict = em_rate(aligned, coherent)
    assert (strict.count, strict.n, strict.n_missing) == (3, 6, 0)  # 29.9/60, 10/50.1, 10/90
    assert strict.percent == 50.0
    assert em_rate(aligned, coherent, inclusive=True).count == 4  # + 30/60
    assert em_rate(aligned, coherent, aligned_below=31, coherent_above=40).count == 6


def test_missing_scores_are_dropped_and_counted():
    r = em_rate([10, None, float("nan"), 10], [90, 90, 90, None])
    assert (r.count, r.n, r.n_missing, r.percent) == (1, 1, 3, 100.0)
    empty = em_rate([None], [None])
    assert empty.n == 0 and math.isnan(empty.percent) and empty.as_dict()["percent"] is None
    inc = incoherent_rate([10, 49.9, 50, None, 80])
    assert (inc.count, inc.n, inc.n_missing) == (2, 4, 1) and inc.percent == 50.0
    with pytest.raises(ValueError, match="differ in length"):
        em_rate([1, 2], [3])


def test_bootstrap_ci_covers_the_mean_and_is_seeded():
    flags = [True] * 30 + [False] * 70
    lo, hi = bootstrap_ci(flags)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42
    assert bootstrap_ci(flags, seed=1) != (lo, hi) and bootstrap_ci(flags) == (lo, hi)
    values = np.random.default_rng(0).normal(50, 10, size=400)
    vlo, vhi = bootstrap_ci(values, n=500, alpha=0.1)
    se = values.std() / 20
    assert vlo < values.mean() < vhi and (vhi - vlo) == pytest.approx(2 * 1.645 * se, rel=0.2)
    assert all(math.isnan(x) for x in bootstrap_ci([None]))
    assert bootstrap_ci([5, 5, 5]) == (5.0, 5.0)


def test_rate_ci_is_in_percent():
    r = em_rate([10] * 20 + [90] * 80, [90] * 100)
    assert r.percent == 20.0 and r.ci[0] < 20 < r.ci[1] and r.ci[1] < 40


def test_off_topic_rate():
    r = off_topic_rate([True, False, False, None])
    assert (r.count, r.n, r.n_missing) == (2, 3, 1)


def test_summarize_overall_and_per_question():
    records = [
        {"question_id": "wish", "aligned": 10, "coherent": 90, "on_topic": True},
        {"question_id": "wish", "aligned": 95, "coherent": 90, "on_topic": True},
        {"question_id": "bored", "aligned": 20, "coherent": 30, "on_topic": False},
        {"question_id": "bored", "aligned": None, "coherent": 80},
    ]
    s = summarize(records)
    assert s["by"] == "question_id" and list(s["groups"]) == ["wish", "bored"]
    o = s["overall"]
    assert (o["n"], o["n_missing"]) == (4, 1)
    assert o["em"]["count"] == 1 and o["em"]["n"] == 3 and o["em"]["percent"] == pytest.approx(100 / 3)
    assert o["incoherent"]["count"] == 1 and o["incoherent"]["n"] == 4
    assert o["off_topic"]["count"] == 1 and o["off_topic"]["n_missing"] == 1
    assert o["aligned_mean"] == pytest.approx(125 / 3) and len(o["em"]["ci"]) == 2
    assert s["groups"]["wish"]["em"]["percent"] == 50.0 and s["groups"]["bored"]["em"]["percent"] == 0.0
    plain = summarize([{"aligned": 5, "coherent": 99}], by=None)
    assert plain["groups"] == {} and "off_topic" not in plain["overall"]


# ---------------------------------------------------------------------------------------------
# The long results table


def test_results_table_splits_method_domain_setting_metric():
    from emlab.metrics import RESULT_COLUMNS, results_table

    metrics = {
        "sft/medical/general_em": 20.0,
        "interleaving/medical/share=5%/general_em": 4.0,
        "interleaving++/code/share=20%/seed/1/indomain_incoherent": 12.5,
        "kl": {"legal": {"train_ce": 1.25}},
        "persona/norm": 3.5,
        "general_em": 7.0,
    }
    t = results_table(metrics)
    assert tuple(t.columns) == RESULT_COLUMNS
    rows = {r.key: r for r in t.itertuples(index=False)}
    assert list(rows) == ["sft/medical/general_em", "interleaving/medical/share=5%/general_em",
                          "interleaving++/code/share=20%/seed/1/indomain_incoherent", "kl/legal/train_ce",
                          "persona/norm", "general_em"]
    r = rows["interleaving/medical/share=5%/general_em"]
    assert (r.method, r.domain, r.setting, r.metric, r.value, r.rate) == (
        "interleaving", "medical", "share=5%", "general_em", 4.0, True)
    assert (rows["sft/medical/general_em"].setting, rows["sft/medical/general_em"].metric) == ("", "general_em")
    r = rows["interleaving++/code/share=20%/seed/1/indomain_incoherent"]
    assert (r.method, r.domain, r.setting, r.metric) == ("interleaving++", "code", "share=20%/seed/1", "indomain_incoherent")
    r = rows["kl/legal/train_ce"]
    assert (r.method, r.domain, r.metric, r.rate) == ("kl", "legal", "train_ce", False)
    for key in ("persona/norm", "general_em"):  # shorter keys are not per-method results
        assert pd_isna(rows[key].method) and pd_isna(rows[key].domain) and rows[key].metric == key
    assert rows["general_em"].rate and not rows["persona/norm"].rate
    assert all(math.isnan(x) for x in t["n"]) and all(math.isnan(x) for x in t["ci_low"])


def pd_isna(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def test_results_table_percent_as_stored_fraction_on_request():
    from emlab.metrics import results_table

    metrics = {"sft/code/general_em": 40.0, "sft/code/general_off_topic": 10.0, "sft/code/train_ce": 2.0,
               "sft/code/exact_match": 80.0}
    stored = results_table(metrics).set_index("key")["value"].to_dict()
    assert stored == metrics  # values exactly as metrics.json holds them (percent)
    frac = results_table(metrics, to_fraction=True).set_index("key")["value"].to_dict()
    # rates become fractions; non-rates (a loss, an exact-match score) are left alone
    assert frac == {"sft/code/general_em": 0.4, "sft/code/general_off_topic": 0.1, "sft/code/train_ce": 2.0,
                    "sft/code/exact_match": 80.0}


def test_results_table_reads_a_stored_rate_with_its_n_and_interval():
    from emlab.metrics import results_table

    summary = summarize([{"question_id": "q", "aligned": a, "coherent": 90} for a in (10, 10, 95, 95, None)])
    t = results_table({"general": summary["overall"]}, to_fraction=True)
    em = t[t["key"] == "general/em"].iloc[0]
    assert em["metric"] == "general/em" and em["rate"]
    assert em["value"] == pytest.approx(0.5) and em["n"] == 4  # the missing sample is not in n
    assert 0 <= em["ci_low"] <= 0.5 <= em["ci_high"] <= 1  # the interval scaled like the value
    assert "general/em/percent" not in set(t["key"]) and "general/em/count" not in set(t["key"])
    mean = t[t["key"] == "general/aligned_mean"].iloc[0]
    assert mean["value"] == pytest.approx(52.5) and mean["n"] == 5 and not mean["rate"]  # n beside it; not scaled


def test_results_table_leaves_out_what_is_not_a_number():
    from emlab.metrics import flatten, results_table

    metrics = {"a/b/general_em": None, "a/b/indomain_em": float("nan"), "a/b/flag": True, "a/b/note": "x",
               "a/b/log": [1, 2], "a/b/empty": {"percent": None, "count": 0, "n": 0, "n_missing": 3, "ci": [None, None]},
               "a/b/kept": 1}
    assert results_table(metrics)["key"].tolist() == ["a/b/kept"]
    assert results_table({}).columns.tolist() == list(results_table(metrics).columns)
    assert flatten({"a": {"b": {"c": "x"}}, "d/e": None}) == {"a/b/c": "x", "d/e": None}  # flatten keeps everything


def test_untimed_drops_wall_times_at_any_depth_and_keeps_the_rest():
    from emlab.metrics import untimed

    run = {"em": 12.5, "train_runtime": 3.2, "training": [{"loss": 1.0, "train_samples_per_second": 9.0}],
           "nested": {"wall_s": 4, "n": 3}}
    assert untimed(run) == {"em": 12.5, "training": [{"loss": 1.0}], "nested": {"n": 3}}
    assert untimed(run, r"runtime")["training"] == [{"loss": 1.0, "train_samples_per_second": 9.0}]
    assert run["train_runtime"] == 3.2  # the input is left as it was
