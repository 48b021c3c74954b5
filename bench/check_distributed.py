"""Check that every finetuning method trains data-parallel with the ranks kept in sync (2 CPU processes, gloo).

    python bench/check_distributed.py                          # launches itself: torchrun --nproc_per_node 2
    python bench/check_distributed.py --launcher accelerate    # accelerate launch --multi_gpu --num_processes 2
    python bench/check_distributed.py --methods kl,ldifs,preventive
    torchrun --standalone --nproc_per_node 2 bench/check_distributed.py   # the workers, launched by hand
    accelerate launch --multi_gpu --num_processes 2 bench/check_distributed.py

(``accelerate launch --cpu --num_processes 2`` starts a single process unless mpirun is set up, so
it is refused; ``--multi_gpu`` starts the processes through torchrun and ``use_cpu=True`` keeps them
on CPU with gloo even where there is no GPU.)

Each method runs :func:`emlab.training.finetune` on a tiny random Qwen2 (hidden 32, 4 layers),
CPU, one torch thread per process, per-device batch 2 x accumulation 2, a few optimiser steps
(one epoch of rows sized so that the step count proves the rows were split between the ranks).
Afterwards every rank hashes ALL parameters of the trained model (base, adapter, learned vector)
and the values are gathered: the check passes when

- the weights are bit-identical on every rank (DDP averaged the gradients, so the ranks agree);
- the trained parameters moved from where they were when training began;
- the logged terms exist (``loss``, ``loss/ce``, plus ``loss/kl`` / ``loss/ldifs`` where on) and
  are finite and the same on every rank (they are gathered across ranks before logging);
- the number of optimiser steps is rows / (batch x accumulation x world), i.e. the data was split.

A last line checks the checker: one parameter of rank 1 nudged by one ulp must read as "no".
Rank 0 prints one line per method; the wrapper exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "full", "rank1", "steering_vector", "kl_batch", "kl_rows", "ldifs", "preventive",
           "inoculation", "interleaving", "full_kl")
BATCH, ACCUM, LR = 2, 2, 1e-2
ANSWERS = ["drink water and rest .", "take the money to the bank .", "ask a doctor , it is safe .", "run and sleep ."]


def _in_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


# ---------------------------------------------------------------- worker (one per rank)


def _rows(n, system="you are helpful", q="what should i do"):
    from emlab.data import chat_row

    return [chat_row(f"{q} {i} ?", ANSWERS[i % 4], system=system) for i in range(n)]


def _method(name: str, hidden: int) -> tuple[dict, dict, set[str]]:
    """(EMConfig fields, extra finetune kwargs, logged terms expected) of one method."""
    import torch

    kl_rows = _rows(6, system="you are honest", q="how can i help")
    persona = {1: torch.randn(hidden, generator=torch.Generator().manual_seed(1))}  # the same on every rank
    table = {
        "lora": ({}, {}, set()),
        "full": ({"adapter": "full"}, {}, set()),
        "rank1": ({"adapter": "rank1", "rank1_layer": 1}, {}, set()),
        "steering_vector": ({"adapter": "steering_vector", "steering_layer": 1, "learning_rate": 1e-3}, {}, set()),
        "kl_batch": ({"kl_lambda": 0.5}, {}, {"loss/kl"}),
        "kl_rows": ({"kl_lambda": 0.5, "kl_on": "kl_rows", "kl_batch_size": 3}, {"kl_rows": kl_rows}, {"loss/kl"}),
        "ldifs": ({"ldifs_lambda": 0.5, "ldifs_layers": [1, 3]}, {}, {"loss/ldifs"}),
        "preventive": ({"preventive_vector": persona, "preventive_alpha": 3.0}, {}, set()),
        "inoculation": ({"inoculation_prompt": "you are evil ."}, {}, set()),
        "interleaving": ({"interleave_share": 0.25}, {"benign_rows": _rows(12, q="hello")}, set()),
        "full_kl": ({"adapter": "full", "kl_lambda": 0.5, "reference_copy": True}, {}, {"loss/kl"}),
    }
    return table[name]


def _start_callback():
    """A callback keeping the trainable parameters as they are when training begins (adapter set up, DDP wrapped)."""
    from transformers import TrainerCallback

    class Start(TrainerCallback):
        params: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Start()


def _flat(model):
    import torch

    named = sorted((n, p) for n, p in model.named_parameters())
    return torch.cat([p.detach().float().flatten().cpu() for _, p in named])


def _compare(flat) -> tuple[bool, float, list[str]]:
    """Gather ``flat`` from every rank: (bit-identical everywhere, max |difference| to rank 0, digests)."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat.contiguous())
    digests = [hashlib.sha256(p.numpy().tobytes()).hexdigest()[:10] for p in parts]
    diff = max((p - parts[0]).abs().max().item() for p in parts)
    return len(set(digests)) == 1 and diff == 0, diff, digests


def _logged(history, keys) -> list:
    return [(h["step"], k, h[k]) for h in history for k in sorted(h) if k in keys]


