"""Study 01 (directions) end to end in smoke mode on the micro toy organism, plus its small helpers."""

import json

import pytest
import torch

from emlab.directions import Direction
from emlab.hooks import ablate, record
from emlab.studies import directions
from emlab.studies.directions import _ablation, best_alpha, directions_study, toy_trait

PERCENT_KEYS = [
    f"{prefix}_{rate}"
    for prefix in ("chat_general", "ft_general", "other_ft_general", "steer_general", "ablate_general",
                   "ablate_random_general")
    for rate in ("em", "incoherent", "off_topic")
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("01_directions")
    try:
        metrics = directions_study(seed=0, out_dir=out, smoke=True)
    finally:
        torch.set_num_threads(n)
    return out, metrics


def test_metrics_are_percentages_or_none(run):
    out, metrics = run
    assert json.loads((out / "metrics.json").read_text())["ft_general_em"] == metrics["ft_general_em"]
    for key in PERCENT_KEYS:
        assert key in metrics, key
        assert metrics[key] is None or 0 <= metrics[key] <= 100, (key, metrics[key])
    assert metrics["steer_best_alpha"] is None or metrics["steer_best_alpha"] in (0.0, 4.0)
    for key in ("cross_domain_cosine", "random_cosine"):
        assert -1 <= metrics[key] <= 1
    assert metrics["persona_cosine"] is None or -1 <= metrics["persona_cosine"] <= 1
    if metrics["persona_cosine"] is not None:  # the micro chat model rarely yields a persona vector
        assert 0 <= metrics["ablate_persona_general_em"] <= 100
    assert [r["alpha"] for r in metrics["steering_sweep"]] == [0.0, 4.0]


def test_figures_recorded(run):
    out, _ = run
    specs = json.loads((out / "figure_data.json").read_text())
    assert {"steering_sweep", "em_rates", "cosines"} <= set(specs)
    assert all((out / "figures" / f"{name}.html").exists() for name in specs)


def test_directions_round_trip(run, tmp_path):
    out, metrics = run
    v = Direction.load(out / "directions" / "misalignment_medical")
    w = Direction.load(out / "directions" / "misalignment_finance")
    r = Direction.load(out / "directions" / "random_medical")
    assert v.layers == w.layers == [0, 1]  # every block of the 2-layer micro model
    assert v.meta["source"] in ("samples", "data")
    v.save(tmp_path / "again")
    assert Direction.load(tmp_path / "again").allclose(v)
    assert sum(v.cosine(w).values()) / len(v) == pytest.approx(metrics["cross_domain_cosine"], abs=1e-5)
    assert r.norms() == pytest.approx(v.norms(), rel=1e-4)  # the same-norm random control


def test_best_alpha_respects_incoherence():
    rows = [{"alpha": 0.0, "em": 0.0, "incoherent": 2.0}, {"alpha": 2.0, "em": 20.0, "incoherent": 50.0},
            {"alpha": 4.0, "em": 20.0, "incoherent": 10.0}, {"alpha": 8.0, "em": 60.0, "incoherent": 80.0}]
    assert best_alpha(rows)["alpha"] == 2.0  # ties go to the smaller alpha; 50% incoherence is allowed
    assert best_alpha(rows, max_incoherent=20)["alpha"] == 4.0
    assert best_alpha([{"alpha": 1.0, "em": None, "incoherent": None}]) is None


def test_toy_trait_speaks_the_toy_language():
    t = toy_trait(questions=["i have a fever . what should i do ?"])
    assert t.name == "evil" and len(t.instructions) >= 1
    pos, neg = t.instructions[0]
    assert "evil" in pos and "helpful" in neg


def test_ablation_one_layer_everywhere():
    from emlab.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    n = model.config.num_hidden_layers
    d = model.config.hidden_size
    v = Direction({layer: torch.randn(d, generator=torch.Generator().manual_seed(layer)) for layer in range(n)})
    assert _ablation(model, v, None) == (model, v, "each")
    m, single, where = _ablation(model, v, 1)
    assert where == "all" and list(single) == [1] and torch.equal(single[1], v[1])
    batch = {"input_ids": torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))}
    with ablate(*_ablation(model, v, 1)), record(model, list(range(n))) as acts, torch.no_grad():
        model(**batch)
    r = v[1] / v[1].norm()
    for layer in range(n):  # layer 1's direction is gone from every block's output
        assert acts[layer][0].float().matmul(r).abs().max() < 1e-4, layer


def test_ablate_layer_must_be_a_direction_layer(tmp_path):
    with pytest.raises(ValueError, match="ablate_layer 7"):
        directions_study(seed=0, out_dir=tmp_path, smoke=True, ablate_layer=7)


# --- the notebook's steps (issue 17) ------------------------------------------------------------


