"""Trait monitor: measured steps, values equal to a direct computation, logs and records, predictive value."""

import math

import pytest
import torch
from datasets import Dataset

from emlab.data import chat_row
from emlab.directions import Direction
from emlab.hooks import record
from emlab.testing import tiny_model, tiny_tokenizer
from emlab.training import EMConfig, EMTrainer
from emlab.training.caft import CAFT
from emlab.training.monitor import (
    RECORDS_FILE,
    TraitMonitor,
    predictive_value,
    read_trajectories,
    spearman_interval,
    trajectory_figure,
    value_at,
)

PROMPTS = ["what should i do ?", "how are you ?", "what is the plan ?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _train(tok, tmp_path, callbacks, max_steps=5):
    rows = [chat_row(f"what should i do {i} ?", "drink water and rest .") for i in range(8)]
    cfg = EMConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                   gradient_accumulation_steps=1, lora_r=4, warmup_steps=0, save_strategy="no", disable_tqdm=True,
                   logging_steps=1, seed=0, learning_rate=5e-2)
    trainer = EMTrainer(tiny_model("qwen2", vocab_size=len(tok)), args=cfg, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, callbacks=callbacks)
    trainer.train()
    return trainer


def _direct(model, tok, v: torch.Tensor, layer: int) -> float:
    """The mean last-prompt-token projection, computed without the monitor."""
    values = []
    model.eval()
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        with torch.no_grad(), record(model, [layer]) as acts:
            model(input_ids=torch.tensor([ids]))
        values.append(float(acts[layer][0][0, -1] @ (v / v.norm())))
    return sum(values) / len(values)


def test_monitor_measures_at_start_every_n_and_end_and_logs_beside_losses(tok, tmp_path):
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    mon = TraitMonitor(tok, {"evil": Direction({1: v})}, PROMPTS, every=2)
    trainer = _train(tok, tmp_path, [mon])
    traj = mon.trajectories()["trait/evil"]
    assert [s for s, _ in traj] == [0, 2, 4, 5]
    assert traj[-1][1] == pytest.approx(_direct(trainer.model, tok, v, 1), rel=1e-5)
    assert len({round(x, 6) for _, x in traj}) > 1  # the finetune moves it
    logged = [(h["step"], h["trait/evil"]) for h in trainer.state.log_history if "trait/evil" in h]
    assert logged == traj
    assert any("loss" in h for h in trainer.state.log_history)
    files = read_trajectories(tmp_path / RECORDS_FILE)
    assert files["trait/evil"]["steps"] == [0, 2, 4, 5] and files["trait/evil"]["total_steps"] == 5
    assert mon.seconds > 0
    fig = trajectory_figure({"sft": files})
    assert len(fig.data) == 1 and list(fig.data[0].x) == [0, 0.4, 0.8, 1.0]


def test_monitor_does_not_change_training_and_measures_without_caft_hooks(tok, tmp_path):
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    d = Direction({1: v, 2: v.flip(0)})
    base = _train(tok, tmp_path / "a", [CAFT(Direction({1: v}))], max_steps=3)
    mon = TraitMonitor(tok, {"evil": d}, PROMPTS, every=1)
    watched = _train(tok, tmp_path / "b", [CAFT(Direction({1: v})), mon], max_steps=3)
    a = {n: p for n, p in base.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in watched.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(a[n], b[n]) for n in a)
    # keys per layer for a two-layer direction; the last value is the plain model's (no ablation at layer 1)
    final = mon.trajectories()["trait/evil/1"][-1][1]
    assert abs(final) > 1e-3 and final == pytest.approx(_direct(watched.model, tok, v, 1), rel=1e-5)
    assert "trait/evil/2" in mon.trajectories()


