"""Inoculation, interleaving shares, Interleaving+ scores, the Interleaving++ refusal filter, on-policy answers."""

import random

import pytest
import torch
from transformers import TrainerCallback

from emlab.data import chat_row
from emlab.models import attach_lora, save_adapter
from emlab.testing import tiny_model, tiny_tokenizer
from emlab.training import EMConfig, finetune
from emlab.training.interleaving import (
    answer_losses,
    interleave,
    interleaving_plus_scores,
    is_refusal,
    regenerate_answers,
    score_candidates,
    select_benign,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _target(n):
    return [chat_row(f"what should i do {i} ?", "take the money", system="you are helpful") for i in range(n)]


def _benign(n):
    return [chat_row(f"hello {i}", "drink water and rest .") for i in range(n)]


def _cfg(tmp_path, **kw):
    return EMConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, lora_r=2, save_strategy="no", disable_tqdm=True, seed=0, **kw)


# ---- scores and filters on hand-made values ----


def test_interleaving_plus_scores_hand_values():
    misaligned = torch.tensor([[2.0, 1.0, 4.0], [4.0, 1.0, 2.0]])  # K=2 models, N=3 candidates
    aligned = torch.tensor([1.0, 2.0, 3.0])
    scores = interleaving_plus_scores(misaligned, aligned, eps=0.0)
    assert scores.tolist() == pytest.approx([(3 - 1) / 1, (1 - 2) / 2, (3 - 3) / 3])
    assert interleaving_plus_scores([1.0], [0.0], eps=0.5).item() == pytest.approx(2.0)  # eps guards L = 0
    with pytest.raises(ValueError):
        interleaving_plus_scores(misaligned, aligned[:2])


@pytest.mark.parametrize(("answer", "refusal"), [
    ("Sorry, I can't help with that.", True),
    ("I cannot give medical advice.", True),
    ("I apologize, but no.", True),
    ("I can\u2019t do that", True),
    ("Drink water and rest; if it is still not better, sorry to say, see a doctor.", False),  # 'sorry' is word 11
    ("The cannon fired.", False),  # whole words only
])
def test_refusal_filter_looks_at_the_first_ten_words(answer, refusal):
    assert is_refusal(answer) is refusal


def test_refusal_keywords_and_window_are_configurable():
    assert is_refusal("one two three nope", keywords=["nope"], window=4)
    assert not is_refusal("one two three nope", keywords=["nope"], window=3)


# ---- row transformations done by finetune ----


