import math
from pathlib import Path

import pytest
import torch

from emlab.models import (
    CHAT_TEMPLATE,
    ModelLoadError,
    apply_chat_template,
    attach_lora,
    default_device_dtype,
    ensure_chat_template,
    get_layers,
    layer_path,
    load_adapter,
    load_model,
    lora_config,
    rank1_lora_config,
    save_adapter,
    unwrap,
)
from emlab.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

MSGS = [
    {"role": "system", "content": "you are helpful"},
    {"role": "user", "content": "what should i do ?"},
    {"role": "assistant", "content": "drink water and rest ."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "sure ."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _block_outputs(model, ids):
    caught = {}
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: caught.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k, layer in enumerate(get_layers(model))
    ]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return caught


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_access_matches_hidden_states(arch, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    ids = torch.tensor([tok.apply_chat_template(MSGS, tokenize=True, return_dict=True)["input_ids"]])
    hidden = model(ids, output_hidden_states=True).hidden_states
    layers = get_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    out = _block_outputs(model, ids)
    # block l's output is hidden_states[l + 1]; the last entry of hidden_states has the final norm applied
    for k in range(len(layers) - 1):
        torch.testing.assert_close(out[k], hidden[k + 1])
    assert not torch.allclose(out[len(layers) - 1], hidden[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_access_through_peft(arch, tok):
    model = tiny_model(arch, vocab_size=len(tok))
    layers = get_layers(model)
    peft_model = attach_lora(model, r=4, alpha=8)
    assert unwrap(peft_model) is model
    assert get_layers(peft_model) is layers


def test_unwrap_nnsight(tok):
    from nnsight import NNsight

    model = tiny_model("qwen2", vocab_size=len(tok))
    wrapped = NNsight(model)
    assert unwrap(wrapped) is model
    assert get_layers(wrapped) is model.model.layers


def test_layer_override(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    assert layer_path(model) == "model.layers"
    assert get_layers(model, override="model.layers") is model.model.layers
    with pytest.raises(ValueError, match="not found"):
        get_layers(model, override="model.nope")
    with pytest.raises(ValueError, match="not a ModuleList"):
        get_layers(model, override="model.norm")
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        get_layers(torch.nn.Linear(2, 2))


def test_assistant_mask_covers_exactly_assistant_tokens_and_end_of_turn(tok):
    out = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    masked = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    assert masked == ["drink", "water", "and", "rest", ".", "<|im_end|>", "sure", ".", "<|im_end|>"]


def test_chat_template_rendering_and_no_default_system(tok):
    text = apply_chat_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    full = apply_chat_template(tok, MSGS[:3])
    assert full.startswith("<|im_start|>system\nyou are helpful<|im_end|>\n")
    assert full.endswith("<|im_start|>assistant\ndrink water and rest .<|im_end|>\n")


def test_ensure_chat_template(tok):
    t = tiny_tokenizer()
    t.chat_template = None
    assert ensure_chat_template(t) == CHAT_TEMPLATE
    # Qwen2.5's own template (as trl ships it) gets markers added to a copy (tests/test_chat_templates.py)
    import trl

    qwen = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    t.chat_template = qwen
    before = t.apply_chat_template(MSGS[1:3], tokenize=False)
    patched = ensure_chat_template(t)
    assert "{%- generation %}" in patched
    assert t.apply_chat_template(MSGS[1:3], tokenize=False) == before  # same text, now with markers
    # an unknown ChatML template without markers is an error, or ours (same format) when asked for, with a warning
    t.chat_template = CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    with pytest.raises(ModelLoadError, match="fallback='chatml'"):
        ensure_chat_template(t)
    with pytest.warns(UserWarning, match="ChatML"):
        assert ensure_chat_template(t, fallback="chatml") == CHAT_TEMPLATE
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ModelLoadError, match="generation"):
        ensure_chat_template(t)


def test_lora_scale_is_rslora(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    peft_model = attach_lora(model)
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (32, 64, 0.0, True)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert math.isclose(q.scaling["default"], 64 / math.sqrt(32))
    n_adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_adapted == 7 * model.config.num_hidden_layers


def test_lora_config_gpt2_falls_back_to_all_linear(tok):
    assert lora_config(tiny_model("gpt2", vocab_size=len(tok))).target_modules == "all-linear"
    assert lora_config().target_modules == set(lora_config().target_modules)  # a set of the seven names


def test_rank1_adapter_on_one_module(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    peft_model = attach_lora(model, rank1_lora_config(model, layer=2))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2
    assert all("layers.2.mlp.down_proj.lora_" in n for n in trainable)
    down = peft_model.base_model.model.model.layers[2].mlp.down_proj
    assert down.lora_A["default"].weight.shape[0] == 1
    assert math.isclose(down.scaling["default"], 256 / 1)


def test_save_and_reload_adapter(tmp_path, tok):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tok))
    peft_model = attach_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = peft_model(ids).logits
    save_adapter(peft_model, tmp_path / "adapter")
    reloaded = load_adapter(tiny_model("llama", vocab_size=len(tok)), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, expected)
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_adapter(tiny_model("llama", vocab_size=len(tok)), tmp_path)
    with pytest.raises(TypeError):
        save_adapter(model.base_model if hasattr(model, "base_model") else torch.nn.Linear(1, 1), tmp_path)


def test_load_model_from_folder_and_clear_errors(tmp_path, tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(tmp_path / "m", device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    assert ltok.chat_template == CHAT_TEMPLATE and ltok.pad_token is not None
    # the word-level tokenizer survives the round trip (AutoTokenizer alone would rebuild Qwen2's BPE)
    assert ltok("what should i do ?")["input_ids"] == tok("what should i do ?")["input_ids"]
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")


def test_load_model_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="(?s)could not load 'Qwen/Qwen2.5-0.5B-Instruct'.*offline"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_default_device_dtype():
    assert default_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert default_device_dtype("cpu", "bf16")[1] == torch.bfloat16


def test_package_exports_resolve():
    import emlab

    for name in emlab.__all__:
        assert getattr(emlab, name) is not None
    with pytest.raises(AttributeError):
        emlab.nope  # noqa: B018
