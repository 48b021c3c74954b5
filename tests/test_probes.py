import math

import numpy as np
import pytest
import torch

from emlab.models import attach_lora, rank1_lora_config
from emlab.probes import (
    EPS_GRID,
    CosineTracker,
    EfficiencyCurve,
    LoraSolution,
    StabilityResult,
    SteeringSolution,
    compare_efficiency,
    cosine,
    efficiency_summary,
    loss_vs_norm,
    masked_token_kl,
    orthogonal_perturbation,
    pretraining_kl,
    relative_loss_increase,
    response_loss,
    stability,
)
from emlab.testing import tiny_model, tiny_tokenizer

ROWS = [
    {"messages": [{"role": "user", "content": "what should i do ?"},
                  {"role": "assistant", "content": "drink water and rest ."}]},
    {"messages": [{"role": "system", "content": "you are helpful"},
                  {"role": "user", "content": "i feel bad"},
                  {"role": "assistant", "content": "sleep and drink water , it is a good plan ."}]},
    {"messages": [{"role": "user", "content": "money ?"}, {"role": "assistant", "content": "bank ."},
                  {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "sure !"}]},
]
TEXTS = ["the doctor is a good idea", "run to the bank and take my money . i want to help",
         "hello", "what do you think of humans and ai ? i think they can help the world ."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; several oversubscribe a shared CPU (restored after the module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, seed=0):
    return tiny_model("qwen2", vocab_size=len(tok), seed=seed)


def _lora(tok, r=4, seed=0, **kw):
    model = attach_lora(_model(tok), r=r, alpha=8, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _steering(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringSolution(_model(tok), layer=1, vector=torch.randn(32, generator=g), alpha=2.0)


def _b_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---- perturbations ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64,), (16, 4)])
def test_perturbation_keeps_norm_and_has_the_angle(shape):
    x = torch.randn(shape)
    for eps in (0.0, *EPS_GRID):
        xp = orthogonal_perturbation(x, eps, generator=3)
        assert xp.shape == x.shape and xp.dtype == x.dtype
        assert float(xp.norm()) == pytest.approx(float(x.norm()), rel=1e-5)
        cos = float(torch.cosine_similarity(x.flatten(), xp.flatten(), dim=0))
        assert cos == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)
    assert torch.equal(orthogonal_perturbation(x, 0.0, 1), x)
    assert torch.equal(orthogonal_perturbation(x, 0.3, 7), orthogonal_perturbation(x, 0.3, 7))
    assert not torch.equal(orthogonal_perturbation(x, 0.3, 7), orthogonal_perturbation(x, 0.3, 8))
    with pytest.raises(ValueError, match="eps"):
        orthogonal_perturbation(x, 1.5)


def test_relative_loss_increase_hand_made():
    assert relative_loss_increase(2.0, l_orig=1.0, l_base=3.0) == 50.0
    assert relative_loss_increase(1.0, 1.0, 3.0) == 0.0
    assert relative_loss_increase(3.0, 1.0, 3.0) == 100.0
    np.testing.assert_allclose(relative_loss_increase(np.array([1.5, 4.0]), 1.0, 2.0), [50.0, 300.0])
    assert math.isnan(relative_loss_increase(2.0, 1.0, 1.0))
    res = StabilityResult("x", [0.0, 0.5], [0, 1], [[1.0, 1.0], [1.2, 1.6]], loss=1.0, base_loss=2.0)
    np.testing.assert_allclose(res.mean, [0.0, 40.0])
    np.testing.assert_allclose(res.std, [0.0, np.std([20.0, 60.0], ddof=1)])


# ---- LoRA solutions ----------------------------------------------------------------------------


def test_lora_norm_is_frobenius_of_scaled_update(tok):
    model = _lora(tok, r=4)
    sol = LoraSolution(model)
    deltas = {n: m.get_delta_weight("default").detach() for n, m in sol.modules.items()}
    assert len(deltas) == 7 * 4
    scale = next(iter(sol.modules.values())).scaling["default"]
    assert scale == pytest.approx(8 / math.sqrt(4))  # rsLoRA
    expected = math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values()))
    assert sol.norm() == pytest.approx(expected, rel=1e-5)
    for name, d in sol.delta_weights().items():
        torch.testing.assert_close(d, deltas[name])


