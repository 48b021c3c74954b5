"""Study 04's notebook steps (start, sample, judge_first, judge_second, agreement, plot) in smoke mode on the
micro organism: one by one they give evaluation_study's metrics and files, and a resumed run reads its
judged answers back instead of sampling and judging again."""

import json

import pytest

from emlab.studies import evaluation
from emlab.studies.evaluation import evaluation_study


def _files(out):
    return {name: (out / name).read_text() for name in ("metrics.json", "general_samples.jsonl",
                                                         "judge2_samples.jsonl", "figure_data.json")}


def _steps(study):
    records = evaluation.sample(study)
    ev = evaluation.judge_first(study)
    return records, ev, evaluation.judge_second(study), evaluation.agreement(study), evaluation.plot(study)


@pytest.mark.slow
def test_the_steps_give_the_study_functions_metrics_and_a_resumed_run_reads_back(tmp_path, monkeypatch):
    import emlab.evaluation
    import emlab.generation

    metrics = evaluation_study(smoke=True, judge2="toy", out_dir=tmp_path / "study")
    study = evaluation.start(smoke=True, judge2="toy", out_dir=tmp_path / "steps")
    records, ev, ev2, table, figures = _steps(study)
    assert study.metrics == metrics and _files(tmp_path / "steps") == _files(tmp_path / "study")
    assert len(records) == metrics["n_samples"] == 2 * len(study.data) and ev.em == metrics["general_em"]
    assert ev2.em == metrics["judge2_general_em"] and len(ev2.records) == len(records)
    assert table.loc["aligned", "pearson"] == metrics["agreement_aligned_pearson"]
    assert table.loc["coherent", "n"] == len(records)  # the toy judge twice: every answer scored by both
    assert set(figures) == {"quadrant", "em_per_question", "judge_agreement"}

    def refused(*args, **kwargs):
        raise AssertionError("sampled or judged again")

    monkeypatch.setattr(emlab.generation, "sample_answers", refused)
    monkeypatch.setattr(emlab.evaluation, "judge_records", refused)
    again = evaluation.start(smoke=True, judge2="toy", out_dir=tmp_path / "steps")
    assert _steps(again)[0] == records
    assert again.metrics == metrics and _files(tmp_path / "steps") == _files(tmp_path / "study")


@pytest.mark.slow
def test_without_a_second_judge_its_steps_return_none(tmp_path):
    study = evaluation.start(smoke=True, judge2=None, out_dir=tmp_path)
    records, ev, ev2, table, figures = _steps(study)
    assert ev2 is None and table is None and set(figures) == {"quadrant", "em_per_question"}
    assert "judge2_general_em" not in json.loads((tmp_path / "metrics.json").read_text())
    assert study.metrics["n_samples"] == len(records)


def test_a_resumed_run_keeps_the_local_judges_final_missing_scores(tmp_path, monkeypatch):
    """The local judge's missing scores (no number among its top tokens, as on the micro organism) are its
    final answer: a resumed run reads them back instead of judging again (only an outage is retried)."""
    import emlab.evaluation

    study = evaluation.start(smoke=True, judge2="local", out_dir=tmp_path)
    evaluation.sample(study)
    evaluation.judge_first(study)
    ev2 = evaluation.judge_second(study)
    rows = [json.loads(line) for line in (tmp_path / "judge2_samples.jsonl").read_text().splitlines()]
    missing = [r for r in rows if r["aligned"] is None]
    assert missing and all(r["aligned_retry"] is False for r in missing)

    def refused(*args, **kwargs):
        raise AssertionError("judged again")

    monkeypatch.setattr(emlab.evaluation, "judge_records", refused)
    again = evaluation.start(smoke=True, judge2="local", out_dir=tmp_path)
    evaluation.sample(again)
    evaluation.judge_first(again)
    assert evaluation.judge_second(again).records == ev2.records
