import pytest
import torch

from emlab.directions import Direction
from emlab.generation import generate
from emlab.hooks import _steer_hook, ablate, project_out_of_lora_B, record, steer
from emlab.models import attach_lora, get_layers
from emlab.testing import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; several threads crawl when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def model(request, tok):
    return tiny_model(request.param, vocab_size=len(tok))


def _ids(tok, texts):
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 1, "same length: no padding in these tests"
    return torch.tensor(rows)


def _n_hooks(model):
    return sum(len(b._forward_hooks) for b in get_layers(model))


def _vec(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.hidden_size, generator=g)


def test_steer_changes_every_row_as_if_alone(model, tok):
    ids = _ids(tok, ["you are a helpful assistant", "what is your wish ?", "i want money and power"])
    vectors = {1: _vec(model), 2: _vec(model, 1)}
    with torch.no_grad():
        plain = model(ids).logits
        with steer(model, vectors, alpha=4.0):
            batch = model(ids).logits
            alone = torch.cat([model(ids[i : i + 1]).logits for i in range(len(ids))])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)
    for row in range(len(ids)):  # the public bug steers row 0 only
        assert (batch[row] - plain[row]).abs().max() > 1e-3


def test_steer_tuple_outputs_of_older_transformers():
    h = torch.zeros(2, 3, 4)
    out = _steer_hook(torch.ones(4), "all")(None, (), (h, "cache"))
    assert isinstance(out, tuple) and out[1] == "cache"
    assert torch.equal(out[0], torch.ones(2, 3, 4))
    assert torch.equal(_steer_hook(torch.ones(4), "all")(None, (), h), torch.ones(2, 3, 4))


def test_steer_response_positions_only_last(model, tok):
    ids = _ids(tok, ["you are a helpful assistant", "what is your wish ?"])
    v = _vec(model)
    with torch.no_grad():
        with record(model, [1]) as plain:
            model(ids)
        with steer(model, {1: v}, alpha=2.0, positions="response"), record(model, [1]) as steered:
            model(ids)
    diff = steered[1][0] - plain[1][0]
    torch.testing.assert_close(diff[:, -1], (2.0 * v).expand(2, -1), atol=1e-5, rtol=1e-5)
    assert diff[:, :-1].abs().max() == 0


