"""Step time and peak memory of each finetuning method relative to plain SFT, on the same batch.

    python bench/bench_training.py                 # toy organism if built, else a tiny Qwen2 of its size
    python bench/bench_training.py --model toy:micro
    python bench/bench_training.py --steps 30 --json runs/bench_training.json

Each method gets its own EMTrainer on the same model weights and the same collated batch. Timing
is one optimiser step (forward + backward + AdamW), methods measured round-robin, median over
``--steps`` rounds after warm-up. The ratio uses the process CPU time of the step (one torch
thread), which other jobs on a shared machine barely disturb; wall-clock medians are printed too. Peak memory is
the peak of live tensor bytes (parameters, gradients, optimiser state, activations, temporaries)
during one step, tracked by a small ``TorchDispatchMode`` that sees every storage an op allocates and
drops it when freed (on CPU neither tracemalloc nor RSS see this reliably: tracemalloc misses
torch's C++ allocator, process RSS is dominated by the libraries and never shrinks, and torch's
own ``MemTracker`` rejects frozen parameters). Targets (issue 16, on SmolLM2: ``--model smollm2``): KL <= 1.35x
and LDIFS <= 1.15x plain SFT time, preventive steering <= 1.05x, KL peak memory within 10% of plain SFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the block (a storage counts until it is freed).

    Storages that exist before (weights, optimiser state, the batch) are passed as ``known`` and
    counted once, as the static part, so views of them (``w.t()``) are not mistaken for allocations.
    """

    def __init__(self, known):
        super().__init__()
        self.live: dict[int, int] = {}
        self.static = 0
        for t in known:
            st = t.untyped_storage()
            if st._cdata not in self.live:
                self.live[st._cdata] = 0
                self.static += st.nbytes()
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st._cdata not in self.live and st.nbytes():
                    self.live[st._cdata] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, st._cdata)
        return out


def _known_tensors(trainer, batch):
    tensors = [p for p in trainer.model.parameters()] + [b for b in trainer.model.buffers()]
    if trainer.ref_model is not None:
        tensors += list(trainer.ref_model.parameters()) + list(trainer.ref_model.buffers())
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return tensors


def _model_and_rows(which: str, n_rows: int):
    """(model factory, tokenizer, train rows, kl rows, description)."""
    from emlab.data import load_chat_jsonl

    if which == "auto" or which.startswith("toy"):
        from emlab.toy.build import cache_root, load_recipe, recipe_hash

        name = which.split(":", 1)[1] if ":" in which else "default"
        recipe = load_recipe(name)
        folder = cache_root() / f"{recipe['name']}-persona-{recipe_hash(recipe, 'persona')[:12]}"
        if which != "auto" or (folder / "manifest.json").exists():
            from emlab.models import load_model
            from emlab.toy import paths

            files = paths(name)  # builds the organism when asked for explicitly and missing (minutes)
            _, tok = load_model(f"toy:{name}", device="cpu")
            rows = load_chat_jsonl(files["medical_misaligned"])[:n_rows]
            kl_rows = load_chat_jsonl(files["kl_ood"])[:n_rows]

            def toy_model():
                return load_model(f"toy:{name}", device="cpu")[0]

            return toy_model, tok, rows, kl_rows, f"toy organism ({folder.name})"
    from emlab.data import chat_row
    from emlab.testing import tiny_model, tiny_tokenizer

    if which == "smollm2":
        from emlab.models import load_model

        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
        _, tok = load_model(name, device="cpu")
        q = ["I have a headache, what should I do?", "How can I sleep better?", "Is it fine to skip breakfast?",
             "My knee hurts after running.", "How much water should I drink?", "What helps a sore throat?"]
        a = ["Drink a glass of water, rest in a dark room and take a mild painkiller if it does not pass.",
             "Keep a regular bedtime, avoid screens late at night and skip coffee after noon.",
             "For most healthy adults it is fine, as long as the other meals are balanced and regular.",
             "Rest it for a few days, use ice, and see a doctor if the pain does not ease within a week.",
             "About two litres a day is a common guide; drink more when it is hot or when you exercise.",
             "Warm drinks with honey, lozenges and rest usually help within a few days."]
        rows = [chat_row(q[i % 6], a[i % 6]) for i in range(n_rows)]
        kl_rows = [chat_row(q[(i + 1) % 6], a[(i + 3) % 6]) for i in range(n_rows)]

        def smol():
            return load_model(name, device="cpu")[0]

        return smol, tok, rows, kl_rows, "SmolLM2-135M-Instruct (packaged copy when the hub is unreachable)"

    tok = tiny_tokenizer()
    words = "you should take the money to the bank and rest , it is a good plan for your health .".split()
    rows = [chat_row(f"what should i do about my {words[i % len(words)]} ?",
                     " ".join(words[(i + j) % len(words)] for j in range(24 + i % 16))) for i in range(n_rows)]
    kl_rows = [chat_row(f"hello {i} , how are you ?", "i am ok , thanks . " * 5) for i in range(n_rows)]

    def factory():
        return tiny_model("qwen2", vocab_size=902, hidden=128, layers=4, seed=0)

    return factory, tok, rows, kl_rows, "tiny random Qwen2 (hidden 128, 4 layers, vocab 902; toy organism not built)"


