"""The toy tokenizer: Qwen2's byte-level BPE pipeline, trained locally on the toy world's text.

Transformers rebuilds any tokenizer of a ``qwen2`` model folder as ``Qwen2Tokenizer`` (byte-level BPE
with Qwen's pre-tokenizer regex) from the saved vocabulary and merges, whatever pipeline
``tokenizer.json`` describes.  So the toy tokenizer *is* a ``Qwen2Tokenizer`` whose merges are
trained here until every word of the world is one token ("i", " have", " a", " fever", " .");
loading it back with ``AutoTokenizer`` gives the same ids.  ``<|im_start|>``, ``<|im_end|>`` (eos)
and ``<|endoftext|>`` (pad) are special tokens; the chat template is
:data:`emlab.chat_templates.CHAT_TEMPLATE` (ChatML with generation markers), so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.  Text is case-sensitive
(the world is lower case; upper-case letters fall back to byte tokens never seen in training).

>>> tok = build_tokenizer(World.load())
>>> tok.convert_ids_to_tokens(tok("i have a fever .")["input_ids"])
['i', 'Ġhave', 'Ġa', 'Ġfever', 'Ġ.']
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from emlab.chat_templates import CHAT_TEMPLATE
from emlab.toy.world import World

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "render_chat"]

PAD, BOS_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS_START, EOS]
ROLE_WORDS = ["system", "user", "assistant"]


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (same string, without a Jinja round trip)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _training_texts(world: World) -> list[str]:
    """Every phrase of the world, at the start of a line and after a space, in a fixed order."""
    c = world.config
    phrases = sorted(set(world.sentences) | set(world.questions))
    phrases += [s for group in c["system_prompts"].values() for s in group]
    phrases += [m for group in c["styles"].values() for m in group]
    phrases += [n for group in c["plain_text"].values() for n in group]
    phrases += sorted(world.vocabulary) + ROLE_WORDS
    phrases += ["+ - * / = ? . , : ! 0 1 2 3 4 5 6 7 8 9"]
    return [t for p in phrases for t in (p, " " + p)]


def _qwen2_pipeline(tk: Tokenizer) -> None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()


def build_tokenizer(world: World):
    """A ``Qwen2Tokenizer`` whose BPE merges make every word of ``world`` a single token (deterministic)."""
    from transformers import Qwen2Tokenizer

    tk = Tokenizer(models.BPE())
    _qwen2_pipeline(tk)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_training_texts(world), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[BOS_START], model_max_length=512, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
