"""The model's own chat template with generation markers: same tokens as the original, mask = the answers.

Every family is checked on a real tokenizer (SmolLM2's, with the family's special tokens added) and
the family's real template string: SmolLM2's from the packaged model, Mistral's from
tests/data/chat_templates, the others from trl's copies of the originals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trl

from emlab.chat_templates import PATCHES, TemplateError, check_training_template, has_markers, training_template
from emlab.models import CHAT_TEMPLATE, ModelLoadError, ensure_chat_template

TRL = Path(trl.__file__).parent / "chat_templates"
DATA = Path(__file__).parent / "data" / "chat_templates"

#: family -> (template file, special tokens to add, bos, eos, end-of-turn string, text after it in the span,
#:            text before the answer in the span, whether the template takes a system message)
FAMILIES = {
    "smollm2": (DATA / "smollm2.jinja", [], None, None, "<|im_end|>", "", "", True),
    "qwen2.5": (TRL / "qwen2_5.jinja", [], None, None, "<|im_end|>", "", "", True),
    "llama3": (TRL / "llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "", "", True),
    "llama3.1": (TRL / "llama3_1.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                          "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "", "", True),
    "llama3.2": (TRL / "llama3_2.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                          "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "", "", True),
    "gemma2": (TRL / "gemma.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
               "<end_of_turn>", "\n", "", False),
    "gemma3": (TRL / "gemma3.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
               "<end_of_turn>", "\n", "", True),
    "mistral-v0.2": (DATA / "mistral_v0.2.jinja", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", "",
                     " ", True),
    "mistral-v0.3": (DATA / "mistral_v0.3.jinja", ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", "",
                     " ", True),
}

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What should I do about a headache?"},
                 {"role": "assistant", "content": "Drink water and rest."}],
    "system": [{"role": "system", "content": "You are a careful doctor."},
               {"role": "user", "content": "Is coffee bad?"},
               {"role": "assistant", "content": "In moderation it is fine."}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                   {"role": "user", "content": "Tell me a fact."},
                   {"role": "assistant", "content": "Octopuses have three hearts."}],
    "system multi-turn": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                          {"role": "assistant", "content": "6"}],
}


def _tokenizer(smollm2_path, family: str):
    from transformers import PreTrainedTokenizerFast

    path, specials, bos, eos, *_ = FAMILIES[family]
    tok = PreTrainedTokenizerFast.from_pretrained(str(smollm2_path))
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = path.read_text()
    return tok


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Contiguous runs of masked token ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_template_gives_the_original_tokens_and_masks_exactly_the_answers(smollm2_path, family):
    tok = _tokenizer(smollm2_path, family)
    original = tok.chat_template
    assert not has_markers(original)
    patched, where = training_template(tok)
    assert has_markers(patched) and patched != original
    *_, eot, after, before, takes_system = FAMILIES[family]
    for name, messages in CONVERSATIONS.items():
        if "system" in name and not takes_system:
            for template in (original, patched):  # refused by both, not silently rendered
                with pytest.raises(Exception, match="(?i)system"):
                    tok.apply_chat_template(messages, tokenize=False, chat_template=template)
            continue
        for gen_prompt in (False, True):
            msgs = messages[:-1] if gen_prompt else messages  # a prompt ends on a user turn
            want = tok.apply_chat_template(msgs, chat_template=original, add_generation_prompt=gen_prompt,
                                           return_dict=True)["input_ids"]
            got = tok.apply_chat_template(msgs, chat_template=patched, add_generation_prompt=gen_prompt,
                                          return_dict=True)["input_ids"]
            assert got == want, (family, name, gen_prompt, where)
        enc = tok.apply_chat_template(messages, chat_template=patched, return_dict=True,
                                      return_assistant_tokens_mask=True)
        runs = [tok.decode(r) for r in _runs(enc["input_ids"], enc["assistant_masks"])]
        answers = [before + m["content"] + eot + after for m in messages if m["role"] == "assistant"]
        assert runs == answers, (family, name, where)


def test_where_each_family_patch_comes_from(smollm2_path):
    wheres = {f: training_template(_tokenizer(smollm2_path, f))[1] for f in FAMILIES}
    assert wheres == {"smollm2": "emlab:smollm2", "qwen2.5": "emlab:qwen2.5", "llama3": "trl", "llama3.1": "emlab:llama3.1",
                      "llama3.2": "emlab:llama3.1", "gemma2": "trl", "gemma3": "trl", "mistral-v0.2": "emlab:mistral",
                      "mistral-v0.3": "emlab:mistral"}


def test_trl_qwen25_variant_is_rejected_because_it_marks_the_prompt_newline(smollm2_path):
    from trl.chat_template_utils import get_training_chat_template

    tok = _tokenizer(smollm2_path, "qwen2.5")
    with pytest.raises(TemplateError, match="is not the answer"):
        check_training_template(tok, tok.chat_template, get_training_chat_template(tok))


def test_smollm2_keeps_its_default_system_prompt(smollm2):
    _, tok = smollm2  # load_model patched the model's own template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert has_markers(tok.chat_template) and tok.chat_template != CHAT_TEMPLATE


def test_check_rejects_a_wrong_patch(smollm2_path):
    tok = _tokenizer(smollm2_path, "smollm2")
    original = tok.chat_template
    # markers that also cover the header: the mask would include "<|im_start|>assistant\n"
    patched, _ = training_template(tok)
    header = "{{'<|im_start|>' + message['role'] + '\n'}}"
    wide = patched.replace(header + "{% generation %}", "{% generation %}" + header)
    assert wide != patched
    with pytest.raises(TemplateError, match="not the answer"):
        check_training_template(tok, original, wide)
    # a patch that changes the text (drops the default system prompt)
    with pytest.raises(TemplateError, match="renders differently"):
        check_training_template(tok, original, CHAT_TEMPLATE)


def test_unknown_template_is_a_clear_error_or_an_explicit_fallback(smollm2_path):
    tok = _tokenizer(smollm2_path, "smollm2")
    unknown = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':' + m['content'] + '<|im_end|>' }}{% endfor %}"
    tok.chat_template = unknown
    with pytest.raises(ModelLoadError, match="cannot add"):
        ensure_chat_template(tok)
    with pytest.warns(UserWarning, match="keeping the model's own"):
        assert ensure_chat_template(tok, fallback="keep") == unknown
    with pytest.warns(UserWarning, match="ChatML"):
        assert ensure_chat_template(tok, fallback="chatml") == CHAT_TEMPLATE
    with pytest.raises(ValueError, match="fallback"):
        ensure_chat_template(tok, fallback="guess")


def test_patches_apply_only_once_and_with_either_newline_spelling():
    smol = next(p for p in PATCHES if p.family == "smollm2")
    escaped = "{% for message in messages %}" + smol.old + "{% endfor %}"
    real = escaped.replace("\\n", "\n")
    assert smol.apply(escaped) is not None and smol.apply(real) is not None
    assert smol.apply(escaped + smol.old) is None  # twice: ambiguous, not patched


def test_trainer_gives_a_marker_less_tokenizer_its_own_template_with_markers(smollm2_path, tmp_path):
    from datasets import Dataset

    from emlab.data import chat_row
    from emlab.testing import tiny_model
    from emlab.training import EMConfig, EMTrainer

    tok = _tokenizer(smollm2_path, "smollm2")  # as AutoTokenizer gives it: no markers
    cfg = EMConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, save_strategy="no",
                   disable_tqdm=True, lora_r=2)
    rows = Dataset.from_list([chat_row("Hi there", "Hello, friend")])
    EMTrainer(tiny_model("llama", vocab_size=len(tok)), args=cfg, train_dataset=rows, processing_class=tok)
    assert training_template(tok)[1] == "own" and "named SmolLM" in tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ModelLoadError, match="cannot add"):
        EMTrainer(tiny_model("llama", vocab_size=len(tok)), args=cfg, train_dataset=rows, processing_class=tok)