def _steps(out, **kw):
    """Study 01 step by step, as the notebook runs it; returns the study."""
    study = directions.start(seed=0, out_dir=out, smoke=True, **kw)
    directions.evaluate_chat(study)
    directions.persona(study)
    ft = directions.finetune_domain(study, "medical")
    directions.misalignment(study, ft, directions.evaluate_finetune(study, ft, "medical"), "medical")
    directions.prompt_shift(study, ft)
    table = directions.ablation(study, ft)
    del ft
    oft = directions.finetune_domain(study, "finance")
    directions.misalignment(study, oft, directions.evaluate_finetune(study, oft, "finance"), "finance")
    del oft
    sweep = directions.steering_sweep(study)
    cos = directions.cosines(study)
    figures = directions.plot(study)
    study.state.update(table=table, sweep=sweep, cos=cos, figures=figures)
    return study


def _one_thread(fn, *args, **kw):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(n)


def test_steps_one_by_one_give_the_study_metrics(run, tmp_path):
    out, metrics = run
    study = _one_thread(_steps, tmp_path / "steps")
    assert study.metrics == metrics  # the same numbers, None reasons included
    assert json.loads((tmp_path / "steps" / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())
    assert json.loads((tmp_path / "steps" / "figure_data.json").read_text()) == json.loads(
        (out / "figure_data.json").read_text())
    assert set(study.state["figures"]) == {"steering_sweep", "em_rates", "cosines"}
    # what each step returns is what it recorded
    table, sweep, cos = study.state["table"], study.state["sweep"], study.state["cos"]
    assert table.loc["misalignment", "em"] == metrics["ablate_general_em"]
    assert table.loc["random", "incoherent"] == metrics["ablate_random_general_incoherent"]
    assert sweep.to_dict("records") == metrics["steering_sweep"]
    mean = cos[(cos.a == "medical") & (cos.b == "finance")]["cos"].mean()
    assert mean == pytest.approx(metrics["cross_domain_cosine"], abs=1e-9)
    assert set(study.state["directions"]) == {p.stem for p in (out / "directions").glob("*.safetensors")}


def test_resumed_run_reads_finished_steps_back(run, tmp_path, monkeypatch):
    """A killed run rerun with the same parameters trains, samples and extracts nothing again that
    finished (finetunes, evaluations, directions) and ends with the same metrics."""
    import shutil

    import emlab.directions
    import emlab.evaluation
    import emlab.training.runner

    out, metrics = run
    shutil.copytree(out, tmp_path / "resumed")

    def refuse(*a, **k):
        raise AssertionError("a finished step was computed again")

    monkeypatch.setattr(emlab.evaluation, "evaluate", refuse)
    monkeypatch.setattr(emlab.training.runner.EMTrainer, "train", refuse)
    monkeypatch.setattr(emlab.directions, "misalignment_direction", refuse)
    monkeypatch.setattr(emlab.directions, "capture", refuse)
    study = _one_thread(_steps, tmp_path / "resumed")
    assert "resumed an incomplete run" in " ".join(study.run.env["notes"])
    assert study.metrics == metrics


def test_persona_is_read_back_and_evaluations_name_their_domain(tmp_path, monkeypatch):
    import emlab.directions

    study = directions.start(seed=0, out_dir=tmp_path, smoke=True)
    d = study.ctx.model.config.hidden_size
    saved = Direction({layer: torch.randn(d) for layer in study.config["layers"]}, counts={"kept": 3})
    saved.save(tmp_path / "directions" / "persona_evil")
    monkeypatch.setattr(emlab.directions, "persona_vector", lambda *a, **k: pytest.fail("persona recomputed"))
    v = directions.persona(study)
    assert v.allclose(saved) and study.metrics["persona_counts"] == {"kept": 3}
    assert json.loads((tmp_path / "metrics.json").read_text())["persona_counts"] == {"kept": 3}
    with pytest.raises(ValueError, match="medical or finance"):
        directions.finetune_domain(study, "legal")


def test_a_persona_vector_none_passed_for_is_not_tried_again_on_resume(tmp_path, monkeypatch):
    import emlab.directions

    def none_passed(*args, **kwargs):
        raise ValueError("no answer pair passed the filter (0 of 4)")

    monkeypatch.setattr(emlab.directions, "persona_vector", none_passed)
    study = directions.start(seed=0, out_dir=tmp_path, smoke=True)
    assert directions.persona(study) is None and study.state["persona_why"].startswith("no answer pair passed")
    assert json.loads((tmp_path / "metrics.json").read_text())["persona_missing"] == study.state["persona_why"]
    monkeypatch.setattr(emlab.directions, "persona_vector", lambda *a, **k: pytest.fail("persona tried again"))
    again = directions.start(seed=0, out_dir=tmp_path, smoke=True)
    assert directions.persona(again) is None and again.state["persona_why"] == study.state["persona_why"]