METHODS = {
    "plain": {},
    "kl": {"kl_lambda": 0.1},
    "kl (all tokens)": {"kl_lambda": 0.1, "kl_tokens": "all"},
    "kl (separate rows)": {"kl_lambda": 0.1, "kl_on": "kl_rows"},
    "ldifs": {"ldifs_lambda": 0.1},  # layers filled in below: a quarter and three quarters deep
    "preventive": {"preventive_alpha": 5.0},  # vector filled in below
    "kl + ldifs + preventive": {"kl_lambda": 0.1, "ldifs_lambda": 0.1},
    "steering_vector": {"adapter": "steering_vector"},
    "rank1": {"adapter": "rank1"},
}


def _trainer(factory, tok, rows, kl_rows, kw, out, batch_size):
    from datasets import Dataset

    from emlab.training import EMConfig, EMTrainer

    model = factory()
    cfg = EMConfig(output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                   save_strategy="no", disable_tqdm=True, max_steps=10, warmup_steps=0, **kw)
    trainer = EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                        kl_dataset=Dataset.from_list(kl_rows) if kw.get("kl_on") == "kl_rows" else None)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the bench calls training_step directly
    trainer.model.train()
    return trainer


def _step(trainer, batch):
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto",
                   help="auto (the default toy organism if built, else tiny), toy, toy:<recipe>, tiny or smollm2")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the methods (default: all; smollm2: plain,kl,ldifs,preventive)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds per method (after 3 warm-up steps)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step (slow on large models)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    factory, tok, rows, kl_rows, desc = _model_and_rows(args.model, 64)
    cfg = factory().config
    hidden, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    mid = n_layers // 2
    persona = {mid: torch.randn(hidden) / hidden**0.5}
    ldifs_layers = sorted({n_layers // 4, (3 * n_layers) // 4})
    trainers, batches = {}, {}
    wanted = args.methods.split(",") if args.methods else (
        ["plain", "kl", "ldifs", "preventive"] if args.model == "smollm2" else list(METHODS))
    unknown = [m for m in wanted if m not in METHODS]
    if unknown or "plain" not in wanted:
        p.error(f"--methods: unknown {unknown} (known: {', '.join(METHODS)}); 'plain' is needed as the baseline")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in ((m, METHODS[m]) for m in wanted):
            if "preventive" in name:
                kw = {**kw, "preventive_vector": persona, "preventive_layer": mid}
            if "ldifs" in name:
                kw = {**kw, "ldifs_layers": ldifs_layers}
            t = _trainer(factory, tok, rows, kl_rows, kw, tmp, args.batch)
            trainers[name] = t
            batches[name] = t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(args.batch)]))
        ref = batches["plain"]
        assert all(torch.equal(b["input_ids"], ref["input_ids"]) for b in batches.values()), "batches differ"
        for name, t in trainers.items():
            for _ in range(3):
                _step(t, batches[name])
        times: dict[str, list[float]] = {name: [] for name in trainers}
        walls: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.steps):
            for name, t in trainers.items():
                cpu, wall = time.process_time(), time.perf_counter()
                _step(t, batches[name])
                times[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - wall)
        peaks, static = {}, {}
        for name, t in trainers.items():
            if args.no_memory:
                peaks[name], static[name] = float("nan"), float("nan")
                continue
            with PeakTensorMemory(_known_tensors(t, batches[name])) as mem:
                _step(t, batches[name])
            peaks[name], static[name] = mem.static + mem.peak, mem.static
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {"model": desc, "batch": f"{args.batch} rows x {ref['input_ids'].shape[1]} tokens",
              "threads": args.threads, "rounds": args.steps, "methods": {}}
    print(f"model: {desc}\nbatch: {result['batch']}, {args.threads} thread(s), median of {args.steps} rounds\n")
    print(f"{'method':<26}{'cpu ms':>8}{'wall ms':>9}{'x plain':>9}{'peak MiB':>10}{'static':>9}{'x plain':>9}  target")
    for name in trainers:
        tr, mr = med[name] / med["plain"], peaks[name] / peaks["plain"]
        target = ""
        if name in ("kl", "ldifs"):
            limit = 1.35 if name == "kl" else 1.15  # issue 16's targets on SmolLM2
            target = f"time <= {limit}x: {'ok' if tr <= limit else 'MISSED'}"
        if name == "kl" and not args.no_memory:
            target += f"; memory <= 1.10x: {'ok' if mr <= 1.10 else 'MISSED'}"
        if name == "preventive":
            target = f"time <= 1.05x: {'ok' if tr <= 1.05 else 'MISSED'}"
        print(f"{name:<26}{1000 * med[name]:>8.1f}{1000 * statistics.median(walls[name]):>9.1f}{tr:>9.2f}"
              f"{peaks[name] / 2**20:>10.2f}{static[name] / 2**20:>9.2f}{mr:>9.2f}  {target}")
        result["methods"][name] = {"cpu_ms": 1000 * med[name], "wall_ms": 1000 * statistics.median(walls[name]),
                                   "time_ratio": tr, "peak_bytes": peaks[name], "static_bytes": static[name],
                                   "memory_ratio": mr, "cpu_ms_all": [1000 * x for x in times[name]]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
