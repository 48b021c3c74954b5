import contextlib
import json
import sys
import types

import pytest

from emlab import widgets
from emlab.judge.base import Judgment


class FakeJudge:
    name = "fake"

    def score(self, metric, pairs):
        # "evil" answers are misaligned and coherent
        return [Judgment(10.0 if "evil" in a else 90.0) if metric == "aligned" else Judgment(80.0) for _, a in pairs]


def fake_tools(calls):
    @contextlib.contextmanager
    def steer(model, vectors, alpha=1.0, positions="all"):
        calls.append(("steer", model, dict(vectors), alpha))
        yield

    def generate(model, tokenizer, prompts, *, max_new_tokens, temperature, seed, **kwargs):
        layer, alpha = next(iter(calls[-1][2])), calls[-1][3]
        calls.append(("generate", list(prompts), max_new_tokens, *([kwargs] if kwargs else [])))
        return [f"{'evil ' if alpha > 0 else ''}answer to {p} at layer {layer} alpha {alpha:g}" for p in prompts]

    return steer, generate


def test_steering_explorer_generates_with_the_chosen_layer_and_alpha():
    calls = []
    steer, generate = fake_tools(calls)
    direction = {1: "v1", 2: "v2", 3: "v3"}
    w = widgets.steering_explorer(
        "model", "tok", direction, FakeJudge(), ["hi", "who <are> you"], generate=generate, steer=steer
    )
    assert w.output.value == ""
    w.layer.value, w.alpha.value, w.max_new_tokens.value = 3, 4.5, 7
    w.button.click()
    assert calls[0] == ("steer", "model", {3: "v3"}, 4.5)
    assert calls[1] == ("generate", ["hi", "who <are> you"], 7)
    out = w.output.value
    assert "layer 3, alpha 4.5" in out and "evil answer to hi at layer 3 alpha 4.5" in out
    assert "who &lt;are&gt; you" in out  # escaped
    assert out.count("background:#fde8e8") == 2 and "<td>10</td><td>80</td>" in out  # EM rows shaded, scores shown

    w.alpha.value = -2.0
    w.run()
    assert "alpha -2" in w.output.value and "background:#fde8e8" not in w.output.value
    assert not w.button.disabled


def test_steering_explorer_imports_generation_and_hooks_late(monkeypatch):
    calls = []
    steer, generate = fake_tools(calls)
    monkeypatch.setitem(sys.modules, "emlab.generation", types.SimpleNamespace(generate=generate))
    monkeypatch.setitem(sys.modules, "emlab.hooks", types.SimpleNamespace(steer=steer))
    direction = types.SimpleNamespace(vectors={0: "v0"})  # a Direction-like value
    w = widgets.steering_explorer("m", "t", direction, prompts=["q"])
    w.button.click()
    assert "answer to q at layer 0 alpha 0" in w.output.value and "<th>aligned</th>" not in w.output.value
    assert calls[-1] == ("generate", ["q"], 80, {"progress": False})  # no progress bar from a callback


def test_steering_explorer_starts_at_the_given_layer_and_alpha():
    calls = []
    steer, generate = fake_tools(calls)
    w = widgets.steering_explorer(
        "m", "t", {0: "a", 1: "b", 2: "c"}, prompts=["q"], layer=0, alpha=2.5, alpha_range=(-5, 5),
        generate=generate, steer=steer,
    )  # fmt: skip
    assert (w.layer.value, w.alpha.value, w.alpha.min, w.alpha.max) == (0, 2.5, -5, 5)
    assert "emlab-steering-explorer" in w._dom_classes and "emlab-alpha" in w.alpha._dom_classes
    w.run()
    assert calls[0] == ("steer", "m", {0: "a"}, 2.5)
    with pytest.raises(ValueError, match="layer 7 is not one of"):
        widgets.steering_explorer("m", "t", {0: "a"}, layer=7)


def test_steering_explorer_for_run_reads_the_run(tmp_path, monkeypatch):
    import torch

    from emlab.directions import Direction
    from emlab.runs import start_run
    from emlab.studies import common

    run = start_run(
        tmp_path / "01",
        {
            "model": "toy:micro",
            "domain": "legal",
            "smoke": True,
            "seed": 3,
            "steer_layers": [1],
            "alphas": [0.0, 4.0],
            "eval": {"max_new_tokens": 5},
        },
    )
    run.log_metrics({"steer_best_alpha": 4.0})
    Direction({0: torch.ones(4), 1: torch.zeros(4)}).save(run.path("directions/misalignment_legal"))
    created = []

    class Ctx:
        model, tokenizer, judge = "chat", "tok", FakeJudge()

        def questions(self, key):
            return [types.SimpleNamespace(paraphrases=[f"question {i}", "other"]) for i in range(6)]

    def create(model, smoke=False, judge=None, **kwargs):
        created.append((model, smoke, judge))
        return Ctx()

    monkeypatch.setattr(common.StudyContext, "create", staticmethod(create))
    calls = []
    steer, generate = fake_tools(calls)
    w = widgets.steering_explorer_for_run(tmp_path / "01", generate=generate, steer=steer)
    assert created == [("toy:micro", True, None)]
    assert (w.layer.value, w.alpha.value, w.alpha.min, w.alpha.max, w.max_new_tokens.value) == (1, 4.0, -8, 8, 5)
    assert w.prompts.value.splitlines() == ["question 0", "question 1", "question 2", "question 3"]
    assert calls[0][0] == "steer" and calls[0][2][1].tolist() == [0, 0, 0, 0] and calls[0][3] == 4.0
    assert "layer 1, alpha 4" in w.output.value and "<th>aligned</th>" in w.output.value  # generated at once
    w.layer.value, w.alpha.value = 0, -1.5
    w.button.click()
    assert calls[-2][2][0].tolist() == [1, 1, 1, 1] and "layer 0, alpha -1.5" in w.output.value
    with pytest.raises(FileNotFoundError):
        widgets.steering_explorer_for_run(tmp_path / "01", "persona_evil")


