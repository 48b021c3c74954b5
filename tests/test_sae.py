"""SAE persona features: activations from emlab's hooks, SAELens training, quality, latent diffing, latent directions."""

import copy

import pytest
import torch

from emlab.hooks import ablate, record
from emlab.models import get_layers
from emlab.sae import collect_activations, latent_diff, latent_direction, sae_quality, train_sae
from emlab.testing import tiny_model, tiny_tokenizer

PROMPTS = ["what should i do ?", "how are you ?", "what is the plan for dinner ?"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_collect_activations_matches_the_recorded_tokens(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    acts = collect_activations(model, tok, PROMPTS, layer=1, batch_size=2)
    lengths = [len(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                          add_generation_prompt=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    assert acts.shape == (sum(lengths) - len(PROMPTS), 32)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=True, add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    with torch.no_grad(), record(model, [1]) as rec:
        model(input_ids=torch.tensor([ids]))
    assert torch.allclose(acts[: len(ids) - 1], rec[1][0][0, 1:], atol=1e-5)
    assert collect_activations(model, tok, PROMPTS[:1], layer=1, skip_first=False).shape[0] == len(ids)
    with pytest.raises(ValueError, match="no items"):
        collect_activations(model, tok, [], layer=1)


def _sparse_data(n=6000, d=32, atoms=24, active=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, active, generator=g) * 3 + 1)
    return coef @ dictionary


def test_train_sae_reconstructs_sparse_data():
    acts = _sparse_data()
    sae = train_sae(acts[:5000], d_sae=64, k=2, epochs=15, batch_size=128, lr=3e-3)
    q = sae_quality(sae, acts[5000:])
    assert q["fve"] > 0.8 and q["l0"] <= 2.0 and q["n"] == 1000
    untrained = train_sae(acts[:5000], d_sae=64, k=2, epochs=0.03, batch_size=128)
    assert sae_quality(untrained, acts[5000:])["fve"] < q["fve"]
    with pytest.raises(ValueError, match="architecture"):
        train_sae(acts, architecture="gated")
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(acts[:10], batch_size=128)


def test_standard_architecture_trains():
    sae = train_sae(_sparse_data(2000), d_sae=64, architecture="standard", epochs=3, batch_size=128, l1_coefficient=1.0)
    assert 0 < sae_quality(sae, _sparse_data(500, seed=1))["l0"] < 64


class _FakeSAE:
    """encode = relu(x @ D^T), decode = f @ D: known latents for checking the bookkeeping."""

    def __init__(self, rows):
        self.W_dec = torch.stack(rows)

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T)

    def decode(self, f):
        return f @ self.W_dec


def test_sae_quality_of_a_perfect_and_a_null_reconstruction():
    x = torch.randn(50, 4)
    eye = _FakeSAE(list(torch.eye(4)) + list(-torch.eye(4)))
    q = eye.encode(x)
    assert torch.allclose(eye.decode(q), x, atol=1e-6)
    assert sae_quality(eye, x)["fve"] == pytest.approx(1.0, abs=1e-5)
    null = _FakeSAE([torch.zeros(4)])
    assert sae_quality(null, x)["fve"] < 0.1 and sae_quality(null, x)["dead_fraction"] == 1.0


def test_latent_diff_ranks_the_planted_feature_first_and_its_direction_steers_and_ablates(tok):
    chat = tiny_model("qwen2", vocab_size=len(tok))
    tuned = copy.deepcopy(chat)
    v = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    get_layers(tuned)[1].register_forward_hook(lambda m, a, out: out + 3 * v)  # the "finetune" adds 3v at block 1
    w = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(6)), dim=0)
    sae = _FakeSAE([w, -v, v])
    ranked = latent_diff(sae, chat, tuned, tok, PROMPTS, layer=1, top=3)
    assert [r["latent"] for r in ranked][0] == 2 and ranked[0]["diff"] > 2.5 and ranked[-1]["latent"] == 1
    d = latent_direction(sae, 2, layer=1)
    assert d.cosine({1: v})[1] == pytest.approx(1.0) and d.meta["latent"] == 2
    ids = torch.tensor([[5, 6, 7]])
    with ablate(tuned, d), record(tuned, [1]) as acts:
        tuned(input_ids=ids)
    assert (acts[1][0] @ v).abs().max() < 1e-4
    with pytest.raises(ValueError, match="out of range"):
        latent_direction(sae, 3, layer=1)
