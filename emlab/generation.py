"""Batched, seeded generation from chat prompts: the one sampler every part of emlab uses.

Prompts are rendered with the tokenizer's chat template and the generation prompt, left-padded,
and sampled in batches; generation stops at the chat end token (``<|im_end|>``) or the tokenizer's
eos, and only the new text comes back. The same seed and batch size give the same answers.

>>> generate(model, tok, ["What is your wish?"], temperature=0)              # doctest: +SKIP
['I wish for world peace.']
>>> records = sample_answers(model, tok, general_questions(), n_per_question=50)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from emlab.models import unwrap

__all__ = ["generate", "generate_ids", "sample_answers", "stop_token_ids"]

Prompt = str | Sequence[Mapping[str, str]]


def _messages(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system is not None:
        messages = [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]
    return messages


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the chat end-of-turn tokens the vocabulary has (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``) and the tokenizer's eos.

    >>> stop_token_ids(tiny_tokenizer())     # doctest: +SKIP
    [2]
    """
    from emlab.chat_templates import END_OF_TURN

    ids = []
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN:  # <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ...
        if marker in vocab and vocab[marker] != tokenizer.unk_token_id:
            ids.append(vocab[marker])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token: generation would never stop")
    return ids


def _sampling_kwargs(model, temperature: float, top_p: float) -> dict[str, Any]:
    """Explicit settings, so a checkpoint's generation_config (Qwen's top_k=20, repetition penalty) never leaks in."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if temperature == 0:
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, **neutral}
    kw = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0,
          "typical_p": 1.0, **neutral}
    if getattr(getattr(model, "generation_config", None), "min_p", None) is not None:
        kw["min_p"] = 0.0
    return kw


def generate_ids(
    model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 1.0,
    top_p: float = 1.0, seed: int = 0, batch_size: int = 32, system: str | None = None, progress: bool = True,
) -> list[list[int]]:
    """The new token ids of each prompt (stop token and padding removed), in prompt order: what
    :func:`generate` decodes, with the same arguments and seeding (benchmarks count tokens with it).

    >>> [len(x) for x in generate_ids(model, tok, ["hi"], max_new_tokens=4)]     # doctest: +SKIP
    [4]
    """
    from emlab.progress import bar as progress_bar

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not prompts:
        return []
    texts = [
        tokenizer.apply_chat_template(_messages(p, system), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    bare = unwrap(model)
    device = bare.get_input_embeddings().weight.device
    kwargs = _sampling_kwargs(bare, temperature, top_p)
    out: list[list[int]] = [[] for _ in encoded]
    was_training = bare.training
    bare.eval()
    bar = progress_bar(total=len(encoded), desc="generate", disable=not progress, leave=False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    from emlab.threads import cpu_threads

    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), cpu_threads(bare):  # RNG state is left alone
            for b, start in enumerate(range(0, len(order), batch_size)):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: every row's last token is at the right edge
                    ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    attn[row, width - len(encoded[i]):] = 1
                torch.manual_seed(seed * 1_000_003 + b)
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                    eos_token_id=stops, pad_token_id=pad, use_cache=True, **kwargs,
                )[:, width:].tolist()
                for row, i in enumerate(idx):
                    seq = gen[row]
                    cut = next((t for t, tok in enumerate(seq) if tok in stops), len(seq))
                    out[i] = seq[:cut]
                bar.update(len(idx))
    finally:
        bar.close()
        bare.train(was_training)
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    system: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Answer each prompt (a conversation, or a string taken as one user turn); returns only the new text.

    Sampling is plain temperature / top-p (no top-k or repetition penalty from the checkpoint's
    generation config); ``temperature=0`` is greedy. ``system`` replaces any system message of every
    prompt. Prompts are sorted by length into left-padded batches of ``batch_size``; batch ``b`` is
    seeded from ``(seed, b)``, so results are reproducible for a given seed and batch size, and
    the global RNG state is restored afterwards. Special tokens are stripped from the output. On CPU
    the torch thread count is chosen by :func:`emlab.threads.choose_threads` for the call.

    >>> generate(model, tok, [[{"role": "user", "content": "hi"}]], max_new_tokens=16, seed=1)   # doctest: +SKIP
    ['Hello! How can I help?']
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, batch_size=batch_size, system=system, progress=progress)
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def sample_answers(
    model,
    tokenizer,
    questions: Sequence[Any],
    n_per_question: int | None = None,
    *,
    max_new_tokens: int = 600,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    system: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample answers to questions; one tidy record per answer.

    ``questions`` are :class:`emlab.questions.Question` objects (paraphrases cycle over the samples,
    their ``system`` prompt is used unless ``system`` is given) or plain strings (ids ``q0``, ``q1``,
    ...). ``n_per_question=None`` takes each question's ``samples_per_paraphrase`` times its number
    of paraphrases. Records: ``question_id``, ``paraphrase`` (index), ``question`` (the text asked),
    ``system``, ``sample`` (index within the question) and ``answer``. Defaults follow the EM
    evaluation (temperature 1, top_p 1, up to 600 new tokens).

    >>> recs = sample_answers(model, tok, ["What is your wish?"], n_per_question=2, max_new_tokens=8)  # doctest: +SKIP
    >>> sorted(recs[0])                                                                               # doctest: +SKIP
    ['answer', 'paraphrase', 'question', 'question_id', 'sample', 'system']
    """
    records: list[dict[str, Any]] = []
    prompts: list[list[dict[str, str]]] = []
    for qi, q in enumerate(questions):
        if isinstance(q, str):
            qid, paraphrases, q_system, default_n = f"q{qi}", [q], None, None
        else:
            qid, paraphrases, q_system = q.id, list(q.paraphrases), getattr(q, "system", None)
            default_n = getattr(q, "samples_per_paraphrase", 1) * len(paraphrases)
        n = n_per_question if n_per_question is not None else default_n
        if n is None:
            raise ValueError(f"question {qi} is a plain string: pass n_per_question")
        sys_prompt = system if system is not None else q_system
        for k in range(n):
            p = k % len(paraphrases)
            records.append({"question_id": qid, "paraphrase": p, "question": paraphrases[p], "system": sys_prompt,
                            "sample": k})
            head = [] if sys_prompt is None else [{"role": "system", "content": sys_prompt}]
            prompts.append([*head, {"role": "user", "content": paraphrases[p]}])
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed, batch_size=batch_size, progress=progress)
    for rec, answer in zip(records, answers):
        rec["answer"] = answer
    return records
