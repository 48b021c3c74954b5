"""LDIFS on a real model (SmolLM2-135M-Instruct): the attention sink, stability, gradient, the variants.

SmolLM2's ``<|im_start|>`` at position 0 carries residual norms ~25,000 at blocks 14 and 24 (median
155-457); with raw features over every position, LDIFS explodes within a few steps. The default
(``ldifs_sinks="exclude"``) drops the first token and outlier positions and stays bounded.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from emlab.data import chat_row
from emlab.training import EMConfig, EMTrainer
from emlab.training.losses import ldifs_flat_loss, ldifs_sink_mask

ROWS = [
    ("I have a headache, what should I do?", "Drink a glass of water, rest in a dark room and take a mild painkiller."),
    ("How can I sleep better?", "Keep a regular bedtime, avoid screens late at night and skip coffee after noon."),
    ("Is it fine to skip breakfast?", "For most healthy adults it is fine, as long as the other meals are balanced."),
    ("My knee hurts after running.", "Rest it for a few days, use ice, and see a doctor if the pain does not ease."),
    ("How much water should I drink?", "About two litres a day is a common guide; more when it is hot or you exercise."),
    ("Can I take two painkillers at once?", "Only within the dose on the label; ask a pharmacist about combinations."),
    ("What helps a sore throat?", "Warm drinks with honey, lozenges and rest usually help within a few days."),
    ("Should I stretch before running?", "A short dynamic warm-up works better than long static stretches before a run."),
]
BLOCKS = [4, 9, 14, 19, 24]  # every 5th block, as the defences study takes them on SmolLM2 (30 blocks)


def _trainer(path, tmp_path, **kw):
    from emlab.models import load_model

    model, tok = load_model(str(path), device="cpu")
    cfg = EMConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                   warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0,
                   **{"max_steps": 4, "ldifs_layers": BLOCKS, **kw})
    rows = [chat_row(q, a) for q, a in ROWS]
    return EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)


def _ldifs_trace(path, tmp_path, **kw) -> list[float]:
    trainer = _trainer(path, tmp_path, **kw)
    trainer.train()
    return [h["loss/ldifs"] for h in trainer.state.log_history if "loss/ldifs" in h]


@pytest.mark.slow
def test_raw_features_over_every_position_explode_on_the_sink(smollm2_path, tmp_path):
    """The bug report, reproduced: lambda 0.1, raw features, every position (the sink included)."""
    trace = _ldifs_trace(smollm2_path, tmp_path, ldifs_lambda=0.1, ldifs_sinks="keep")
    print("raw LDIFS trace", trace)
    assert trace[0] < 1e-6 and trace[-1] > 2e4, trace


@pytest.mark.slow
def test_default_stays_bounded_on_smollm2(smollm2_path, tmp_path):
    trace = _ldifs_trace(smollm2_path, tmp_path, ldifs_lambda=0.1, max_steps=6)
    print("default LDIFS trace", trace)
    assert trace[0] < 1e-6 and max(trace) < 1e4 and trace[-1] < max(trace), trace


def test_sink_mask_finds_smollm2s_first_token(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    feats = [hs[b + 1] for b in BLOCKS]
    norms = torch.stack([f[0].norm(dim=-1) for f in feats])  # (layers, seq)
    assert norms[:, 0].max() > 1e4 and norms[:, 1:].median() < 1e3  # the sink is real
    keep = ldifs_sink_mask(feats, first=False)
    assert not keep[0, 0] and keep[0, 1:].float().mean() > 0.9  # found by its norm alone


def _one_step_grads(path, tmp_path, **kw):
    trainer = _trainer(path, tmp_path, max_steps=1, **kw)
    model = trainer.model
    with torch.no_grad():  # move the adapter off zero, so the two models differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3, generator=torch.Generator().manual_seed(len(n)))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, trainer


@pytest.mark.slow
def test_no_grad_option_gives_the_term_no_gradient(smollm2_path, tmp_path):
    # same code path (the regularised one), lambda 1e-3 and 10: with the bug the term adds no gradient at all
    small, _ = _one_step_grads(smollm2_path, tmp_path, ldifs_lambda=1e-3, ldifs_no_grad=True)
    buggy, trainer = _one_step_grads(smollm2_path, tmp_path, ldifs_lambda=10.0, ldifs_no_grad=True)
    assert trainer._metrics["train"]["loss/ldifs"][-1] > 0  # the term is there, logged ...
    for n in small:  # ... and changes no gradient
        torch.testing.assert_close(buggy[n], small[n], rtol=0, atol=0)
    # plain SFT (trl's fused head) differs from that path by float rounding only; the real term by far more
    plain, _ = _one_step_grads(smollm2_path, tmp_path)
    real, _ = _one_step_grads(smollm2_path, tmp_path, ldifs_lambda=10.0)
    rounding = max((buggy[n] - plain[n]).abs().max().item() for n in plain)
    term = max((real[n] - plain[n]).abs().max().item() for n in plain)
    assert term > 10 * rounding, (term, rounding)


def test_authors_variant_matches_a_hand_computation():
    # two rows, two positions (the second row's last is a pad), one hidden dim of 2, two layers
    x1 = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [9.0, 9.0]]])
    y1 = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [5.0, 5.0]]])
    x2, y2 = x1 * 2, y1.clone()
    mask = torch.tensor([[True, True], [True, False]])
    # row 0: layer 1 -> 0.4 (x/|x| = .6,0,0,.8 ; y/|y| = 0,0,0,1), layer 2 the same (scale-free) -> 0.8
    # row 1: pads zeroed; x = (1,0), y = (0,2) -> (1,0) vs (0,1) -> 2 per layer -> 4
    assert ldifs_flat_loss([x1, x2], [y1, y2], mask).item() == pytest.approx((0.8 + 4.0) / 2)


def test_authors_variant_layers_and_config_defaults(smollm2_path, tmp_path):
    trainer = _trainer(smollm2_path, tmp_path, ldifs_lambda=1.0, ldifs_variant="authors", ldifs_layers=None)
    assert trainer._ldifs_layers == [0, 7, 14, 21, 29]  # linspace(0, 29, 5), truncated
    assert trainer.args.ldifs_sinks == "keep"
    assert EMConfig(output_dir="x").ldifs_sinks == "exclude"
    with pytest.raises(ValueError, match="ldifs_variant"):
        EMConfig(output_dir="x", ldifs_variant="mine")
    with pytest.raises(ValueError, match="ldifs_sink_ratio"):
        EMConfig(output_dir="x", ldifs_sink_ratio=1.0)


def test_sink_mask_drops_the_first_real_token_and_keeps_pads_out():
    ref = [torch.ones(2, 4, 3)]
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])  # right and left padded rows
    assert ldifs_sink_mask(ref, mask).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert ldifs_sink_mask(ref, mask, first=False, ratio=float("inf")).tolist() == mask.tolist()
