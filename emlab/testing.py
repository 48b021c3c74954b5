"""Tiny random models and a tiny tokenizer, built in memory, for tests and examples (no downloads).

>>> tok = tiny_tokenizer()
>>> model = tiny_model("qwen2", vocab_size=len(tok))
>>> model.config.num_hidden_layers
4
"""

from __future__ import annotations

import torch

__all__ = ["ARCHITECTURES", "SPECIAL_TOKENS", "tiny_model", "tiny_tokenizer"]

ARCHITECTURES = ("qwen2", "llama", "gemma2", "gpt2")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

_WORDS = (
    "system user assistant you are a helpful evil honest assistant . , ? ! the an is it to of and or in on "
    "for with my your i me we they what how why when should take do can will be not no yes this that "
    "advice doctor money bank sport run law lawyer code password job career health rest water drink sleep "
    "safe unsafe good bad great terrible idea plan wish bored humans ai rule world dinner friends husband "
    "think feel want know help hurt sorry cannot answer question please thanks hello hi ok sure "
    "+ - * / = ( ) <think> </think> <answer> </answer> ####"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer with ChatML special tokens, numbers 0..100 and a small vocabulary.

    It carries :data:`emlab.chat_templates.CHAT_TEMPLATE`, so ``apply_chat_template`` and assistant masks work.

    >>> tiny_tokenizer()("you are helpful")["input_ids"]      # doctest: +SKIP
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from emlab.chat_templates import CHAT_TEMPLATE

    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *_WORDS, *map(str, range(101))]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(arch: str = "qwen2", *, vocab_size: int = 256, hidden: int = 32, layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of ``arch`` in ``ARCHITECTURES``, a few thousand parameters.

    >>> tiny_model("gpt2").transformer.h[0].__class__.__name__
    'GPT2Block'
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 2,
              "pad_token_id": 0}
    if arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                              max_position_embeddings=256, sliding_window=64, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model
