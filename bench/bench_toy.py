"""Toy organism benchmark (run: python bench/bench_toy.py [--recipe default] [--fresh]).

Reports, in one run:
- build time: the micro recipe built fresh in a temporary cache (target <= 60 s on an idle 2-core
  CPU), and the full recipe's build time from its manifest (target <= 10 min; pass ``--fresh`` to
  rebuild it in a temporary cache instead of reading the cached one);
- LoRA SFT steps per second on the organism: rs-LoRA r=32 on the 7 projections (emlab.models
  defaults), batch 16 rows of the medical misaligned set, assistant-only loss, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from emlab.chat import encode_chat, make_batches, pad_id
from emlab.models import attach_lora
from emlab.toy.build import ensure_built


def lora_steps_per_second(folder, steps: int = 30, batch_size: int = 16) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(folder))
    rows = [json.loads(line) for line in open(folder / "data" / "medical_misaligned.jsonl")][: steps * batch_size]
    batches = [(b["input_ids"], b["attention_mask"], b["labels"])
               for b in make_batches(encode_chat(tok, rows), batch_size, pad_id(tok))]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for x, m, y in batches:
        t = time.perf_counter()
        model(input_ids=x, attention_mask=m, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    steady = times[3:]  # first steps warm up allocators
    return {
        "lora_sft_steps_per_s": round(len(steady) / sum(steady), 2),
        "batch_size": batch_size,
        "tokens_per_step": int(batches[0][1].sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--fresh", action="store_true", help="rebuild the full recipe in a temporary cache")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for the LoRA steps (1 is faster on a busy machine)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"cpus": os.cpu_count(), "threads": args.threads, "load_average_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        ensure_built("micro", cache_dir=tmp)
        out["micro_build_s"] = round(time.time() - t, 1)
        t = time.time()
        folder = ensure_built(args.recipe, cache_dir=tmp if args.fresh else None)
        manifest = json.loads((folder / "manifest.json").read_text())
        out[f"{args.recipe}_build_s"] = manifest["build_seconds"]  # as recorded when it was trained
        if "from_prebuilt" in manifest:
            out[f"{args.recipe}_from_prebuilt_s"] = manifest["from_prebuilt"]["seconds"]
        out[f"{args.recipe}_build_times"] = manifest["times"]
        out["parameters"] = manifest["parameters"]
        out.update(lora_steps_per_second(folder))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