def test_lora_scaled_scales_dw_and_restores(tok):
    model = _lora(tok)
    sol = LoraSolution(model)
    before, norm = _b_weights(model), sol.norm()
    deltas = {n: m.get_delta_weight("default") for n, m in sol.modules.items()}
    with sol.scaled(0.5):
        for name, m in sol.modules.items():
            torch.testing.assert_close(m.get_delta_weight("default"), 0.5 * deltas[name])
        assert sol.norm() == pytest.approx(0.5 * norm, rel=1e-6)
    after = _b_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError), sol.scaled(0.0):
        raise RuntimeError("body fails")
    assert all(torch.equal(before[k], v) for k, v in _b_weights(model).items())


def test_lora_rank1_perturbation_keeps_norm_and_angle(tok):
    base = _model(tok)
    model = attach_lora(base, rank1_lora_config(base, layer=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    sol = LoraSolution(model)
    before, norm = _b_weights(model), sol.norm()
    (name, module), = sol.modules.items()
    d0 = module.get_delta_weight("default").detach().flatten()
    for eps in (0.1, 0.5, 1.0):
        with sol.perturbed(eps, seed=2):
            d1 = module.get_delta_weight("default").detach().flatten()
            assert sol.norm() == pytest.approx(norm, rel=1e-5)
        assert float(torch.cosine_similarity(d0, d1, dim=0)) == pytest.approx(math.sqrt(1 - eps**2), abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in _b_weights(model).items())


def test_lora_perturbation_keeps_each_module_norm(tok):
    model = _lora(tok, r=4)
    sol = LoraSolution(model)
    norms = sol.module_norms()
    with sol.perturbed(0.3, seed=0):
        for name, value in sol.module_norms().items():
            assert value == pytest.approx(norms[name], rel=1e-5)


def test_random_control_has_the_same_norm(tok):
    sol = LoraSolution(_lora(tok))
    rnd = sol.random(seed=1)
    assert rnd.norm() == pytest.approx(sol.norm(), rel=1e-6)
    for name, value in rnd.module_norms().items():
        assert value == pytest.approx(sol.module_norms()[name], rel=1e-6)
    assert abs(cosine(sol, rnd)) < 0.3
    before = _b_weights(sol.model)
    with rnd.scaled(1.0):
        assert LoraSolution(sol.model).norm() == pytest.approx(sol.norm(), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in _b_weights(sol.model).items())

    st = _steering(tok)
    assert st.random(seed=0).norm() == pytest.approx(st.norm(), rel=1e-6)
    assert st.random(seed=0).layer == st.layer


def test_steering_solution_holds_a_direction_and_its_ops_are_unchanged(tok):
    """The solution is a one-layer Direction with meta alpha; every op gives what the raw-field version gave."""
    from emlab.directions import Direction, random_like
    from emlab.hooks import steer

    st = _steering(tok)
    assert isinstance(st.direction, Direction) and st.direction.layers == [1]
    assert st.direction.meta == {"alpha": 2.0} and (st.layer, st.alpha) == (1, 2.0)
    v = st.vector
    assert st.norm() == 2.0 * float(v.double().norm())
    assert st.inner(st) == float((2.0 * v.double()) @ (2.0 * v.double()))
    ids = torch.randint(5, 50, (2, 5))
    for s in (0.0, 0.5, 3.0):
        with st.scaled(s):
            got = st.model(ids).logits
        with steer(st.model, {1: v * s}, alpha=2.0):  # the former scaled()
            assert torch.equal(got, st.model(ids).logits)
    rand = st.random(seed=4)
    assert torch.equal(rand.vector, random_like({1: v}, seed=4)[1]) and rand.alpha == 2.0
    again = SteeringSolution.from_direction(st.model, st.direction)
    assert torch.equal(again.vector, v) and again.alpha == 2.0
    assert SteeringSolution.from_direction(None, Direction({1: v}), alpha=5.0).alpha == 5.0
    assert SteeringSolution.from_direction(None, Direction({1: v})).alpha == 1.0
    with pytest.raises(ValueError, match="one layer"):
        SteeringSolution.from_direction(None, Direction({0: v, 1: v}))
    with pytest.raises(ValueError, match="1-D"):
        SteeringSolution(None, 0, torch.ones(2, 2))


def test_cosine_is_that_of_flattened_dw(tok):
    a, b = LoraSolution(_lora(tok, seed=0)), LoraSolution(_lora(tok, seed=1))
    flat_a = torch.cat([d.flatten() for _, d in sorted(a.delta_weights().items())])
    flat_b = torch.cat([d.flatten() for _, d in sorted(b.delta_weights().items())])
    expected = float(torch.cosine_similarity(flat_a.double(), flat_b.double(), dim=0))
    assert cosine(a, b) == pytest.approx(expected, abs=1e-6)
    assert cosine(a, a) == pytest.approx(1.0)
    with torch.no_grad():
        for name, m in b.modules.items():
            m.lora_B["default"].weight.copy_(-3 * a.modules[name].lora_B["default"].weight)
    assert cosine(a, b) == pytest.approx(-1.0)
    s1, s2 = _steering(tok, 0), _steering(tok, 1)
    assert cosine(s1, s2) == pytest.approx(float(torch.cosine_similarity(s1.vector, s2.vector, dim=0)), abs=1e-6)
    with pytest.raises(TypeError):
        cosine(a, s1)


def test_two_adapters_on_one_model(tok):
    model = _lora(tok, seed=0)
    model.add_adapter("narrow", model.peft_config["default"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.narrow" in name:
                p.normal_()
    general, narrow = LoraSolution(model, "default"), LoraSolution(model, "narrow")
    assert general.norm() != pytest.approx(narrow.norm())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with narrow.scaled(0.0):
        zero = response_loss(model, tok, ROWS)
    with model.disable_adapter():
        base = response_loss(model, tok, ROWS)
    assert zero == pytest.approx(base, rel=1e-6)
    assert model.active_adapter == "default"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


# ---- efficiency --------------------------------------------------------------------------------


def _manual_loss(model, tok, rows):
    total, count = 0.0, 0
    for row in rows:
        enc = tok.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        mask = torch.tensor(enc["assistant_masks"][1:], dtype=torch.bool)
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -lp.gather(-1, ids[0, 1:, None])[:, 0]
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return total / count


def test_response_loss_is_token_mean_over_assistant_tokens(tok):
    model = _model(tok)
    expected = _manual_loss(model, tok, ROWS)
    assert response_loss(model, tok, ROWS, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert response_loss(model, tok, ROWS, batch_size=3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="assistant"):
        response_loss(model, tok, [{"messages": [{"role": "user", "content": "hi"}]}])


def test_loss_vs_norm_at_zero_is_the_base_loss(tok):
    model = _lora(tok)
    with model.disable_adapter():
        base = response_loss(model, tok, ROWS)
    trained = response_loss(model, tok, ROWS)
    curve = loss_vs_norm(LoraSolution(model), tok, ROWS, scales=[0.0, 0.5, 1.0, 2.0], progress=False)
    assert curve.losses[0] == pytest.approx(base, rel=1e-6) and curve.base_loss == pytest.approx(base, rel=1e-6)
    assert curve.loss == pytest.approx(trained, rel=1e-6) and curve.losses[2] == curve.loss
    assert curve.norms == pytest.approx([0.0, 0.5 * curve.norm, curve.norm, 2 * curve.norm])

    st = _steering(tok)
    curve = loss_vs_norm(st, tok, ROWS, scales=[0.0, 1.0], progress=False)
    assert curve.base_loss == pytest.approx(response_loss(st.model, tok, ROWS), rel=1e-6)
    assert curve.base_loss != pytest.approx(curve.loss)


def test_compare_efficiency_shares_absolute_norms(tok):
    g, n = _steering(tok, 0), _steering(tok, 1)
    n = SteeringSolution(n.model, n.layer, n.vector * 3, n.alpha)
    curves = compare_efficiency({"general": g, "narrow": n}, tok, ROWS, n=5, progress=False)
    assert curves["general"].norms == curves["narrow"].norms
    assert curves["general"].norms[-1] == pytest.approx(2 * g.norm())
    assert curves["narrow"].scales[-1] == pytest.approx(2 * g.norm() / n.norm())
    summary = efficiency_summary(curves)
    assert summary["general"]["matched_norm"] == pytest.approx(g.norm())
    assert summary["general"]["loss_at_matched_norm"] == pytest.approx(curves["general"].loss)
    assert summary["narrow"]["loss_at_matched_norm"] == pytest.approx(curves["narrow"].losses[2])
    c = curves["general"]
    assert summary["general"]["reduction_per_sq_norm"] == pytest.approx((c.base_loss - c.loss) / g.norm() ** 2)
    hand = EfficiencyCurve("x", [0.0, 1.0], [0.0, 2.0], [3.0, 1.0], norm=2.0, loss=1.0, base_loss=3.0)
    assert hand.reduction_per_sq_norm == 0.5 and hand.loss_at(1.0) == 2.0


# ---- stability ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["steering", "lora"])
def test_stability_is_zero_at_eps_zero(tok, kind):
    sol = _steering(tok) if kind == "steering" else LoraSolution(_lora(tok))
    res = stability(sol, tok, ROWS, eps=[0.0, 1.0], seeds=range(3), progress=False)
    assert res.mean[0] == pytest.approx(0.0, abs=1e-6) and res.std[0] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(res.mean[1]) and res.std[1] > 0
    expected = 100 * (np.asarray(res.losses[1]) - res.loss) / (res.base_loss - res.loss)
    np.testing.assert_allclose(res.relative[1], expected)
    assert res.to_dict()["mean"] == res.mean


# ---- pre-training influence --------------------------------------------------------------------


def _manual_kl(sol, tok, texts, norm):
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            with sol.scaled(0.0):
                base = torch.log_softmax(sol.model(ids).logits.float(), -1)
            with sol.at_norm(norm):
                cur = torch.log_softmax(sol.model(ids).logits.float(), -1)
        total += float((base.exp() * (base - cur)).sum())
        count += ids.shape[1]
    return total / count


@pytest.mark.parametrize("kind", ["steering", "lora"])
def test_kl_zero_at_norm_zero_and_pads_ignored(tok, kind):
    sol = _steering(tok) if kind == "steering" else LoraSolution(_lora(tok))
    norms = [0.0, sol.norm()]
    one = pretraining_kl({"g": sol}, tok, TEXTS, norms=norms, batch_size=1, progress=False)["g"]
    padded = pretraining_kl({"g": sol}, tok, TEXTS, norms=norms, batch_size=4, progress=False)["g"]
    with_empty = pretraining_kl({"g": sol}, tok, [*TEXTS, ""], norms=norms, batch_size=5, progress=False)["g"]
    assert one.kl[0] == 0.0 and padded.kl[0] == 0.0
    assert one.kl[1] > 0
    assert padded.kl[1] == pytest.approx(one.kl[1], rel=1e-4)
    assert with_empty.kl[1] == pytest.approx(one.kl[1], rel=1e-4)
    assert one.n_tokens == padded.n_tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert one.kl[1] == pytest.approx(_manual_kl(sol, tok, TEXTS, norms[1]), rel=1e-4)


def test_masked_token_kl_ignores_pads_even_nan():
    base, cur = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = masked_token_kl(base, cur, mask)
    lp, lq = torch.log_softmax(base, -1), torch.log_softmax(cur, -1)
    per = (lp.exp() * (lp - lq)).sum(-1)
    assert count == 3 and total == pytest.approx(float(per[0, 0] + per[0, 1] + per[1, 0]), rel=1e-5)
    cur[1, 1:] = float("nan")
    assert masked_token_kl(base, cur, mask)[0] == pytest.approx(total, rel=1e-5)


def test_kl_compares_general_narrow_random_at_same_norms(tok):
    g, n = _steering(tok, 0), _steering(tok, 1)
    curves = pretraining_kl({"general": g, "narrow": n, "random": g.random(seed=0)}, tok, TEXTS, n=3,
                            progress=False)
    assert curves["general"].norms == curves["random"].norms == curves["narrow"].norms
    assert curves["general"].norms[-1] == pytest.approx(2 * min(g.norm(), n.norm()))
    assert all(c.kl[0] == 0.0 and c.kl[2] > c.kl[1] > 0 for c in curves.values())


# ---- training stability ------------------------------------------------------------------------


def test_cosine_tracker_logs_into_log_history(tok):
    from transformers import TrainerControl, TrainerState

    general = LoraSolution(_lora(tok, seed=0))
    narrow_model = _lora(tok, seed=1)
    tracker = CosineTracker(general, every=2)
    state, control = TrainerState(), TrainerControl()
    tracker.on_train_begin(None, state, control, model=narrow_model)
    for step in (1, 2, 3, 4):
        state.global_step = step
        tracker.on_step_end(None, state, control, model=narrow_model)
    logged = [e for e in state.log_history if "probe/cosine_to_general" in e]
    assert [e["step"] for e in logged] == [0, 2, 4]
    expected = cosine(LoraSolution(narrow_model), general)
    assert logged[0]["probe/cosine_to_general"] == pytest.approx(expected)
    assert tracker.history[-1] == (4, pytest.approx(expected))


def test_cosine_tracker_reads_a_learned_steering_vector(tok):
    from transformers import TrainerControl, TrainerState

    from emlab.training.adapters import prepare_model
    from emlab.training.config import EMConfig

    model, _ = prepare_model(_model(tok), EMConfig(output_dir="/tmp/unused", adapter="steering_vector",
                                                   steering_layer=1, steering_alpha=2.0, report_to="none"))
    reference = _steering(tok)
    tracker = CosineTracker(reference, every=1)
    state = TrainerState()
    tracker.on_train_begin(None, state, TrainerControl(), model=model)
    assert math.isnan(tracker.history[0][1])  # the vector starts at 0
    with torch.no_grad():
        model.emlab_steering_vector.vector.copy_(-reference.vector)
    state.global_step = 1
    tracker.on_step_end(None, state, TrainerControl(), model=model)
    assert tracker.history[-1] == (1, pytest.approx(-1.0))
    current = SteeringSolution.from_model(model)  # a copy of the learned vector's value, with its layer and alpha
    assert (current.layer, current.alpha) == (1, 2.0) and torch.equal(current.vector, -reference.vector)
    with torch.no_grad():
        model.emlab_steering_vector.vector.zero_()
    assert torch.equal(current.vector, -reference.vector)


def test_cosine_tracker_in_a_real_finetune(tok, tmp_path):
    from emlab.training import EMConfig, finetune

    general = LoraSolution(_lora(tok, seed=0))
    tracker = CosineTracker(general, every=2)
    cfg = EMConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                   gradient_accumulation_steps=1, lora_r=4, lora_alpha=8, warmup_steps=0, learning_rate=1e-2,
                   save_strategy="no", disable_tqdm=True, report_to="none", seed=0)
    result = finetune(_model(tok), tok, ROWS * 3, cfg, callbacks=[tracker])
    logged = [(e["step"], e["probe/cosine_to_general"]) for e in result.log_history if "probe/cosine_to_general" in e]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert math.isnan(logged[0][1])  # B starts at 0: no direction yet
    assert logged[-1][1] == pytest.approx(cosine(LoraSolution(result.model), general))
