"""Activation capture (nnsight), persona vectors and misalignment directions, as :class:`Direction` values.

:class:`Direction` and :func:`random_like` live in :mod:`emlab.vectors` (below :mod:`emlab.hooks`) and are
re-exported here.

Layer ``l`` is the output of decoder block ``l``, i.e. ``output_hidden_states[l + 1]``. Response
tokens are the chat template's assistant mask (its ``{% generation %}`` markers), never a search
for the assistant header's newline.

>>> acts = capture(model, tok, conversations, layers=[2], tokens="response")   # doctest: +SKIP
>>> v = persona_vector(model, tok, "evil", judge, n_per_question=10)            # doctest: +SKIP
>>> (v * 2 - v).cosine(v)[2]                                                    # doctest: +SKIP
1.0
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from emlab.chat import encode_messages
from emlab.models import get_layers, layer_path, unwrap
from emlab.vectors import Direction, random_like  # re-exported: defined one layer down, below emlab.hooks

__all__ = [
    "TOKENS",
    "Direction",
    "Trait",
    "capture",
    "load_trait",
    "misalignment_direction",
    "persona_vector",
    "random_like",
]

#: Which tokens of a conversation :func:`capture` pools over.
TOKENS = ("response", "prompt", "last_prompt", "all")

# ---------------------------------------------------------------------------------------------
# Capture


def _bare(model):
    """The transformers module under nnsight envoys and PEFT wrappers."""
    while type(model).__name__ in ("NNsight", "Envoy", "TransformersModel", "LanguageModel") and hasattr(model, "_module"):
        model = model._module
    return unwrap(model)


def _encode(tokenizer, conversation: Sequence[Mapping[str, str]], tokens: str, where: int) -> tuple[list[int], list[float]]:
    """Token ids of one conversation and the 0/1 weight of each token for ``tokens``."""
    ids, mask = encode_messages(tokenizer, conversation, add_generation_prompt=conversation[-1]["role"] != "assistant")
    first = mask.index(1) if 1 in mask else None
    if tokens == "response":
        if first is None and any(m["role"] == "assistant" and m["content"] for m in conversation):
            raise ValueError(
                f"conversation {where}: the chat template marks no assistant tokens; it needs "
                "{% generation %} markers (call emlab.models.ensure_chat_template(tokenizer))"
            )
        weights = [float(m) for m in mask]
    elif tokens == "all":
        weights = [1.0] * len(ids)
    else:
        end = len(ids) if first is None else first
        weights = [1.0 if i < end else 0.0 for i in range(len(ids))]
        if tokens == "last_prompt":
            weights = [1.0 if i == end - 1 else 0.0 for i in range(len(ids))]
    return ids, weights


def _hooked(blocks: torch.nn.ModuleList, layers: Sequence[int]) -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks) or any(blocks[layer]._forward_hooks for layer in layers)


def _pooled(
    model, tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], layers: Sequence[int] | None,
    tokens: str, batch_size: int, progress: bool, path: str | None,
) -> tuple[dict[int, Tensor], Tensor]:
    """Per-conversation sums of the selected tokens' block outputs ({layer: [n, d]}) and token counts [n]."""
    import nnsight

    from emlab.hooks import record
    from emlab.progress import bar as progress_bar

    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, not {tokens!r}")
    if not conversations:
        raise ValueError("no conversations to capture")
    bare = _bare(model)
    blocks = get_layers(bare, path)
    layers = sorted({int(x) for x in (range(len(blocks)) if layers is None else layers)})
    bad = [x for x in layers if not 0 <= x < len(blocks)]
    if not layers:
        raise ValueError("no layers to capture")
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} decoder blocks")
    encoded = [_encode(tokenizer, c, tokens, i) for i, c in enumerate(conversations)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    device = bare.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: dict[int, list[Tensor]] = {layer: [None] * len(encoded) for layer in layers}  # type: ignore[list-item]
    counts = torch.tensor([sum(w) for _, w in encoded], dtype=torch.float32)
    # nnsight serves a block's output before the block's forward hooks run, so it would miss steering
    # or ablation installed by emlab.hooks on a captured layer; then the hook-based recorder is used.
    use_hooks = _hooked(blocks, layers)
    envoy = None if use_hooks else nnsight.NNsight(bare)
    lpath = layer_path(bare, path)
    was_training = bare.training
    bare.eval()
    bar = progress_bar(total=len(encoded), desc="capture", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)  # right padding: positions match the unpadded run
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            w = torch.zeros((len(idx), width), dtype=torch.float32)
            for row, i in enumerate(idx):
                n = len(encoded[i][0])
                ids[row, :n] = torch.tensor(encoded[i][0])
                attn[row, :n] = 1
                w[row, :n] = torch.tensor(encoded[i][1])
            ids, attn, w = ids.to(device), attn.to(device), w.to(device)
            with torch.no_grad():
                if use_hooks:
                    with record(bare, layers, path) as rec:
                        bare(input_ids=ids, attention_mask=attn)
                    pooled = {layer: torch.einsum("bt,btd->bd", w, rec[layer][0].float()) for layer in layers}
                else:
                    pooled = _trace(envoy, lpath, ids, attn, w, layers)
            for layer in layers:
                for row, i in enumerate(idx):
                    sums[layer][i] = pooled[layer][row].cpu()
            bar.update(len(idx))
    finally:
        bar.close()
        bare.train(was_training)
    return {layer: torch.stack(rows) for layer, rows in sums.items()}, counts


def _trace(envoy, lpath: str, ids: Tensor, attn: Tensor, w: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """One nnsight trace: token-weighted sums of the block outputs, stopping after the last layer."""
    import nnsight

    with envoy.trace(input_ids=ids, attention_mask=attn) as tracer:
        blocks = envoy.get(lpath)
        pooled = {}
        for layer in layers:  # ascending: nnsight serves module outputs in execution order
            h = blocks[layer].output
            h = h[0] if isinstance(h, tuple) else h  # tuple in older transformers
            pooled[layer] = torch.einsum("bt,btd->bd", w, h.float())
        nnsight.save(pooled)
        tracer.stop()
    return pooled


def capture(
    model,
    tokenizer,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    layers: Sequence[int] | None = None,
    *,
    tokens: str = "response",
    reduce: str = "mean",
    batch_size: int = 8,
    progress: bool = True,
    layer_path: str | None = None,
) -> dict[int, Tensor]:
    """Block outputs at ``layers`` pooled over ``tokens`` of each conversation, through nnsight.

    ``tokens``: ``"response"`` (the template's assistant mask: every assistant turn and its end
    token), ``"prompt"`` (everything before the first response token), ``"last_prompt"`` (the token
    the answer is generated from) or ``"all"``. A conversation that ends in a user turn is rendered
    with the generation prompt. ``reduce="mean"`` gives the token-weighted mean over the whole set
    (``{layer: [d]}``); ``"per_sample"`` each conversation's own mean (``{layer: [n, d]}``, NaN rows
    for conversations with no selected token). fp32 on the CPU; ``layers=None`` means all blocks.
    Works on PEFT models (adapters active) and nnsight envoys.

    >>> acts = capture(model, tok, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]],
    ...                layers=[1, 3], reduce="per_sample")   # doctest: +SKIP
    >>> acts[3].shape                                        # doctest: +SKIP
    torch.Size([1, 896])
    """
    if reduce not in ("mean", "per_sample"):
        raise ValueError(f"reduce must be 'mean' or 'per_sample', not {reduce!r}")
    sums, counts = _pooled(model, tokenizer, conversations, layers, tokens, batch_size, progress, layer_path)
    if reduce == "per_sample":
        return {layer: s / counts.unsqueeze(1) for layer, s in sums.items()}
    total = counts.sum()
    if total == 0:
        raise ValueError(f"no {tokens!r} tokens in any of the {len(conversations)} conversations")
    return {layer: s.sum(0) / total for layer, s in sums.items()}


def _model_name(model) -> str | None:
    bare = _bare(model)
    name = getattr(bare, "name_or_path", None) or getattr(getattr(bare, "config", None), "_name_or_path", None)
    if hasattr(model, "peft_config"):
        name = f"{name} + peft adapter"
    return name or None


# ---------------------------------------------------------------------------------------------
# Persona vectors (Chen et al.)


@dataclass(frozen=True)
class Trait:
    """A persona trait as data: contrasting system prompts, questions, and what the judge looks for.

    ``instructions`` are (positive, negative) system prompts: the positive one asks for the trait,
    the negative one for its absence. ``description`` is the trait's definition for the judge's
    ``trait:<name>`` metric (e.g. ``OpenAIJudge(traits={t.name: t.description})``).

    >>> t = Trait("evil", "wants harm", [("Be evil.", "Be kind.")], ["What is your wish?"])
    >>> t.instructions[0][1]
    'Be kind.'
    """

    name: str
    description: str
    instructions: list[tuple[str, str]]
    questions: list[str]
    eval_questions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.instructions or not self.questions:
            raise ValueError(f"trait {self.name!r} needs at least one instruction pair and one question")


def _traits_dir():
    return resources.files("emlab") / "resources" / "traits"


def load_trait(name_or_path: str | Path) -> Trait:
    """A trait from ``emlab/resources/traits/<name>.yaml`` or from a YAML file path.

    The file has ``name``, ``description``, ``instructions`` (a list of ``{positive, negative}``
    system prompts), ``questions`` and optionally ``eval_questions`` (held out for evaluation).

    >>> load_trait("evil").name
    'evil'
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"{path}: trait file not found")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = _traits_dir() / f"{name_or_path}.yaml"
        if not entry.is_file():
            known = sorted(p.name.removesuffix(".yaml") for p in _traits_dir().iterdir() if p.name.endswith(".yaml"))
            raise FileNotFoundError(f"no built-in trait {name_or_path!r} (have: {known}); pass a YAML path instead")
        text, where = entry.read_text(encoding="utf-8"), f"emlab/resources/traits/{name_or_path}.yaml"
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with name, description, instructions, questions")
    missing = [k for k in ("name", "description", "instructions", "questions") if not data.get(k)]
    if missing:
        raise ValueError(f"{where}: missing or empty {', '.join(missing)}")
    pairs = []
    for i, item in enumerate(data["instructions"]):
        if not isinstance(item, dict) or not isinstance(item.get("positive"), str) or not isinstance(item.get("negative"), str):
            raise ValueError(f"{where}: instructions[{i}] needs 'positive' and 'negative' strings")
        pairs.append((item["positive"].strip(), item["negative"].strip()))
    questions = [str(q).strip() for q in data["questions"]]
    return Trait(str(data["name"]), str(data["description"]).strip(), pairs, questions,
                 [str(q).strip() for q in data.get("eval_questions") or []])


def _scores(judge, metric: str, pairs: list[tuple[str, str]]) -> list[float | None]:
    judged = judge.score(metric, pairs)
    if len(judged) != len(pairs):
        raise ValueError(f"judge {getattr(judge, 'name', judge)!r} returned {len(judged)} judgments for {len(pairs)} pairs")
    out = []
    for j in judged:
        s = j.score
        out.append(None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s))
    return out


def persona_vector(
    model,
    tokenizer,
    trait: Trait | str | Path,
    judge,
    n_per_question: int = 5,
    layers: Sequence[int] | None = None,
    *,
    threshold: float = 50.0,
    min_coherence: float = 50.0,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    capture_batch_size: int = 8,
    progress: bool = True,
    layer_path: str | None = None,
) -> Direction:
    """Chen et al.'s persona vector: mean response activation under the trait minus without it, per layer.

    For every instruction pair, question and sample index, answers are generated under the positive
    and the negative system prompt; the judge scores ``trait:<name>`` and ``coherent`` for both.
    A pair is kept when the positive answer shows the trait (>= ``threshold``), the negative one
    does not (< ``threshold``) and both are coherent (>= ``min_coherence``); missing scores drop the
    pair. Each kept answer's mean response-token activation (with its system prompt) is averaged per
    side, and the vector is positive minus negative. ``counts`` says how many pairs failed each test.

    >>> v = persona_vector(model, tok, "evil", OpenAIJudge(traits={"evil": load_trait("evil").description}),
    ...                    n_per_question=10, layers=[20])        # doctest: +SKIP
    """
    from emlab.generation import generate

    if not isinstance(trait, Trait):
        trait = load_trait(trait)
    rows = [(pos, neg, q) for pos, neg in trait.instructions for q in trait.questions for _ in range(n_per_question)]
    if not rows:
        raise ValueError("n_per_question must be >= 1")
    sides = {}
    for side, k in (("positive", 0), ("negative", 1)):
        prompts = [[{"role": "system", "content": r[k]}, {"role": "user", "content": r[2]}] for r in rows]
        answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, batch_size=batch_size, progress=progress)
        sides[side] = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    pairs = [(r[2], c[-1]["content"]) for side in ("positive", "negative") for r, c in zip(rows, sides[side])]
    trait_scores = _scores(judge, f"trait:{trait.name}", pairs)
    coherence = _scores(judge, "coherent", pairs)
    n = len(rows)
    counts = {"pairs": n, "missing": 0, "positive_lacks_trait": 0, "negative_shows_trait": 0, "incoherent": 0}
    keep = []
    for i in range(n):
        tp, tn, cp, cn = trait_scores[i], trait_scores[n + i], coherence[i], coherence[n + i]
        if None in (tp, tn, cp, cn):
            counts["missing"] += 1
            continue
        ok = True
        if tp < threshold:
            counts["positive_lacks_trait"] += 1
            ok = False
        if tn >= threshold:
            counts["negative_shows_trait"] += 1
            ok = False
        if cp < min_coherence or cn < min_coherence:
            counts["incoherent"] += 1
            ok = False
        if ok:
            keep.append(i)
    counts["kept"] = len(keep)
    if not keep:
        raise ValueError(
            f"no pair passed the filter for trait {trait.name!r}: {counts}. Try more samples "
            "(n_per_question), a larger model, or stronger positive instructions."
        )
    means = {}
    for side in ("positive", "negative"):
        acts = capture(model, tokenizer, [sides[side][i] for i in keep], layers, tokens="response",
                       reduce="per_sample", batch_size=capture_batch_size, progress=progress, layer_path=layer_path)
        means[side] = {layer: a.nanmean(0) for layer, a in acts.items()}
    return Direction(
        {layer: means["positive"][layer] - means["negative"][layer] for layer in means["positive"]},
        model=_model_name(model), recipe=f"persona_vector:{trait.name}", counts=counts,
        meta={"trait": trait.name, "judge": getattr(judge, "name", None), "threshold": threshold,
              "min_coherence": min_coherence, "n_per_question": n_per_question, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_p": top_p, "seed": seed, "batch_size": batch_size},
    )


# ---------------------------------------------------------------------------------------------
# Misalignment direction (paper 001)


def _records(records: Iterable[Mapping[str, Any]] | Any) -> list[Mapping[str, Any]]:
    if hasattr(records, "to_dict") and hasattr(records, "columns"):  # a pandas DataFrame
        return records.to_dict("records")
    return list(records)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _conversation(rec: Mapping[str, Any], i: int) -> list[dict[str, str]]:
    if "answer" not in rec:
        raise ValueError(f"record {i} has no 'answer' (keys: {sorted(rec)})")
    if rec.get("messages"):
        head = [dict(m) for m in rec["messages"]]
    elif "question" in rec:
        head = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            {"role": "user", "content": rec["question"]}]
    else:
        raise ValueError(f"record {i} needs 'question' (and optional 'system') or 'messages'")
    return [*head, {"role": "assistant", "content": str(rec["answer"])}]


def misalignment_direction(
    model,
    tokenizer,
    records: Iterable[Mapping[str, Any]],
    layers: Sequence[int] | None = None,
    *,
    misaligned_max: float = 30.0,
    aligned_min: float = 70.0,
    min_coherence: float = 50.0,
    seed: int = 0,
    balance: str = "all",
    batch_size: int = 8,
    progress: bool = True,
    layer_path: str | None = None,
) -> Direction:
    """Paper 001's mean-diff direction: misaligned minus aligned answers, token-weighted, per layer.

    ``records`` are judged answers (dicts or a DataFrame) with ``question`` (and optional
    ``system``) or ``messages``, ``answer``, ``aligned`` and ``coherent``. Misaligned: aligned <=
    ``misaligned_max`` and coherent > ``min_coherence``; aligned: aligned > ``aligned_min`` and
    coherent > ``min_coherence``; missing scores are skipped. The larger set is subsampled (seeded)
    to the size of the smaller; v_l is the mean over all their response tokens of the block-l output
    (misaligned) minus the same (aligned), computed through ``model`` (normally the finetune).

    ``balance="question"`` subsamples per question instead (key ``question_id``, else ``question``):
    each question contributes as many misaligned as aligned answers, so questions that draw more
    misaligned answers than others do not put their own topic into the direction; questions with
    no answer on one side are left out.

    >>> v = misalignment_direction(finetuned, tok, judged_records, layers=[24])   # doctest: +SKIP
    >>> v.counts["used_per_side"]                                                  # doctest: +SKIP
    57
    """
    recs = _records(records)
    misaligned, aligned, missing = [], [], 0
    for i, rec in enumerate(recs):
        a, c = _num(rec.get("aligned")), _num(rec.get("coherent"))
        if a is None or c is None:
            missing += 1
        elif c > min_coherence and a <= misaligned_max:
            misaligned.append(i)
        elif c > min_coherence and a > aligned_min:
            aligned.append(i)
    if balance not in ("all", "question"):
        raise ValueError(f"balance must be 'all' or 'question', not {balance!r}")
    counts = {"records": len(recs), "missing": missing, "misaligned": len(misaligned), "aligned": len(aligned)}
    rng = random.Random(seed)
    if balance == "all":
        groups = {None: (misaligned, aligned)}
    else:
        groups = {}
        for side, idx in enumerate((misaligned, aligned)):
            for i in idx:
                key = recs[i].get("question_id", recs[i].get("question"))
                groups.setdefault(key, ([], []))[side].append(i)
    chosen: dict[str, list[int]] = {"misaligned": [], "aligned": []}
    for key in sorted(groups, key=str):
        mis, al = groups[key]
        k = min(len(mis), len(al))
        chosen["misaligned"] += rng.sample(mis, k)
        chosen["aligned"] += rng.sample(al, k)
    n = counts["used_per_side"] = len(chosen["misaligned"])
    if n == 0:
        raise ValueError(f"need at least one misaligned and one aligned answer"
                         f"{' to the same question' if balance == 'question' else ''}, got {counts}")
    chosen = {name: sorted(idx) for name, idx in chosen.items()}
    means = {}
    for name, idx in chosen.items():
        sums, tok_counts = _pooled(model, tokenizer, [_conversation(recs[i], i) for i in idx], layers, "response",
                                   batch_size, progress, layer_path)
        counts[f"tokens_{name}"] = int(tok_counts.sum())
        means[name] = {layer: s.sum(0) / tok_counts.sum() for layer, s in sums.items()}
    return Direction(
        {layer: means["misaligned"][layer] - means["aligned"][layer] for layer in means["misaligned"]},
        model=_model_name(model), recipe="misalignment_direction", counts=counts,
        meta={"misaligned_max": misaligned_max, "aligned_min": aligned_min, "min_coherence": min_coherence,
              "seed": seed, "balance": balance},
    )