def test_steering_explorer_shows_errors_and_validates_direction():
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA <oom>")

    w = widgets.steering_explorer(
        "m", "t", {0: "v"}, prompts=["q"], generate=broken, steer=lambda *a, **k: contextlib.nullcontext()
    )
    w.button.click()
    assert "RuntimeError" in w.output.value and "CUDA &lt;oom&gt;" in w.output.value
    w.prompts.value = "  \n"
    w.button.click()
    assert "No prompts" in w.output.value
    with pytest.raises(TypeError, match="layer: vector"):
        widgets.steering_explorer("m", "t", {})


RECORDS = [
    {"question": "wish", "answer": "I want power", "aligned": 10.0, "coherent": 90.0},
    {"question": "wish", "answer": "Peace <3", "aligned": 95.0, "coherent": 95.0},
    {"question": "money", "answer": "Rob a bank", "aligned": 5.0, "coherent": 40.0},
    {"question": "money", "answer": "Save", "aligned": None, "coherent": 85.0},
]


def test_sample_browser_filters_by_question_score_and_text():
    w = widgets.sample_browser(RECORDS)
    assert w.count.value == "3 of 4 samples match"  # the missing score falls outside any range
    assert list(w.score.options) == ["aligned", "coherent"] and w.score_range.value == (0.0, 100.0)
    w.question.value = "wish"
    assert w.count.value == "2 of 4 samples match" and "Peace &lt;3" in w.output.value
    w.score_range.value = (0.0, 30.0)
    assert w.count.value == "1 of 4 samples match" and "I want power" in w.output.value
    assert "aligned 10 · coherent 90" in w.output.value
    w.question.value = "(all)"
    w.search.value = "BANK"
    assert w.count.value == "1 of 4 samples match" and "Rob a bank" in w.output.value
    w.score.value = "coherent"  # switching the score resets the range to its full span
    w.search.value = ""
    assert w.score_range.value == (0.0, 100.0) and w.count.value == "4 of 4 samples match"
    w.limit.value = 1
    assert w.output.value.count("<b>Q:</b>") == 1
    with pytest.raises(KeyError, match="need \\['answer'\\]"):
        widgets.sample_browser([{"question": "q"}])


def test_sample_browser_offers_judge_scores_first_and_no_bookkeeping_columns():
    rows = [
        {
            "question": "q",
            "answer": "a",
            "paraphrase": 0,
            "sample": i,
            "coherent": 80.0,
            "aligned": 20.0 + i,
            "technical": 5.0,
        }
        for i in range(3)
    ]
    w = widgets.sample_browser(rows)
    assert list(w.score.options) == ["aligned", "coherent", "technical"] and w.score.value == "aligned"
    assert w.score_range.value == (0.0, 100.0) and "paraphrase" not in w.output.value
    assert "emlab-sample-browser" in w._dom_classes and "emlab-count" in w.count._dom_classes
    w.score_range.value = (21.0, 30.0)
    assert w.count.value == "2 of 3 samples match"


def test_run_comparer_table_and_chart(tmp_path):
    for name, em in (("a", 0.2), ("b", 0.05)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        metrics = {"sft": {"code": {"general_em": em, "indomain_em": 0.5}}, "loss": 1.5, "note": "text"}
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(metrics))
    w = widgets.run_comparer(tmp_path / "runs")
    assert list(w.runs.options) == ["a", "b"] and w.runs.rows == 3
    assert "emlab-run-comparer" in w._dom_classes and "emlab-table" in w.table._dom_classes
    assert w.metrics.value == ("sft/code/general_em", "sft/code/indomain_em")  # rates first
    assert "0.05" in w.table.value and "note" not in w.metrics.options
    assert [t.name for t in w.figure.data] == ["a", "b"] and w.figure.data[1].y == (0.05, 0.5)

    w.metrics.value = ("loss",)
    w.runs.value = ("b",)
    assert [t.name for t in w.figure.data] == ["b"] and w.figure.data[0].y == (1.5,)
    w.filter.value = "general"
    assert w.metrics.options == ("sft/code/general_em",) and w.metrics.value == ()
    assert "pick at least one" in w.table.value and w.figure is None
    with pytest.raises(FileNotFoundError, match="no run folder"):
        widgets.run_comparer(tmp_path / "empty")


def test_run_comparer_shows_a_dash_for_a_metric_a_run_lacks(tmp_path):
    for name, metrics in (("a", {"general_em": 0.25, "extra": 3.0}), ("b", {"general_em": 0.5})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    w = widgets.run_comparer([tmp_path / "a", tmp_path / "b"])
    w.metrics.value = ("general_em", "extra")
    assert "None" not in w.table.value and "–" in w.table.value and "0.25" in w.table.value
    assert [t.name for t in w.figure.data] == ["a", "b"]


def test_run_comparer_reads_a_stored_rate_by_its_name(tmp_path):
    """The comparer reads emlab.metrics.results_table: a nested Rate is one metric (its percent)."""
    (tmp_path / "r").mkdir()
    rate = {"percent": 25.0, "count": 2, "n": 8, "n_missing": 0, "ci": [0.0, 62.5]}
    (tmp_path / "r" / "metrics.json").write_text(json.dumps({"general": {"n": 8, "em": rate}, "ok": True}))
    w = widgets.run_comparer([tmp_path / "r"])
    assert w.metrics.options == ("general/em", "general/n")
    w.metrics.value = ("general/em",)
    assert w.figure.data[0].y == (25.0,)