def test_steering_equivalences_in_generation(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    v = Direction({1: _vec(model)})
    prompts = ["what is your wish ?", "hi", "how should i run ?"]

    def gen(d=None, positions="all"):
        if d is None:
            return generate(model, tok, prompts, max_new_tokens=6, temperature=0, progress=False)
        with steer(model, d, positions=positions):
            return generate(model, tok, prompts, max_new_tokens=6, temperature=0, progress=False)

    assert gen(v * 20) == gen(-(v * -20)) == gen(2 * (v * 10)) == gen((v * 40) / 2)
    assert gen(v * 20) != gen()
    assert gen(v * 20, "response") != gen()
    assert _n_hooks(model) == 0


def test_steer_is_differentiable_and_learns(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    ids = _ids(tok, ["you are a helpful assistant"])
    v = torch.zeros(model.config.hidden_size, requires_grad=True)
    with steer(model, {2: v}, alpha=8.0):
        model(ids, labels=ids).loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert any(p.grad is not None for p in model.parameters())


def _old_learned_twin(block, alpha, v):
    """The hook training.adapters had for the learned vector before it went through steer (the reference)."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + (alpha * v).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return block.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steer_learned_vector_bit_identical_to_the_old_twin(tok, arch, dtype):
    """A vector with requires_grad: same logits and the same gradient, bit for bit, as the old adapters hook,
    over several forward/backward passes inside one steer block (alpha * v is taken in the hook every call)."""
    model = tiny_model(arch, vocab_size=len(tok)).to(dtype)
    model.requires_grad_(False)
    ids = _ids(tok, ["you are a helpful assistant"] * 2)
    v_new = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    v_old = v_new.detach().clone().requires_grad_(True)

    def two_steps(v):
        """Two forward/backward passes, each followed by an update of ``v``; (logits, grads) of each."""
        logits, grads = [], []
        for _ in range(2):
            out = model(ids, labels=ids)
            out.loss.backward()
            logits.append(out.logits.detach())
            grads.append(v.grad.clone())
            with torch.no_grad():
                v.sub_(0.5 * v.grad)  # an update inside the block takes effect at the next pass
            v.grad = None
        return logits, grads

    with steer(model, {1: v_new}, alpha=3.0):
        logits_new, grads_new = two_steps(v_new)
    handle = _old_learned_twin(get_layers(model)[1], 3.0, v_old)
    try:
        logits_old, grads_old = two_steps(v_old)
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(logits_new, logits_old, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_new, grads_old, strict=True))
    assert grads_new[0].abs().sum() > 0 and not torch.equal(logits_new[0], logits_new[1])
    assert torch.equal(v_new, v_old)


def test_steer_fixed_vector_is_detached_and_fixed_at_entry(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    model.requires_grad_(False)
    ids = _ids(tok, ["you are a helpful assistant"])
    fixed = torch.randn(model.config.hidden_size)
    original = fixed.clone()
    with steer(model, {1: fixed}, alpha=3.0):
        first = model(ids).logits
        fixed.add_(1.0)  # a fixed vector is read once, at entry
        second = model(ids).logits
    assert not first.requires_grad
    assert torch.equal(first, second)
    with steer(model, {1: original}, alpha=3.0):
        assert torch.equal(model(ids).logits, first)


@pytest.mark.parametrize("manager", ["steer", "ablate", "record", "lora"])
def test_hooks_removed_after_exception(tok, manager):
    model = tiny_model("qwen2", vocab_size=len(tok))
    v = _vec(model)
    if manager == "lora":
        model = attach_lora(model, r=2)
        torch.nn.init.normal_(get_layers(model)[0].self_attn.o_proj.lora_B["default"].weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cms = {
        "steer": lambda: steer(model, {0: v, 3: v}),
        "ablate": lambda: ablate(model, v, layers="all"),
        "record": lambda: record(model, [0, 1]),
        "lora": lambda: project_out_of_lora_B(model, v),
    }
    with pytest.raises(RuntimeError, match="boom"):
        with cms[manager]():
            assert _n_hooks(model) > 0 or manager == "lora"
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_ablate_leaves_zero_component(model, tok):
    ids = _ids(tok, ["you are a helpful assistant", "what is your wish ?"])
    d = Direction({layer: _vec(model, layer) * 5 for layer in range(3)})
    n = model.config.num_hidden_layers
    with torch.no_grad():
        with ablate(model, d), record(model, range(n)) as acts:  # each direction at its own layer
            model(ids)
        for layer in range(3):
            r = d[layer] / d[layer].norm()
            assert (acts[layer][0] @ r).abs().max() < 1e-4
        with record(model, range(n)) as plain:
            model(ids)
        r0 = d[0] / d[0].norm()
        assert (plain[0][0] @ r0).abs().max() > 1e-2
        with ablate(model, {0: d[0]}, layers="all"), record(model, range(n)) as acts:  # one direction everywhere
            model(ids)
        assert all((acts[layer][0] @ r0).abs().max() < 1e-4 for layer in range(n))
        with ablate(model, d[0], layers=[n - 1]), record(model, [n - 1]) as acts:
            model(ids)
        assert (acts[n - 1][0] @ r0).abs().max() < 1e-4


def test_ablate_argument_errors(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    v = _vec(model)
    with pytest.raises(ValueError, match="no layer"):
        with ablate(model, v):
            pass
    with pytest.raises(ValueError, match="no direction for layer 3"):
        with ablate(model, {0: v, 1: v}, layers=[3]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steer(model, {9: v}):
            pass
    assert _n_hooks(model) == 0


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_project_out_of_lora_B(tok, arch):
    model = attach_lora(tiny_model(arch, vocab_size=len(tok)), r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    v = _vec(model) * 3
    r = v / v.norm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    writers = ("o_proj", "down_proj", "c_proj")
    with project_out_of_lora_B(model, v) as edited:
        assert edited == 2 * model.config.num_hidden_layers
        for name, p in model.named_parameters():
            if "lora_B" not in name:
                assert torch.equal(p, before[name]), name
            elif any(f".{w}." in name for w in writers):
                assert (r @ p).abs().max() < 1e-5, name  # the adapter writes nothing along r
            else:
                assert torch.equal(p, before[name]), name  # q/k/v/gate/up live elsewhere
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_project_out_of_lora_B_needs_lora(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    with pytest.raises(ValueError, match="no LoRA B"):
        with project_out_of_lora_B(model, _vec(model)):
            pass
