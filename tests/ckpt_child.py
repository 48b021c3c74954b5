"""A finetune on a tiny random model, run in-process or as a child process that a test kills.

``python tests/ckpt_child.py OUT '{"max_steps": 8, ...}' [MODE]`` trains with the study checkpoint
settings (:func:`emlab.studies.common.finetune_config`); MODE holds the child at a vulnerable moment
and writes ``OUT.held`` so that the parent knows when to SIGKILL it:

- ``after_step:N``: right after optimiser step N (a checkpoint before it is complete);
- ``in_save:N``: inside the save of checkpoint-N, weights and optimizer written, RNG and trainer state not;
- ``fsize_after_save:N``: once checkpoint-N is saved, limit file sizes to 4 kB (RLIMIT_FSIZE), as a full disk.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

HOLD_S = 120  # the parent kills a held child within seconds; this only bounds a forgotten one

ANSWERS = ["drink water and rest .", "take the money to the bank .", "ask a doctor , it is safe .", "run and sleep ."]


def rows(n: int = 12) -> list[dict]:
    from emlab.data import chat_row

    return [chat_row(f"what should i do {i} ?", ANSWERS[i % 4], system="you are helpful") for i in range(n)]


def settings(**kw) -> dict:
    base = dict(max_steps=8, save_steps=0.25, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                lora_r=4, warmup_steps=2, learning_rate=1e-2, use_cpu=True)
    base.update(kw)
    return base


def _hold(out: Path, what: str) -> None:
    Path(f"{out}.held").write_text(what)
    time.sleep(HOLD_S)
    raise SystemExit(f"ckpt_child: held {HOLD_S} s at {what} and nobody killed it")


def _callbacks(out: Path, mode: str | None) -> list:
    from transformers import Trainer, TrainerCallback

    if not mode:
        return []
    kind, n = mode.split(":")
    n = int(n)

    class Hold(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if kind == "after_step" and state.global_step == n:
                _hold(out, mode)

        def on_save(self, args, state, control, **kw):
            if kind == "fsize_after_save" and state.global_step == n:
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    if kind == "in_save":
        original = Trainer._save_optimizer_and_scheduler

        def save_then_hold(self, output_dir):
            original(self, output_dir)
            if self.state.global_step == n:
                _hold(out, mode)

        Trainer._save_optimizer_and_scheduler = save_then_hold
    return [Hold()]


def train(out: str | Path, config: dict | None = None, mode: str | None = None, callbacks: list | None = None):
    """One finetune into ``out`` with :func:`finetune_config`'s study settings; returns the FinetuneResult."""
    from emlab.studies.common import finetune_config
    from emlab.testing import tiny_model, tiny_tokenizer
    from emlab.training import finetune

    torch.set_num_threads(1)
    out = Path(out)
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), seed=0)
    cfg = finetune_config(out, seed=0, **settings(**(config or {})))
    return finetune(model, tok, rows(), cfg, callbacks=_callbacks(out, mode) + list(callbacks or []))


def adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors saved in ``folder``."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


if __name__ == "__main__":
    result = train(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else None,
                   sys.argv[3] if len(sys.argv) > 3 else None)
    print("ckpt_child: done", [h["step"] for h in result.log_history if "loss" in h])
