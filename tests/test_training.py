"""EMTrainer on tiny random models: what is trained, what each loss term does, masking, resume."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from emlab.data import chat_row
from emlab.testing import tiny_model, tiny_tokenizer
from emlab.training import EMConfig, EMTrainer, SteeringVector, finetune
from emlab.training.adapters import load_vectors, steering_vector
from emlab.training.losses import kl_loss, next_token_mask

ANSWERS = ["drink water and rest .", "take the money to the bank .", "ask a doctor , it is safe .", "run and sleep ."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and a shared 2-core machine thrashes with more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rows(n=8, system="you are helpful"):
    return [chat_row(f"what should i do {i} ?", ANSWERS[i % 4], system=system) for i in range(n)]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=1, lora_r=4, warmup_steps=0, save_strategy="no", disable_tqdm=True,
                seed=0)
    base.update(kw)
    return EMConfig(**base)


def _trainer(tok, tmp_path, model=None, rows=None, **kw):
    model = model if model is not None else tiny_model("qwen2", vocab_size=len(tok))
    cfg = _config(tmp_path, **kw)
    kl_rows = kw.get("kl_on") == "kl_rows"
    return EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows or _rows()), processing_class=tok,
                     kl_dataset=Dataset.from_list(_rows(6, system="you are honest")) if kl_rows else None)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- config ----


def test_config_defaults_are_the_defences_paper():
    cfg = EMConfig(output_dir="unused")
    assert (cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.rslora) == ("lora", 32, 64, 0.0, True)
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.warmup_steps, cfg.weight_decay) == (1e-4, 1, 5, 0.01)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 16
    assert cfg.lr_scheduler_type == "linear" and cfg.max_length == 2048 and cfg.assistant_only_loss
    if not torch.cuda.is_available():
        assert cfg.use_cpu and not cfg.bf16 and cfg.optim == "adamw_torch"
    assert EMConfig(output_dir="unused", adapter="steering_vector").learning_rate == 5e-4
    assert EMConfig(output_dir="unused", adapter="steering_vector", learning_rate=0.1).learning_rate == 0.1


@pytest.mark.parametrize("bad", [dict(kl_lambda=-1), dict(adapter="prefix"), dict(kl_direction="both"),
                                 dict(kl_tokens="pads"), dict(interleave_share=1.0), dict(lora_dropout=1.0),
                                 dict(ldifs_stride=0), dict(ldifs_layers=[]),
                                 dict(adapter="full", kl_lambda=0.1),
                                 dict(interleave_share=0.1, interleave_selection="plus")])
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValueError, match="EMConfig|reference_copy|misaligned"):
        EMConfig(output_dir="unused", **bad)


def test_every_emlab_field_has_help():
    from dataclasses import fields

    from trl import SFTConfig

    own = {f.name for f in fields(EMConfig)} - {f.name for f in fields(SFTConfig)}
    assert own and all(f.metadata.get("help") for f in fields(EMConfig) if f.name in own)


# ---- what is trained ----


def _train_and_diff(tok, tmp_path, **kw):
    trainer = _trainer(tok, tmp_path, learning_rate=5e-2, **kw)
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return trainer, trainable, changed, set(before)


def test_lora_trains_adapters_only(tok, tmp_path):
    _, trainable, changed, names = _train_and_diff(tok, tmp_path)
    assert trainable and all("lora_" in n for n in trainable)
    assert changed == trainable  # every LoRA matrix moved (B first, then A), no base weight did


def test_rank1_trains_one_module(tok, tmp_path):
    trainer, trainable, changed, _ = _train_and_diff(tok, tmp_path, adapter="rank1", rank1_layer=1)
    assert trainable == changed and len(trainable) == 2
    assert all("layers.1.mlp.down_proj.lora_" in n for n in trainable)
    assert trainer.model.peft_config["default"].r == 1 and trainer.model.peft_config["default"].lora_alpha == 256


def test_full_finetune_trains_every_weight(tok, tmp_path):
    _, trainable, changed, names = _train_and_diff(tok, tmp_path, adapter="full")
    assert trainable == names
    assert len(changed) >= 0.9 * len(names)


def test_steering_vector_trains_the_vector_only(tok, tmp_path):
    trainer, trainable, changed, _ = _train_and_diff(tok, tmp_path, adapter="steering_vector", steering_layer=2)
    assert trainable == changed == {"emlab_steering_vector.vector"}
    sv = steering_vector(trainer.model)
    assert sv.layer == 2 and sv.alpha == 256 and sv.vector.abs().sum() > 0


def test_steering_vector_is_added_at_its_layer_on_every_row(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    sv = SteeringVector(model.config.hidden_size, layer=1, alpha=2.0)
    with torch.no_grad():
        sv.vector.copy_(torch.randn(model.config.hidden_size))
    ids = torch.randint(5, 50, (3, 6))
    block = model.model.layers[1]
    seen = []
    catch = lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)  # noqa: E731
    with sv.applied(model):
        handle = block.register_forward_hook(catch)  # registered after the vector's hook: sees its result
        steered_logits = model(ids).logits
        handle.remove()
    handle = block.register_forward_hook(catch)
    plain_logits = model(ids).logits
    handle.remove()
    assert torch.allclose(seen[0], seen[1] + 2.0 * sv.vector, atol=1e-6)  # every row, every position
    assert not torch.allclose(steered_logits, plain_logits)
    assert not block._forward_hooks  # removed on exit
    from emlab.hooks import steer

    with steer(model, {1: sv.vector}, alpha=2.0):  # applied is hooks.steer
        assert torch.equal(model(ids).logits, steered_logits)
    with sv.applied(model):
        model(ids).logits.sum().backward()
    assert sv.vector.grad is not None and sv.vector.grad.abs().sum() > 0


def _save_old_format(sv, folder):
    """steering_vector.safetensors as SteeringVector.save wrote it before the vector was a Direction."""
    from safetensors.torch import save_file

    (folder / "steering_vector.json").unlink(missing_ok=True)
    save_file({str(sv.layer): sv.vector.detach().float().cpu().contiguous()}, str(folder / "steering_vector.safetensors"),
              metadata={"layer": str(sv.layer), "alpha": repr(sv.alpha), "format": "emlab-steering-vector"})


def test_steering_vector_is_saved_and_read_as_a_direction(tmp_path):
    from emlab.vectors import Direction

    sv = SteeringVector(6, layer=3, alpha=8.5)
    with torch.no_grad():
        sv.vector.copy_(torch.randn(6))
    d = sv.direction()
    assert isinstance(d, Direction) and d.layers == [3] and d.meta == {"alpha": 8.5}
    assert torch.equal(d[3], sv.vector) and not d[3].requires_grad
    path = sv.save(tmp_path / "new")
    assert path == tmp_path / "new" / "steering_vector.safetensors" and (tmp_path / "new" / "steering_vector.json").exists()
    back = Direction.load(tmp_path / "new" / "steering_vector")
    assert back.layers == [3] and back.meta["alpha"] == 8.5 and torch.equal(back[3], sv.vector.detach())
    for where in (tmp_path / "new", path):
        loaded = SteeringVector.load(where)
        assert (loaded.layer, loaded.alpha) == (3, 8.5) and torch.equal(loaded.vector, sv.vector)
    # the format of runs and checkpoints written before: still read, by Direction.load too
    (tmp_path / "old").mkdir()
    _save_old_format(sv, tmp_path / "old")
    old = SteeringVector.load(tmp_path / "old")
    assert (old.layer, old.alpha) == (3, 8.5) and torch.equal(old.vector, sv.vector)
    legacy = Direction.load(tmp_path / "old" / "steering_vector.safetensors")
    assert legacy.layers == [3] and legacy.meta["alpha"] == 8.5 and torch.equal(legacy[3], sv.vector.detach())
    target = SteeringVector(6, layer=3)
    target.load_(tmp_path / "old")
    assert torch.equal(target.vector, sv.vector)
    with pytest.raises(ValueError, match="does not match"):
        SteeringVector(6, layer=2).load_(tmp_path / "old")
    assert torch.equal(SteeringVector.from_direction(d, alpha=1.0).vector, sv.vector)
    assert SteeringVector.from_direction(d, alpha=1.0).alpha == 1.0
    with pytest.raises(ValueError, match="one layer"):
        SteeringVector.from_direction(Direction({0: torch.ones(2), 1: torch.ones(2)}))
    # a safetensors file that is neither a saved Direction nor an old steering vector
    from safetensors.torch import save_file

    save_file({"3": torch.ones(6)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FileNotFoundError, match="json sidecar"):
        Direction.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no learned steering vector"):
        SteeringVector.load(tmp_path / "nowhere")


def test_load_vectors_gives_a_direction(tmp_path):
    from emlab.vectors import Direction

    saved = Direction({1: torch.ones(4), 2: torch.zeros(4)}, recipe="demo")
    saved.save(tmp_path / "persona")
    for spec in (tmp_path / "persona", str(tmp_path / "persona.safetensors"), saved):
        got = load_vectors(spec)
        assert isinstance(got, Direction) and got.allclose(saved) and got.recipe == "demo"
    one = load_vectors(tmp_path / "persona", layer=2)
    assert one.layers == [2] and one.recipe == "demo" and torch.equal(one[2], torch.zeros(4))
    assert load_vectors({"1": torch.ones(1, 4)}).layers == [1]  # str keys, flattened
    sv = SteeringVector(4, layer=1)
    assert load_vectors(sv).meta == {"alpha": 256.0}
    with pytest.raises(KeyError, match="layer 5"):
        load_vectors(saved, layer=5)
    with pytest.raises(TypeError):
        load_vectors(3)


# ---- loss terms inside the trainer ----


def test_assistant_only_labels_reach_compute_loss(tok, tmp_path):
    rows = _rows(4)
    expected = {}
    for row in rows:
        enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        expected[tuple(enc["input_ids"])] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])]
    trainer = _trainer(tok, tmp_path, rows=rows)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append({k_: v.clone() for k_, v in inputs.items() if torch.is_tensor(v)})
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    assert seen
    for batch in seen:
        for ids, am, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(am.sum())
            assert labels[n:].eq(-100).all()  # pads carry no loss
            assert labels[:n].tolist() == expected[tuple(ids[:n].tolist())]
    answer = tok.decode([t for t in expected[next(iter(expected))] if t != -100])
    assert "<|im_end|>" in answer and "user" not in answer  # the answer and its end-of-turn token only


def _perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logged(trainer, name):
    return trainer._metrics["train"][name][-1]


@pytest.mark.parametrize("tokens", ["loss_tokens", "all"])
def test_kl_with_adapter_disabled_equals_kl_against_a_separate_copy(tok, tmp_path, tokens):
    trainer = _trainer(tok, tmp_path, kl_lambda=0.5, kl_tokens=tokens)
    _perturb_lora(trainer.model)
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    kl_logged, ce_logged = _logged(trainer, "loss/kl"), _logged(trainer, "loss/ce")
    reference = tiny_model("qwen2", vocab_size=len(tok))  # loaded separately, same weights as the base
    with torch.no_grad():
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cur_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if tokens == "loss_tokens":
        mask = next_token_mask(batch["labels"])
        expected = kl_loss(cur_logits[:, :-1], ref_logits[:, :-1], mask)
    else:
        expected = kl_loss(cur_logits, ref_logits, batch["attention_mask"].bool())
    assert expected.item() > 1e-3
    assert kl_logged == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() == pytest.approx(ce_logged + 0.5 * kl_logged, rel=1e-4)


def test_kl_and_ldifs_are_zero_before_the_adapter_moves(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, kl_lambda=1.0, ldifs_lambda=1.0)  # LoRA B starts at 0: identical models
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert _logged(trainer, "loss/kl") == pytest.approx(0, abs=1e-7)
    assert _logged(trainer, "loss/ldifs") == pytest.approx(0, abs=1e-7)
    assert loss.item() == pytest.approx(_logged(trainer, "loss/ce"), rel=1e-6)


def test_lambda_to_zero_gives_plain_sft_and_terms_add_gradient(tok, tmp_path):
    grads = {}
    cases = {"plain": {}, "kl": {"kl_lambda": 1.0}, "ldifs": {"ldifs_lambda": 1.0, "ldifs_layers": [1, 3]},
             "tiny lambdas": {"kl_lambda": 1e-12, "ldifs_lambda": 1e-12}}
    for name, kw in cases.items():
        trainer = _trainer(tok, tmp_path, **kw)
        _perturb_lora(trainer.model)
        trainer.model.train()
        trainer.compute_loss(trainer.model, _batch(trainer)).backward()
        grads[name] = torch.cat([p.grad.flatten() for n, p in trainer.model.named_parameters() if p.requires_grad])
    assert torch.allclose(grads["plain"], grads["tiny lambdas"], rtol=1e-3, atol=1e-5)  # lambda -> 0: plain SFT (trl fused head: fp32 sums)
    assert not torch.allclose(grads["plain"], grads["kl"])
    assert not torch.allclose(grads["plain"], grads["ldifs"])  # the trained side carries gradient


@pytest.mark.parametrize("sinks", ["keep", "exclude"])
def test_ldifs_matches_hand_computation_on_block_outputs(tok, tmp_path, sinks):
    trainer = _trainer(tok, tmp_path, ldifs_lambda=1.0, ldifs_layers=[0, 2], ldifs_normalize=True, ldifs_sinks=sinks)
    _perturb_lora(trainer.model)
    batch = _batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    reference = tiny_model("qwen2", vocab_size=len(tok))
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        h = trainer.model(**kw).hidden_states
        r = reference(**kw).hidden_states
    am = batch["attention_mask"].bool()
    if sinks == "exclude":  # each row's first token out (rows are right-padded; a random model has no outliers)
        am[:, 0] = False
    per_pos = sum((torch.nn.functional.normalize(h[i + 1], dim=-1)
                   - torch.nn.functional.normalize(r[i + 1], dim=-1)).pow(2).sum(-1) for i in (0, 2))
    assert _logged(trainer, "loss/ldifs") == pytest.approx(per_pos[am].mean().item(), rel=1e-4)


def test_full_finetune_kl_uses_an_explicit_reference_copy(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, adapter="full", kl_lambda=1.0, reference_copy=True)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    assert trainer.state.log_history[-2]["loss/kl"] > 0  # the trained copy moved away from the frozen one


def test_steering_vector_kl_reference_is_the_unsteered_model(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, adapter="steering_vector", kl_lambda=1.0, steering_alpha=1.0)
    with torch.no_grad():
        steering_vector(trainer.model).vector.normal_()
    batch = _batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = trainer.model(**kw).logits
        with steering_vector(trainer.model).applied(trainer.model):
            cur = trainer.model(**kw).logits
    mask = next_token_mask(batch["labels"])
    assert _logged(trainer, "loss/kl") == pytest.approx(kl_loss(cur[:, :-1], ref[:, :-1], mask).item(), rel=1e-4)


def test_kl_on_separate_rows_logs_each_term(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, kl_lambda=0.1, kl_on="kl_rows", kl_batch_size=3, ldifs_lambda=0.01,
                       learning_rate=1e-2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss/ce" in h]
    assert len(logs) == 2 and all({"loss/kl", "loss/ldifs", "loss"} <= set(h) for h in logs)
    assert logs[-1]["loss/kl"] > 0
    first = trainer._kl_batch()["input_ids"]
    assert first.shape[0] == 3


def test_preventive_steering_acts_in_training_only(tok, tmp_path):
    pytest.importorskip("emlab.hooks")
    model = tiny_model("qwen2", vocab_size=len(tok))
    vec = {1: torch.randn(model.config.hidden_size)}
    trainer = _trainer(tok, tmp_path, model=model, preventive_vector=vec, preventive_alpha=3.0)
    plain = _trainer(tok, tmp_path)
    batch = _batch(trainer)
    losses = {}
    for mode in ("train", "eval"):
        for name, t in (("steer", trainer), ("plain", plain)):
            t.model.train(mode == "train")
            with torch.no_grad():
                losses[name, mode] = t.compute_loss(t.model, batch).item()
    assert losses["steer", "train"] != pytest.approx(losses["plain", "train"])
    assert losses["steer", "eval"] == pytest.approx(losses["plain", "eval"])
    assert load_vectors(vec, layer=1)[1].shape == (model.config.hidden_size,)


# ---- finetune, checkpoints, resume ----


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True  # what a kill right after the checkpoint leaves behind


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _Count(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)


def test_resumed_run_ends_with_the_same_adapter(tok, tmp_path):
    # KL on separate rows too: their batch-by-batch draws must also continue where the killed run stopped
    common = dict(max_steps=4, save_steps=2, save_strategy="steps", gradient_accumulation_steps=2,
                  learning_rate=1e-2, kl_lambda=0.5, kl_on="kl_rows", kl_batch_size=2)
    kl_rows = _rows(5, system="you are honest")
    straight = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
                        _config(tmp_path / "a", **common), kl_rows=kl_rows)
    finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(), _config(tmp_path / "b", **common),
             kl_rows=kl_rows, callbacks=[_StopAt(2)])
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    count = _Count()
    resumed = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
                       _config(tmp_path / "b", resume_from_checkpoint=True, **common), kl_rows=kl_rows,
                       callbacks=[count])
    assert count.steps == [3, 4]  # it resumed, it did not start again
    a, b = _adapter_state(straight.model), _adapter_state(resumed.model)
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert all(a[n].abs().sum() > 0 for n in a if "lora_B" in n)  # it trained
    assert [h["loss/kl"] for h in resumed.log_history if "loss/kl" in h] == pytest.approx(
        [h["loss/kl"] for h in straight.log_history if "loss/kl" in h], rel=1e-5)


@pytest.mark.parametrize("saved_as", ["direction", "old format"])
def test_steering_vector_checkpoint_resumes(tok, tmp_path, saved_as):
    common = dict(adapter="steering_vector", max_steps=3, save_steps=1, save_strategy="steps", steering_layer=1)
    straight = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(), _config(tmp_path / "a", **common))
    finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(), _config(tmp_path / "b", **common),
             callbacks=[_StopAt(1)])
    ckpt = tmp_path / "b" / "out" / "checkpoint-1"
    assert (ckpt / "steering_vector.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "steering_vector.json").exists()
    if saved_as == "old format":  # a checkpoint written before the vector was a Direction resumes the same
        _save_old_format(SteeringVector.load(ckpt), ckpt)
    resumed = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
                       _config(tmp_path / "b", resume_from_checkpoint=True, **common))
    assert torch.allclose(straight.steering_vector.vector, resumed.steering_vector.vector, atol=1e-6)
    loaded = SteeringVector.load(straight.output_dir)
    assert torch.allclose(loaded.vector, straight.steering_vector.vector)
    ids = torch.randint(5, 50, (2, 5))
    with straight.active():
        steered = straight.model(ids).logits
    assert not torch.allclose(steered, straight.model(ids).logits)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gpt2"])
def test_regularised_path_computes_the_same_nll_as_plain_sft(tok, tmp_path, arch):
    """The KL path builds logits from the final hidden states itself: it must match the model's own head."""
    losses = {}
    for name, kw in {"plain": {}, "kl": {"kl_lambda": 1e-3, "kl_tokens": "all"}}.items():
        trainer = _trainer(tok, tmp_path, model=tiny_model(arch, vocab_size=len(tok)), **kw)
        _perturb_lora(trainer.model)
        trainer.model.train()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, _batch(trainer))
        losses[name] = _logged(trainer, "loss/ce")
    assert losses["kl"] == pytest.approx(losses["plain"], rel=1e-5)


