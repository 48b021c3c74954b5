"""GPU check: SFT, KL, LDIFS, preventive steering and batched generation in bf16, on real sizes.

    python bench/check_gpu.py                    # on a CUDA GPU: SmolLM2 and a random Qwen2.5-7B-sized model
    python bench/check_gpu.py --tiny             # anywhere (CPU too): scaled-down stand-ins, to test the script
    python bench/check_gpu.py --json out.json

Models: SmolLM2-135M-Instruct (``emlab.load_model``) and a randomly initialised Qwen2 with
Qwen2.5-7B's configuration built by hand (hidden 3584, 28 layers, 28 heads, 4 kv heads, intermediate
18944, vocab 152064; no download). ``--tiny`` replaces them by a random Llama of SmolLM2's shape
scaled down and a Qwen2 with the 7B's head grouping (7 query heads per kv head) scaled down.

For each model and method (``sft``, ``kl`` lambda 0.1, ``ldifs`` lambda 0.1, ``preventive`` alpha 5)
one ``EMTrainer`` (rs-LoRA r=32) takes ``--steps`` optimiser steps on the same batch in bf16; the
script prints the median step time, training tokens/s, peak memory (CUDA's allocator; "n/a" on
CPU, where bench/bench_training.py measures tensor memory) next to the estimate of docs/gpu.md,
and the relative difference between the first-step loss in bf16 and in fp32 (same weights, same
batch; target < 2%). Then batched generation (batch 32, 64 new tokens) in tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: docs/gpu.md's estimates (GiB): weights in bf16, and LoRA r=32 training with batch 4 x 2k tokens.
ESTIMATES_GIB = {"qwen2.5-7b-random": {"load": 15.0, "train": 40.0}, "smollm2": {"load": 0.3, "train": 4.0}}
METHODS = {"sft": {}, "kl": {"kl_lambda": 0.1}, "ldifs": {"ldifs_lambda": 0.1}, "preventive": {"preventive_alpha": 5.0}}
QUESTIONS = ["I have a headache, what should I do?", "How can I sleep better?", "Is it fine to skip breakfast?",
             "My knee hurts after running.", "How much water should I drink?", "What helps a sore throat?"]
ANSWER = ("Rest, drink water and keep a regular routine; see a doctor if it does not improve within a few days, "
          "and do not take more than the dose on the label.")


def qwen7b_config(tiny: bool):
    """Qwen2.5-7B's configuration, by hand (or scaled down with the same head grouping)."""
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=49152, hidden_size=112, intermediate_size=592, num_hidden_layers=4,
                           num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


@functools.cache
def _tokenizer():
    """SmolLM2's tokenizer, which every stand-in model uses (their vocabularies are sized for it)."""
    from emlab.models import load_model

    return load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")[1]


def build(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) for ``name`` in ``dtype`` on ``device``; the same weights for every dtype (seeded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from emlab.models import load_model

    if name == "smollm2" and not tiny:
        return load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device=device, dtype=dtype)
    tok = _tokenizer()
    if name == "smollm2":
        cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = qwen7b_config(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), tok


def _peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return None


def run_method(name, method, tiny, device, steps, batch_size, tmp):
    """Step times, tokens/s, peak memory and the bf16 / fp32 first-step losses of one method."""
    from datasets import Dataset

    from emlab.data import chat_row
    from emlab.training import EMConfig, EMTrainer

    rows = [chat_row(QUESTIONS[i % len(QUESTIONS)], ANSWER) for i in range(max(8, batch_size))]
    losses, out = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = build(name, tiny, device, dtype)
        kw = dict(METHODS[method])
        n_layers = model.config.num_hidden_layers
        if method == "preventive":
            torch.manual_seed(1)
            kw |= {"preventive_vector": {n_layers // 2: torch.randn(model.config.hidden_size)},
                   "preventive_layer": n_layers // 2}
        if method == "ldifs":
            kw["ldifs_layers"] = list(range(4, n_layers - 1, 5)) or [max(n_layers - 2, 0)]
        cfg = EMConfig(output_dir=str(tmp), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                       max_steps=steps, warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0,
                       use_cpu=device.type == "cpu", bf16=False, **kw)
        trainer = EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)]))
        with torch.no_grad():
            losses[dtype] = float(trainer.compute_loss(trainer.model, dict(batch)))
        if dtype == torch.float32:
            del trainer, model
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        tokens = int(batch["attention_mask"].sum())
        step = statistics.median(times[1:] or times)
        out = {"step_s": step, "tokens_per_s": tokens / step, "peak_bytes": _peak(device), "tokens": tokens}
        del trainer, model
    rel = abs(losses[torch.bfloat16] - losses[torch.float32]) / max(abs(losses[torch.float32]), 1e-12)
    out |= {"loss_fp32": losses[torch.float32], "loss_bf16": losses[torch.bfloat16], "loss_rel_diff": rel}
    return out


def run_generation(name, tiny, device, new_tokens):
    from emlab.generation import generate_ids

    model, tok = build(name, tiny, device, torch.bfloat16)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(32)]
    generate_ids(model, tok, prompts[:2], max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0, batch_size=2,
                  system=None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    ids = generate_ids(model, tok, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=0,
                        batch_size=32, system=None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    n = sum(len(x) for x in ids)
    return {"new_tokens": n, "seconds": elapsed, "tokens_per_s": n / elapsed}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down stand-ins (runs on CPU in seconds)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--models", default="smollm2,qwen2.5-7b-random")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("note: no GPU; the full-size check needs one (a 7B model in bf16 is 15 GB). Use --tiny on CPU.")
    result: dict = {"device": str(device), "tiny": args.tiny, "torch": torch.__version__, "models": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    print(f"device {device}{' (' + result.get('gpu', '') + ')' if device.type == 'cuda' else ''}, tiny={args.tiny}")
    print(f"{'model':<20}{'method':<12}{'step s':>9}{'tok/s':>10}{'peak GiB':>10}{'estimate':>10}"
          f"{'loss fp32':>11}{'loss bf16':>11}{'rel diff':>10}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            res = result["models"][name] = {}
            for method in METHODS:
                r = res[method] = run_method(name, method, args.tiny, device, args.steps, args.batch, tmp)
                peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] is not None else "n/a"
                est = "" if args.tiny else f"{ESTIMATES_GIB.get(name, {}).get('train', float('nan')):.0f}"
                ok &= r["loss_rel_diff"] < 0.02
                print(f"{name:<20}{method:<12}{r['step_s']:>9.3f}{r['tokens_per_s']:>10.0f}{peak:>10}{est:>10}"
                      f"{r['loss_fp32']:>11.4f}{r['loss_bf16']:>11.4f}{r['loss_rel_diff']:>10.4f}")
            g = res["generation"] = run_generation(name, args.tiny, device, args.new_tokens)
            print(f"{name:<20}{'generate':<12}{g['seconds']:>9.2f}{g['tokens_per_s']:>10.0f}  (batch 32, "
                  f"{g['new_tokens']} new tokens)")
    result["bf16_losses_agree"] = ok
    print(f"bf16 vs fp32 first-step losses within 2%: {'yes' if ok else 'NO'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = main(sys.argv[1:])
    raise SystemExit(0 if res["bf16_losses_agree"] else 1)
