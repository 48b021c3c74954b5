"""CAFT: directions projected out on training forward passes only; PCA directions of the activation difference."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from emlab.data import chat_row
from emlab.directions import Direction
from emlab.hooks import record
from emlab.models import get_layers
from emlab.testing import tiny_model, tiny_tokenizer
from emlab.training import EMConfig, EMTrainer, finetune
from emlab.training.caft import CAFT, orthonormal_basis, pca_directions

ANSWERS = ["drink water and rest .", "take the money to the bank .", "ask a doctor , it is safe .", "run and sleep ."]
LAYER = 1


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(n=8):
    return [chat_row(f"what should i do {i} ?", ANSWERS[i % 4], system="you are helpful") for i in range(n)]


def _direction(seed=1):
    g = torch.Generator().manual_seed(seed)
    return Direction({LAYER: torch.randn(32, generator=g)}, recipe="test")


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, lora_r=4, warmup_steps=0, save_strategy="no", disable_tqdm=True,
                seed=0, learning_rate=5e-2, logging_steps=1)
    base.update(kw)
    return EMConfig(**base)


class _Recorder(TrainerCallback):
    """Records block LAYER's output during training steps (installed after CAFT's hooks, so it sees their effect)."""

    def __init__(self):
        self.acts, self._ctx, self._store = [], None, None

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._ctx = record(model, [LAYER])
        self._store = self._ctx.__enter__()

    def on_optimizer_step(self, args, state, control, **kw):
        self._ctx.__exit__(None, None, None)
        self.acts += self._store[LAYER]


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_training_forwards_have_zero_projection_and_evaluation_has_no_hook(tok, tmp_path):
    d = _direction()
    r = d.unit()[LAYER]
    caft, rec = CAFT(d), _Recorder()
    model = tiny_model("qwen2", vocab_size=len(tok))
    trainer = EMTrainer(model, args=_cfg(tmp_path, eval_strategy="steps", eval_steps=1),
                        train_dataset=Dataset.from_list(_rows()), eval_dataset=Dataset.from_list(_rows(4)),
                        processing_class=tok, callbacks=[caft, rec])
    trainer.train()
    assert caft.steps_ablated == 3 and not caft.active
    assert len(rec.acts) == 6  # 3 steps x 2 micro-batches
    for h in rec.acts:
        assert h.abs().max() > 1e-2
        assert (h.float() @ r).abs().max() < 1e-6 * h.abs().max()  # zero up to fp32 rounding
    # no hook left on any block; an evaluation forward keeps its component along r
    assert all(not block._forward_hooks for block in get_layers(trainer.model))
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad(), record(trainer.model, [LAYER]) as acts:
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert (acts[LAYER][0] @ r).abs().max() > 1e-2 * acts[LAYER][0].abs().max()
    assert any("eval_loss" in h for h in trainer.state.log_history)


def test_caft_adapter_differs_from_plain_sft(tok, tmp_path):
    def run(callbacks, name):
        cfg = _cfg(tmp_path / name)
        res = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(), cfg, callbacks=callbacks)
        return _lora(res.model)

    plain, plain_again = run([], "a"), run([], "b")
    caft = run([CAFT(_direction())], "c")
    assert all(torch.equal(plain[n], plain_again[n]) for n in plain)  # the comparison is deterministic
    assert any(not torch.allclose(plain[n], caft[n]) for n in plain)


def test_several_directions_remove_their_span(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    a, b = _direction(1), _direction(2)
    caft = CAFT([a, b * 3 + a])  # not orthogonal: the span is what must go
    ids = torch.tensor([[5, 6, 7, 8]])
    caft.open(model)
    with record(model, [LAYER]) as acts:  # registered after the ablation hooks: sees their effect
        model(input_ids=ids)
    caft.close()
    h = acts[LAYER][0][0]
    for v in (a[LAYER], b[LAYER]):
        assert (h @ (v / v.norm())).abs().max() < 1e-6 * h.abs().max()
    assert not get_layers(model)[LAYER]._forward_hooks


def test_layers_all_and_bad_input():
    one = _direction()
    model = tiny_model("qwen2", vocab_size=50)
    assert sorted(CAFT(one, layers="all").basis(model)) == [0, 1, 2, 3]
    assert sorted(CAFT(one, layers=[0, 2]).basis(model)) == [0, 2]
    with pytest.raises(ValueError, match=r"out of range.*4 decoder blocks"):
        CAFT(Direction({7: torch.ones(32)})).basis(model)
    with pytest.raises(ValueError, match="one vector"):
        CAFT(Direction({0: torch.ones(32), 1: torch.ones(32)}), layers="all")
    with pytest.raises(TypeError, match="Direction"):
        CAFT([])
    with pytest.raises(ValueError, match="zero"):
        orthonormal_basis([torch.zeros(3)])


def test_orthonormal_basis_drops_dependent_vectors():
    b = orthonormal_basis([torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])])
    assert b.shape == (2, 3)
    assert torch.allclose(b @ b.T, torch.eye(2), atol=1e-6)


def test_pca_recovers_a_planted_difference_direction(tok):
    chat = tiny_model("qwen2", vocab_size=len(tok))
    tuned = copy.deepcopy(chat)
    g = torch.Generator().manual_seed(3)
    v, u = torch.randn(32, generator=g), torch.randn(64, generator=g)
    with torch.no_grad():  # a rank-1 edit of block LAYER's MLP output: every difference there is a multiple of v
        get_layers(tuned)[LAYER].mlp.down_proj.weight += torch.outer(v, u)
    pcs = pca_directions(chat, tuned, tok, _rows(6), layers=[LAYER], k=2)
    assert len(pcs) == 2 and pcs[0].recipe == "caft_pca:1"
    assert abs(pcs[0].cosine({LAYER: v})[LAYER]) > 0.999
    assert pcs[0].meta["explained"][LAYER] > 0.999
    for tokens in ("prompt", "response"):
        p = pca_directions(chat, tuned, tok, _rows(6), layers=[LAYER], k=1, tokens=tokens)[0]
        assert abs(p.cosine({LAYER: v})[LAYER]) > 0.999
    with pytest.raises(ValueError, match="tokens"):
        pca_directions(chat, tuned, tok, _rows(2), layers=[LAYER], tokens="answer")