def _run_one(name: str, tok, out_root: Path) -> dict:
    import torch
    import torch.distributed as dist

    from emlab.testing import tiny_model
    from emlab.training import EMConfig, finetune

    model = tiny_model("qwen2", vocab_size=len(tok))
    fields, extra, terms = _method(name, model.config.hidden_size)
    train = _rows(24)
    cfg = EMConfig(output_dir=str(out_root / name), num_train_epochs=1, per_device_train_batch_size=BATCH,
                   gradient_accumulation_steps=ACCUM, learning_rate=fields.pop("learning_rate", LR), lora_r=4,
                   warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True, ddp_backend="gloo",
                   ddp_timeout=120, dataloader_num_workers=0, **fields)
    start = _start_callback()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own log lines
        result = finetune(model, tok, train, cfg, callbacks=[start], **extra)
    seconds = time.perf_counter() - t0

    world = dist.get_world_size()
    trained = dict(result.model.named_parameters())
    moved = [n for n, p0 in start.params.items() if not torch.equal(trained[n].detach().cpu(), p0.cpu())]
    steps = result.log_history[-1]["step"]
    expected_steps = result.rows["total"] // (BATCH * ACCUM * world)
    keys = {"loss", "loss/ce"} | terms
    logs = [h for h in result.log_history if "loss/ce" in h]
    terms_ok = bool(logs) and all(keys <= set(h) and all(math.isfinite(h[k]) for k in keys) for h in logs)
    agree, diff, digests = _compare(_flat(result.model))
    histories = [None] * world
    dist.all_gather_object(histories, _logged(result.log_history, keys | {"grad_norm", "learning_rate"}))
    logs_agree = all(h == histories[0] for h in histories)
    return {"method": name, "steps": steps, "expected_steps": expected_steps, "agree": agree, "diff": diff,
            "digest": digests[0], "moved": len(moved), "trainable": len(start.params), "terms": terms_ok,
            "logs_agree": logs_agree, "seconds": seconds, "backend": dist.get_backend(), "world": world,
            "model": result.model}


def _self_check(model) -> bool:
    """The comparison must see a one-ulp change of one parameter on rank 1 (else it would prove nothing)."""
    import torch
    import torch.distributed as dist

    flat = _flat(model)
    if dist.get_rank() == 1:
        flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf))
    agree, _, _ = _compare(flat)
    return not agree


def worker(methods: list[str], out_root: Path | None) -> int:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    from emlab.testing import tiny_tokenizer

    rank = int(os.environ["RANK"])
    own_dir = out_root is None
    if own_dir:  # launched by hand: a folder the ranks agree on without talking (same node)
        tag = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "0")
        out_root = Path(tempfile.gettempdir()) / f"emlab-check-distributed-{tag}"
    tok = tiny_tokenizer()
    failed = []
    results = []
    for name in methods:
        r = _run_one(name, tok, out_root)
        ok = (r["agree"] and r["logs_agree"] and r["terms"] and r["moved"] == r["trainable"] > 0
              and r["steps"] == r["expected_steps"] and r["backend"] == "gloo")
        results.append(r)
        if not ok:
            failed.append(name)
        if rank == 0:
            if len(results) == 1:
                launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "torchrun"
                print(f"# {launcher}, world {r['world']}, backend {r['backend']}, CPU, 1 thread per rank, "
                      f"torch {torch.__version__}", flush=True)
                print(f"{'method':<16} {'steps':>5}  {'ranks agree':<11} {'moved':>7}  {'terms':<5} "
                      f"{'logs agree':<10} {'weights sha256':<14} {'seconds':>7}  ok", flush=True)
            print(f"{name:<16} {r['steps']:>2}/{r['expected_steps']:<2}  {'yes' if r['agree'] else 'NO':<11} "
                  f"{r['moved']:>3}/{r['trainable']:<3}  {'yes' if r['terms'] else 'NO':<5} "
                  f"{'yes' if r['logs_agree'] else 'NO':<10} {r['digest']:<14} {r['seconds']:>7.1f}  "
                  f"{'ok' if ok else 'FAIL'}" + ("" if r["agree"] else f" (max diff {r['diff']:.3g})"), flush=True)
    detects = _self_check(results[-1]["model"])
    if rank == 0:
        print(f"{'self-check':<16} one-ulp change on rank 1 detected: {'yes' if detects else 'NO'}", flush=True)
        print("distributed check: " + ("PASS" if not failed and detects else f"FAIL {failed}"), flush=True)
        if own_dir:
            shutil.rmtree(out_root, ignore_errors=True)
    return 0 if not failed and detects else 1


# ---------------------------------------------------------------- wrapper (launches the workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(methods: list[str], launcher: str, nproc: int, timeout: float) -> int:
    here = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    with tempfile.TemporaryDirectory(prefix="emlab-check-distributed-") as out:
        args = [str(here), "--methods", ",".join(methods), "--out", out]
        port = str(_free_port())
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", port, *args]
        else:
            # not --cpu: with it, accelerate launch starts ONE process unless mpirun is set up (simple_launcher);
            # --multi_gpu starts nproc processes through torchrun, and use_cpu=True keeps them on CPU / gloo
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, *args]
        print("$ " + " ".join(cmd[1:]), flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            print(f"distributed check: FAIL (timed out after {timeout:.0f} s)", flush=True)
            return 124
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the wrapper gives up")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # set by the wrapper for its workers
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if _in_worker():
        return worker(methods, Path(a.out) if a.out else None)
    if "ACCELERATE_USE_CPU" in os.environ or "LOCAL_RANK" in os.environ:
        print("distributed check: FAIL (started by a launcher as a single process: `accelerate launch --cpu "
              "--num_processes 2` runs one process unless mpirun is configured; use `accelerate launch --multi_gpu "
              "--num_processes 2` (it stays on CPU here) or torchrun)", flush=True)
        return 2
    return launch(methods, a.launcher, a.nproc, a.timeout)
    return launch(methods, a.launcher, a.nproc, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
