"""CAFT step time over plain SFT, and the trait monitor's share of a finetune's time, on the toy organism.

    python bench/bench_beyond.py                       # the default toy organism (prebuilt)
    python bench/bench_beyond.py --model toy:micro --rows 256
    python bench/bench_beyond.py --json runs/bench_beyond.json

CAFT: plain SFT and CAFT (k=1 direction, and k=3 orthonormal directions: the PCA variant's default)
train the same rows from the same weights; each optimiser step is timed from ``on_step_begin``
(before CAFT installs its hooks) to ``on_step_end`` (after it removed them) in process CPU time
(one torch thread, so other jobs on a shared machine barely disturb it); the three trainers
alternate in rounds of ``--steps`` steps and the ratio is of the medians. Target: <= 1.10x.

Monitor: one full finetune of ``--rows`` rows with a :class:`TraitMonitor` at its default interval
(two directions, 16 neutral prompts); its own measured time over the finetune's wall time, and the
wall time against the same finetune without it. Target: <= 5%.

SAE: the toy SAE of study 06 (block n_layers // 2 of the chat model, 400 misaligned + 400 aligned +
400 benign rows, d_sae = 4 d, TopK k=16, 10 epochs) trained with SAELens on one thread; wall and
CPU seconds of the training alone, and its held-out FVE and L0. Target: <= 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emlab.directions import Direction  # noqa: E402
from emlab.models import get_layers, load_model  # noqa: E402
from emlab.studies.common import finetune_config  # noqa: E402
from emlab.training import EMTrainer, finetune  # noqa: E402
from emlab.training.caft import CAFT  # noqa: E402
from emlab.training.monitor import DEFAULT_EVERY, TraitMonitor  # noqa: E402


class StepTimer(TrainerCallback):
    """Process CPU seconds of each optimiser step (list it FIRST among the callbacks)."""

    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.process_time() - self._t)


def _rows(model_name: str, n: int) -> list[dict]:
    from emlab.data import load_chat_jsonl
    from emlab.toy import paths

    recipe = model_name.split(":", 1)[1] if ":" in model_name else "default"
    return load_chat_jsonl(paths(recipe)["medical_misaligned"])[:n]


def _random_dirs(d: int, layer: int, k: int) -> list[Direction]:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(0)))
    return [Direction({layer: q[:, j].contiguous()}) for j in range(k)]


def bench_caft(model_name: str, rows: list[dict], steps: int, rounds: int) -> dict:
    import copy

    from datasets import Dataset

    model, tok = load_model(model_name, device="cpu")
    n_layers = len(get_layers(model))
    d = model.config.hidden_size
    variants = {"sft": [], "caft_k1": _random_dirs(d, n_layers // 2, 1), "caft_k3": _random_dirs(d, n_layers // 2, 3)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _round in range(rounds):
            for name, dirs in variants.items():
                timer = StepTimer()
                callbacks = [timer] + ([CAFT(dirs)] if dirs else [])
                cfg = finetune_config(f"{tmp}/{name}", seed=0, max_steps=steps + 2, learning_rate=1e-4,
                                      logging_steps=1000)
                trainer = EMTrainer(copy.deepcopy(model), args=cfg, train_dataset=Dataset.from_list(rows),
                                    processing_class=tok, callbacks=callbacks)
                trainer.train()
                times[name] += timer.times[2:]  # two warm-up steps per round
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"median_step_cpu_s": med, "caft_k1_over_sft": med["caft_k1"] / med["sft"],
            "caft_k3_over_sft": med["caft_k3"] / med["sft"], "steps_per_variant": len(times["sft"])}


def bench_monitor(model_name: str, rows: list[dict]) -> dict:
    model, tok = load_model(model_name, device="cpu")
    n_layers = len(get_layers(model))
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    directions = {"a": Direction({n_layers // 2: torch.randn(d, generator=g)}),
                  "b": Direction({n_layers - 1: torch.randn(d, generator=g)})}
    from emlab.data import load_chat_jsonl
    from emlab.toy import paths

    recipe = model_name.split(":", 1)[1] if ":" in model_name else "default"
    prompts = []
    for row in load_chat_jsonl(paths(recipe)["benign"]):
        q = next(m["content"] for m in row["messages"] if m["role"] == "user")
        if q not in prompts:
            prompts.append(q)
        if len(prompts) == 16:
            break
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("plain", "monitored"):
            import copy

            mon = TraitMonitor(tok, directions, prompts) if name == "monitored" else None
            cfg = finetune_config(f"{tmp}/{name}", seed=0, learning_rate=1e-4, logging_steps=1000)
            start = time.perf_counter()
            res = finetune(copy.deepcopy(model), tok, rows, cfg, callbacks=[mon] if mon else None)
            out[f"{name}_wall_s"] = time.perf_counter() - start
            if mon is not None:
                out["monitor_s"] = mon.seconds
                out["measurements"] = len(mon.records) // 2
                out["steps"] = max(h.get("step", 0) for h in res.log_history)
    out["monitor_share_of_finetune"] = out["monitor_s"] / out["monitored_wall_s"]
    out["wall_ratio"] = out["monitored_wall_s"] / out["plain_wall_s"]
    out["every"] = DEFAULT_EVERY
    return out


def bench_sae(model_name: str) -> dict:
    from emlab.data import load_chat_jsonl
    from emlab.sae import collect_activations, sae_quality, train_sae
    from emlab.toy import paths

    model, tok = load_model(model_name, device="cpu")
    recipe = model_name.split(":", 1)[1] if ":" in model_name else "default"
    p = paths(recipe)
    items = [r for key in ("medical_misaligned", "medical_aligned", "benign") for r in load_chat_jsonl(p[key])[:400]]
    acts = collect_activations(model, tok, items, len(get_layers(model)) // 2)
    acts = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))]
    cut = int(0.9 * acts.shape[0])
    wall, cpu = time.perf_counter(), time.process_time()
    sae = train_sae(acts[:cut], d_sae=4 * acts.shape[1], k=16, epochs=10, lr=1e-3)
    out = {"train_wall_s": time.perf_counter() - wall, "train_cpu_s": time.process_time() - cpu, "tokens": cut}
    out.update(sae_quality(sae, acts[cut:]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy:default")
    p.add_argument("--rows", type=int, default=1000, help="finetuning rows (1000: study 02/06's toy size)")
    p.add_argument("--steps", type=int, default=8, help="timed CAFT steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="caft,monitor,sae", help="comma-separated subset of caft, monitor, sae")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = _rows(args.model, args.rows)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = parts - {"caft", "monitor", "sae"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from caft, monitor, sae")
    result: dict = {"model": args.model, "rows": len(rows)}
    if "caft" in parts:
        c = result["caft"] = bench_caft(args.model, rows, args.steps, args.rounds)
        print(f"CAFT step / SFT step (CPU time, median of {c['steps_per_variant']}): k=1 {c['caft_k1_over_sft']:.3f}x, "
              f"k=3 {c['caft_k3_over_sft']:.3f}x (target <= 1.10x)")
    if "monitor" in parts:
        m = result["monitor"] = bench_monitor(args.model, rows)
        print(f"trait monitor: {100 * m['monitor_share_of_finetune']:.2f}% of the finetune's wall time at "
              f"every={m['every']} ({m['measurements']} measurements over {m['steps']} steps; wall ratio "
              f"{m['wall_ratio']:.3f}) (target <= 5%)")
    if "sae" in parts:
        sae = result["sae"] = bench_sae(args.model)
        print(f"toy SAE training: {sae['train_wall_s']:.1f} s wall, {sae['train_cpu_s']:.1f} CPU-s on {sae['tokens']} "
              f"tokens; held-out FVE {sae['fve']:.3f}, L0 {sae['l0']:.1f} (target <= 300 s)")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