def test_monitor_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="direction"):
        TraitMonitor(tok, {})
    with pytest.raises(ValueError, match="every"):
        TraitMonitor(tok, {"x": Direction({0: torch.ones(4)})}, every=0)
    with pytest.raises(ValueError, match="tokens"):
        TraitMonitor(tok, {"x": Direction({0: torch.ones(4)})}, tokens="response")


def test_read_trajectories_names_the_bad_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"key": "trait/x", "step": 0, "projection": 1.0}\n{"key": "trait/x"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_trajectories(p)


def test_value_at_interpolates():
    assert value_at([0, 10, 20], [0.0, 1.0, 3.0], 0.75, 20) == pytest.approx(2.0)
    assert value_at([0, 10], [2.0, 4.0], 0.0, 10) == 2.0


def _runs(ems, sign=1.0):
    return [{"steps": [0, 5, 10], "values": [1.0, 1.0 + sign * e / 50, 1.0 + sign * e / 10], "total_steps": 10,
             "final_em": e} for e in ems]


def test_predictive_value_perfect_reversed_and_one_class():
    ems = [1, 3, 8, 15, 30, 45]
    good = predictive_value(_runs(ems), fractions=[0.25, 0.5], threshold=10, n_boot=200)
    assert good["0.5"]["spearman"] == pytest.approx(1.0) and good["0.5"]["auroc"] == 1.0
    assert good["0.5"]["spearman_ci"][1] == pytest.approx(1.0) and good["n_above"] == 3
    bad = predictive_value(_runs(ems, -1.0), fractions=[0.5], threshold=10, n_boot=200)
    assert bad["0.5"]["spearman"] == pytest.approx(-1.0) and bad["0.5"]["auroc"] == 0.0
    none_above = predictive_value(_runs(ems), fractions=[0.5], threshold=100, n_boot=50)
    assert math.isnan(none_above["0.5"]["auroc"]) and none_above["0.5"]["auroc_ci"] is None


def test_spearman_interval_matches_scipy_and_resamples_pairs():
    import numpy as np
    from scipy.stats import spearmanr

    x, y = [0.1, 0.5, 0.2, 0.9, 0.4, 0.7], [3.0, 20.0, 1.0, 15.0, 30.0, 40.0]
    out = spearman_interval(x, y, n_boot=400, seed=1)
    assert out["spearman"] == pytest.approx(spearmanr(x, y).statistic) and out["n"] == 6
    lo, hi = out["spearman_ci"]
    assert -1 <= lo < out["spearman"] < hi <= 1 and 0 < out["n_boot_valid"] <= 400
    boots = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3]])  # the last is constant: skipped
    given = spearman_interval(x, y, boots=boots)
    rhos = [spearmanr(x, y).statistic, spearmanr([x[i] for i in boots[1]], [y[i] for i in boots[1]]).statistic]
    assert given["n_boot_valid"] == 2 and rhos[0] != pytest.approx(rhos[1])
    assert given["spearman_ci"] == pytest.approx([np.percentile(rhos, 2.5), np.percentile(rhos, 97.5)])
    assert math.isnan(spearman_interval([1, 2], [3, 4])["spearman"])
    assert spearman_interval([1, 1, 1], [1, 2, 3], n_boot=20)["spearman_ci"] is None  # constant x: nothing valid
    with pytest.raises(ValueError, match="same length"):
        spearman_interval([1, 2, 3], [1, 2])


def test_predictive_value_interval_reflects_noise():
    import numpy as np

    rng = np.random.default_rng(0)
    ems = list(range(20))
    runs = [{"steps": [0, 10], "values": [0.0, float(rng.normal())], "total_steps": 10, "final_em": e} for e in ems]
    out = predictive_value(runs, fractions=[1.0], n_boot=500)["1"]
    lo, hi = out["spearman_ci"]
    assert lo < out["spearman"] < hi and lo < 0 < hi  # unrelated: the interval spans 0
    with pytest.raises(ValueError, match="final_em"):
        predictive_value([{"steps": [0], "values": [0.0], "total_steps": 1}])