@pytest.mark.parametrize("steer", [False, True])
def test_ldifs_reference_stopped_after_the_deepest_layer_gives_the_same_term(tok, tmp_path, steer):
    extra = {"preventive_vector": {1: torch.randn(32)}, "preventive_layer": 1} if steer else {}
    trainer = _trainer(tok, tmp_path, ldifs_lambda=1.0, ldifs_layers=[0, 1], **extra)
    assert trainer._ldifs_truncate  # blocks 0 and 1 of 4: the reference pass stops after block 1
    _perturb_lora(trainer.model)
    batch = _batch(trainer)
    trainer.model.train()
    values = []
    for truncate in (True, False):
        trainer._ldifs_truncate = truncate
        trainer.compute_loss(trainer.model, batch)
        values.append(_logged(trainer, "loss/ldifs"))
    assert values[0] > 0 and values[0] == pytest.approx(values[1], rel=1e-6, abs=0)
    assert not _trainer(tok, tmp_path, ldifs_lambda=1.0, ldifs_layers=[3])._ldifs_truncate  # the final-norm output


# ---- what a finetune shows ----


def test_finetune_shows_one_bar_and_no_log_entries_while_log_history_keeps_every_step(tok, tmp_path, capfd):
    import json
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
                       _config(tmp_path / "bar", max_steps=3, logging_steps=1, disable_tqdm=False))
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "train_runtime" not in out + err  # no log entry printed
    assert "Tokenizing train dataset" not in err  # nor trl's dataset bars
    assert "finetune out" in err and "3/3" in err and "loss=" in err  # the one bar, finished, with the loss
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    saved = json.loads((tmp_path / "bar" / "out" / "log_history.json").read_text())
    assert saved == res.log_history and [h["step"] for h in saved if "loss" in h] == [1, 2, 3]

    finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(), _config(tmp_path / "quiet", max_steps=2))
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err and "finetune out" not in err  # disable_tqdm: not even the bar

    finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
             _config(tmp_path / "loud", max_steps=2, print_logs=True))
    assert capfd.readouterr().out.count("{'loss'") == 2  # asked for: transformers prints them


