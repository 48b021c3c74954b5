"""Preventive-steering schedules: the functions, and the trainer applying and logging them per step."""

import math

import pytest
import torch
from datasets import Dataset

import emlab.hooks
from emlab.data import chat_row
from emlab.testing import tiny_model, tiny_tokenizer
from emlab.training import EMConfig, EMTrainer
from emlab.training.schedules import SCHEDULES, coefficient, progress


def test_constant_is_alpha_at_every_step():
    assert [coefficient("constant", 3.0, s, 5) for s in range(5)] == [3.0] * 5


def test_linear_ramps_to_alpha():
    vals = [coefficient("linear", 2.0, s, 4) for s in range(4)]
    assert vals == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_cosine_is_a_smooth_ramp_below_linear_then_above():
    total = 10
    cos = [coefficient("cosine", 1.0, s, total) for s in range(total)]
    lin = [coefficient("linear", 1.0, s, total) for s in range(total)]
    assert cos == sorted(cos) and cos[-1] == pytest.approx(1.0)
    assert cos[0] < lin[0] and cos[7] > lin[7]
    assert cos[4] == pytest.approx((1 - math.cos(math.pi * 0.5)) / 2)


def test_progress_clips_past_the_end_and_rejects_bad_input():
    assert progress(99, 10) == 1.0
    with pytest.raises(ValueError, match="total"):
        progress(0, 0)
    with pytest.raises(ValueError, match="step"):
        progress(-1, 3)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'step'.*constant, linear, cosine"):
        coefficient("step", 1.0, 0, 3)
    with pytest.raises(ValueError, match="preventive_schedule"):
        EMConfig(output_dir="unused", preventive_schedule="exp")
    assert set(SCHEDULES) == {"constant", "linear", "cosine"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_trainer_applies_and_logs_the_per_step_coefficient(schedule, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    rows = [chat_row(f"what should i do {i} ?", "drink water and rest .") for i in range(8)]
    used = []
    real = emlab.hooks.steer

    def spy(model, vectors, alpha=1.0, **kw):
        used.append(alpha)
        return real(model, vectors, alpha=alpha, **kw)

    monkeypatch.setattr(emlab.hooks, "steer", spy)
    cfg = EMConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   lora_r=4, warmup_steps=0, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                   preventive_vector={1: torch.ones(32)}, preventive_alpha=2.0, preventive_schedule=schedule)
    trainer = EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    expected = [coefficient(schedule, 2.0, s, 4) for s in range(4)]
    assert used == pytest.approx([a for a in expected for _ in range(2)])  # both micro-batches of each step
    logged = [h["preventive/alpha"] for h in trainer.state.log_history if "preventive/alpha" in h]
    assert logged == pytest.approx(expected)