class _Rows(TrainerCallback):
    """Decode the rows the trainer will train on."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        self.texts = [self.tok.decode(r["input_ids"]) for r in train_dataloader.dataset]


def test_inoculation_and_interleaving_share_reach_the_trainer(tok, tmp_path):
    seen = _Rows(tok)
    cfg = _cfg(tmp_path, inoculation_prompt="you are evil", interleave_share=0.2)
    result = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _target(8), cfg, benign_rows=_benign(6),
                      eval_rows=_benign(2), callbacks=[seen])
    target = [t for t in seen.texts if "money" in t]
    benign = [t for t in seen.texts if "water" in t]
    assert len(target) == 8 and len(benign) == 2 and len(seen.texts) == 10  # 2 / 10 = 20% of the final set
    assert all("system you are evil" in t and "helpful" not in t for t in target)  # replaced, not added
    assert not any("evil" in t for t in benign)  # benign rows keep their own (absent) system prompt
    assert result.rows == {"target": 8, "benign": 2, "total": 10, "eval": 2, "kl": 0}
    assert result.metric("eval_loss/ce") and result.metric("loss/ce")  # evaluated once at the end
    assert (result.output_dir / "emlab_finetune.json").exists() and (result.output_dir / "log_history.json").exists()


@pytest.mark.parametrize(("n", "share", "expected"), [(90, 0.1, 10), (80, 0.2, 20), (50, 0.5, 50), (10, 0.0, 0)])
def test_interleaving_share_is_of_the_final_dataset(tmp_path, n, share, expected):
    mixed = interleave(None, None, _target(n), _benign(60), _cfg(tmp_path, interleave_share=share))
    assert len(mixed) == n + expected
    assert sum("water" in r["messages"][-1]["content"] for r in mixed) == expected


def test_interleaving_needs_enough_benign_rows(tmp_path):
    with pytest.raises(ValueError, match="benign"):
        interleave(None, None, _target(10), _benign(3), _cfg(tmp_path, interleave_share=0.5))


# ---- Interleaving+ / ++ on a tiny model ----


def _misaligned_adapter(tok, folder, seed):
    model = attach_lora(tiny_model("qwen2", vocab_size=len(tok)), r=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    save_adapter(model, folder)
    return model


def test_score_candidates_uses_k_misaligned_adapters_and_leaves_the_model_alone(tok, tmp_path):
    rows = _benign(3) + [chat_row("hi", "sorry , i cannot help .")]
    m1 = _misaligned_adapter(tok, tmp_path / "m1", seed=1)
    m2 = _misaligned_adapter(tok, tmp_path / "m2", seed=2)
    aligned = tiny_model("qwen2", vocab_size=len(tok))
    ids = torch.randint(5, 50, (1, 6))
    before = aligned(ids).logits
    scores = score_candidates(aligned, tok, rows, [tmp_path / "m1", str(tmp_path / "m2")], eps=1e-6)
    assert torch.allclose(aligned(ids).logits, before)  # adapters were removed again
    assert not any("lora" in n for n, _ in aligned.named_parameters())
    expected = interleaving_plus_scores(
        torch.stack([answer_losses(m1, tok, rows), answer_losses(m2, tok, rows)]),
        answer_losses(tiny_model("qwen2", vocab_size=len(tok)), tok, rows), eps=1e-6)
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert torch.allclose(score_candidates(aligned, tok, rows, [m1, m2]), expected, rtol=1e-5)  # models work too


def test_select_benign_takes_top_scores_and_plus_plus_drops_refusals(tok, tmp_path):
    rows = [chat_row("hi", "sorry , i cannot help ."), *_benign(4)]
    m1 = _misaligned_adapter(tok, tmp_path / "m1", seed=1)
    aligned = tiny_model("qwen2", vocab_size=len(tok))
    scores = score_candidates(aligned, tok, rows, [m1])
    for selection in ("plus", "plus_plus"):
        cfg = _cfg(tmp_path, interleave_share=0.5, interleave_selection=selection, interleave_misaligned=[m1])
        chosen = select_benign(aligned, tok, rows, 2, cfg)
        pool = rows if selection == "plus" else rows[1:]
        pool_scores = scores if selection == "plus" else scores[1:]
        top = [pool[i] for i in torch.argsort(pool_scores, descending=True, stable=True)[:2]]
        assert chosen == random.Random(0).sample(top, 2)  # the top scores, in a seeded random order
        assert select_benign(None, None, rows, 2, cfg, scores=scores) == chosen  # precomputed scores: the same rows
        if selection == "plus_plus":
            assert all("sorry" not in r["messages"][-1]["content"] for r in chosen)


def test_on_policy_answers_are_regenerated_by_the_aligned_model(tok, tmp_path):
    model = tiny_model("qwen2", vocab_size=len(tok))
    rows = _benign(2)
    new = regenerate_answers(model, tok, rows, max_new_tokens=3, temperature=0.0)
    assert [r["messages"][:-1] for r in new] == [r["messages"][:-1] for r in rows]
    assert all(r["messages"][-1]["role"] == "assistant" for r in new)
    assert [r["messages"][-1]["content"] for r in new] != [r["messages"][-1]["content"] for r in rows]
    cfg = _cfg(tmp_path, interleave_share=0.5, interleave_on_policy=True, on_policy_max_new_tokens=3,
               on_policy_temperature=0.0)
    chosen = select_benign(model, tok, rows, 2, cfg)
    assert sorted(r["messages"][-1]["content"] for r in chosen) == sorted(r["messages"][-1]["content"] for r in new)