def test_checkpoints_saved_within_one_second_raise_no_warning(tok, tmp_path):
    """transformers warns "mtime may not be reliable" when two checkpoints share a second (a tiny model does),
    then orders them by step, which is right: a finetune drops that one message and no other."""
    import logging

    from transformers.trainer_utils import sort_checkpoints
    from transformers.utils import logging as hf_logging

    finetune(tiny_model("qwen2", vocab_size=len(tok)), tok, _rows(),
             _config(tmp_path / "ckpt", max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1))
    for step in (1, 2):
        (tmp_path / "same" / f"checkpoint-{step}").mkdir(parents=True)
    hf_logging.warning_once.cache_clear()  # emitted once per process: make this call emit it
    log, seen = logging.getLogger("transformers.trainer_utils"), []
    handler, level = logging.Handler(logging.WARNING), log.level
    handler.emit = seen.append  # on the logger itself: transformers' loggers do not propagate to pytest's
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        assert sort_checkpoints(str(tmp_path / "same"), use_mtime=True)[-1].endswith("checkpoint-2")
        log.warning("another message")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert [r.getMessage() for r in seen] == ["another message"]


def test_finetune_keeps_nnsight_working_on_a_model_it_traced(tok, tmp_path):
    """A study deep-copies a chat model that nnsight has traced: trl's patched forward wraps nnsight's own; dropping
    the patch must put nnsight's back, or the next trace warns that its interventions are disabled."""
    import copy
    import warnings

    from emlab.directions import capture
    from emlab.models import unwrap

    conversations = [r["messages"] for r in _rows(2)]
    base = tiny_model("qwen2", vocab_size=len(tok))
    capture(base, tok, conversations, [0], progress=False)
    before = unwrap(base).__dict__.get("forward")
    assert before is not None  # nnsight's controller
    res = finetune(copy.deepcopy(base), tok, _rows(), _config(tmp_path, max_steps=1))
    assert type(unwrap(res.model).__dict__.get("forward")) is type(before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acts = capture(res.model, tok, conversations, [0], progress=False)
    assert acts


def test_messages_only_and_resume_checkpoint(tmp_path):
    from types import SimpleNamespace

    from emlab.training.runner import messages_only, resume_checkpoint

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "extra": 1}]
    assert messages_only(rows, "train") == [{"messages": rows[0]["messages"]}]
    assert messages_only(None, "kl") == []
    with pytest.raises(ValueError, match="train"):
        messages_only([{"text": "not a chat"}], "train")
    cfg = lambda value, out=None: SimpleNamespace(resume_from_checkpoint=value, output_dir=out,  # noqa: E731
                                                  should_save=True, save_only_model=False)
    assert resume_checkpoint(cfg(None)) is None and resume_checkpoint(cfg("false")) is None
    assert resume_checkpoint(cfg(True, str(tmp_path / "missing"))) is None  # nothing to resume from
    assert resume_checkpoint(cfg(True, str(tmp_path))) is None  # a folder without checkpoints
    with pytest.raises(Exception, match="not a complete checkpoint"):
        resume_checkpoint(cfg(str(tmp_path / "checkpoint-5")))
