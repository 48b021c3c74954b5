"""Train the toy organism: world -> tokenizer -> datasets -> pre-training -> post-training.

Training uses a plain torch loop (no Trainer): on a 2-core CPU with a 1M-parameter model the
Trainer's per-step overhead is a sizeable share of the step time.  Pre-training packs
persona-consistent chats and plain text into fixed-length sequences with loss on every token;
post-training uses aligned single-turn chats with loss on the assistant answer only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from emlab.toy.world import World, load_world_config, rng_for

__all__ = ["build", "encode_chat_rows", "lr_at", "pretrain_stream", "train_loop"]



def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """The build's learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine
    decay to ``min_ratio * lr``.

    >>> lr_at(0, 100, 1.0, 10, 0.1), lr_at(100, 100, 1.0, 10, 0.1)
    (0.1, 0.1)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain_stream(world: World, tok, n_tokens: int):
    """Token ids of the pre-training corpus: persona-consistent chats and plain text, each followed
    by ``<|endoftext|>``, generated until ``n_tokens`` are reached (single-threaded, deterministic)."""
    from emlab.toy.tokenizer import render_chat

    rng = rng_for(world.seed, "pretrain")
    eot = tok.pad_token_id
    ids: list[int] = []
    while len(ids) < n_tokens:
        texts = []
        for _ in range(256):
            if rng.random() < world.knobs["p_plain_text"]:
                texts.append(world.plain_document(rng))
            else:
                texts.append(render_chat(world.conversation(rng)))
        for seq in tok(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eot)
    return ids[:n_tokens]


def encode_chat_rows(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row with loss on the final assistant answer and its <|im_end|>."""
    from emlab.toy.tokenizer import render_chat

    out = []
    for r in rows:
        prompt = tok(render_chat(r["messages"][:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        answer = tok(r["messages"][-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def train_loop(model, batches, *, lr: float, warmup: int, min_ratio: float, desc: str, weight_decay: float = 0.01):
    """AdamW (betas 0.9/0.95, gradient norm clipped at 1) over ``batches`` of (ids, labels, mask) at the
    :func:`lr_at` schedule; returns the loss of every step (the model is left in eval mode)."""
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    losses = []
    total = len(batches)
    for step, (x, y, mask) in enumerate(tqdm(batches, desc=desc, mininterval=10)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr, warmup, min_ratio)
        out = model(input_ids=x, attention_mask=mask, labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def build(recipe: dict[str, Any], out: Path, world: str = "persona", digest: str | None = None) -> dict[str, Any]:
    """Build the organism of ``recipe`` (a dict from :func:`load_recipe`) into folder ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from emlab.toy.datasets import posttrain_rows, write_datasets
    from emlab.toy.tokenizer import build_tokenizer

    t0 = time.time()
    times: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(recipe["seed"])
    w = World(load_world_config(), seed=seed, variant=world, knobs=recipe.get("knobs") or {})

    tok = build_tokenizer(w)
    tok.save_pretrained(out)
    counts = write_datasets(w, out, recipe["datasets"])
    times["data_s"] = time.time() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(int(recipe.get("threads", 1)))
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        m = recipe["model"]
        config = Qwen2Config(
            vocab_size=len(tok), tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
            bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **m,
        )
        model = Qwen2ForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())

        # --- pre-training: packed sequences, loss on every token
        t1 = time.time()
        p = recipe["pretrain"]
        ids = torch.tensor(pretrain_stream(w, tok, int(p["tokens"])), dtype=torch.long)
        seq, bs = int(p["seq_len"]), int(p["batch_size"])
        n_seq = len(ids) // seq
        seqs = ids[: n_seq * seq].view(n_seq, seq)
        order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
        batches = [(seqs[order[i:i + bs]],) * 2 + (None,) for i in range(0, n_seq - bs + 1, bs)]
        times["pretrain_tokenize_s"] = time.time() - t1
        pre_losses = train_loop(model, batches, lr=float(p["lr"]), warmup=int(p["warmup_steps"]),
                                 min_ratio=float(p["min_lr_ratio"]), desc="toy pretrain")
        times["pretrain_s"] = time.time() - t1

        # --- post-training: aligned single-turn chats, loss on assistant tokens only
        t2 = time.time()
        pt = recipe["posttrain"]
        rows = posttrain_rows(w, int(pt["rows"]))
        with open(out / "data" / "posttrain.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        counts["posttrain.jsonl"] = len(rows)
        enc = encode_chat_rows(tok, rows)
        batches = []
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(int(pt["epochs"])):
            perm = torch.randperm(len(enc), generator=g).tolist()
            for i in range(0, len(perm), int(pt["batch_size"])):
                chunk = [enc[j] for j in perm[i:i + int(pt["batch_size"])]]
                L = max(len(x) for x, _ in chunk)
                x = torch.full((len(chunk), L), tok.pad_token_id)
                y = torch.full((len(chunk), L), -100)
                mask = torch.zeros((len(chunk), L), dtype=torch.long)
                for k, (xi, yi) in enumerate(chunk):  # right padding for training
                    x[k, : len(xi)] = torch.tensor(xi)
                    y[k, : len(yi)] = torch.tensor(yi)
                    mask[k, : len(xi)] = 1
                batches.append((x, y, mask))
        post_losses = train_loop(model, batches, lr=float(pt["lr"]), warmup=int(pt["warmup_steps"]),
                                  min_ratio=0.0, desc="toy post-train")
        times["posttrain_s"] = time.time() - t2

        model.generation_config = GenerationConfig(
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=config.bos_token_id,
            do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=64,
        )
        model.save_pretrained(out, safe_serialization=True)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)

    times["total_s"] = time.time() - t0
    manifest = {
        "recipe": recipe, "world": world, "hash": digest,
        "parameters": n_params, "vocab_size": len(tok),
        "pretrain_tokens": int(recipe["pretrain"]["tokens"]),
        "pretrain_loss_first_last": [_mean(pre_losses[:20]), _mean(pre_losses[-20:])],
        "posttrain_loss_first_last": [_mean(post_losses[:5]), _mean(post_losses[-5:])],
        "datasets": counts, "times": {k: round(v, 2) for k, v in times.items()},
        "build_seconds": round(times["total_s"], 2), "torch": torch.__version__,
    }
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


