"""GRPO (trl ``GRPOTrainer``) with the emlab interventions of the defences paper's RL variant.

- preventive steering with a persona vector during rollouts AND updates (never in evaluation);
- KL to the model without the adapter: trl's ``beta`` (with a LoRA, trl disables the adapter for
  the reference, so no second copy);
- interleaving: every ``sft_every``-th optimiser step is an SFT step on benign chat rows instead of
  an RL step;
- inoculation prompting: the instruction is put in front of every prompt's system prompt (GSM8K's
  system prompt carries the answer format the rewards check, so it is kept, not replaced).

Defaults follow the paper (GSM8K, Qwen2.5-3B): lr 5e-6, 4 generations per prompt, temperature
0.9, top_p 0.9, beta 0; rewards :data:`emlab.tasks.gsm8k.REWARD_FUNCS`.

>>> cfg = EMGRPOConfig(output_dir="runs/grpo", preventive_vector="persona.safetensors", preventive_layer=20)
>>> result = grpo_finetune(model, tok, gsm8k.to_grpo_rows(rows), cfg)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from emlab.chat import encode_chat, pad_batch
from emlab.models import get_layers, lora_config, peft_wrapping, unwrap
from emlab.runs import atomic_write_json, package_versions
from emlab.training.adapters import load_vectors
from emlab.training.config import hardware_defaults, summarize_objects
from emlab.training.losses import next_token_mask, sft_loss
from emlab.training.progress import quiet_dataset_bars, swap_progress
from emlab.training.runner import TRAINING_PACKAGES, FinetuneResult, messages_only, resume_checkpoint
from emlab.training.trainer import draw_indices, restore_forward

__all__ = ["EMGRPOConfig", "EMGRPOTrainer", "grpo_finetune"]

Row = dict[str, Any]


@dataclass
class EMGRPOConfig(GRPOConfig):
    """trl's ``GRPOConfig`` with the paper's defaults and the emlab interventions (see docs/training.md).

    >>> EMGRPOConfig(output_dir="x").num_generations, EMGRPOConfig(output_dir="x").temperature
    (4, 0.9)
    """

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate (paper: 5e-6)."})
    num_generations: int | None = field(default=4, metadata={"help": "Completions sampled per prompt."})
    temperature: float = field(default=0.9, metadata={"help": "Rollout sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "Rollout nucleus sampling threshold."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the prompts."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Completions per device per micro-batch."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=100, metadata={"help": "Save a resumable checkpoint every N steps."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias."})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "Recompute activations."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16; unset: on when CUDA supports it."})
    use_cpu: bool | None = field(default=None, metadata={"help": "Train on CPU; unset: when CUDA is unavailable."})
    optim: str | None = field(default=None, metadata={"help": "Optimiser; unset: adamw_8bit on CUDA + bnb."})
    report_to: Any = field(default="none", metadata={"help": "Integrations to log to."})
    print_logs: bool = field(default=False, metadata={"help": "Print each log entry; off: one progress bar."})

    adapter: str = field(default="lora", metadata={"help": "'lora' (rs-LoRA) or 'full'.",
                                                   "choices": ["lora", "full"]})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (rs-LoRA scale alpha/sqrt(r))."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_targets: list[str] | None = field(default=None, metadata={"help": "LoRA target modules; unset: seven."})
    rslora: bool = field(default=True, metadata={"help": "Rank-stabilised LoRA scaling."})
    preventive_vector: str | dict | None = field(
        default=None, metadata={"help": "Persona vector added during rollouts and updates (file or dict)."}
    )
    preventive_layer: int | None = field(default=None, metadata={"help": "Use only this layer of the vector."})
    preventive_alpha: float = field(default=5.0, metadata={"help": "Multiplier of the persona vector."})
    inoculation_prompt: str | None = field(
        default=None, metadata={"help": "Instruction put in front of every prompt's system prompt."}
    )
    sft_every: int = field(
        default=0, metadata={"help": "Every N-th optimiser step is an SFT step on sft_rows (0 = never)."}
    )
    sft_batch_size: int | None = field(
        default=None, metadata={"help": "SFT rows per micro-batch; unset: per_device_train_batch_size."}
    )

    def __post_init__(self):
        if self.adapter not in ("lora", "full"):
            raise ValueError(f"EMGRPOConfig.adapter must be 'lora' or 'full', got {self.adapter!r}")
        for name in ("preventive_alpha", "sft_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"EMGRPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1 or self.lora_r < 1:
            raise ValueError("EMGRPOConfig needs lora_r >= 1 and lora_dropout in [0, 1)")
        if self.preventive_vector is not None and self.use_vllm:
            raise ValueError("preventive steering acts through forward hooks, which vLLM rollouts do not run: "
                             "set use_vllm=False")
        hardware_defaults(self)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """Serialisable fields (a tensor-valued ``preventive_vector`` is summarised).

        >>> EMGRPOConfig(output_dir="x", preventive_vector={3: torch.zeros(4)}).to_dict()["preventive_vector"]
        {'3': '<tensor (4,)>'}
        """
        return summarize_objects(super().to_dict())


def _inoculate(rows: Sequence[Row], prompt: str | None) -> list[Row]:
    if prompt is None:
        return [dict(r) for r in rows]
    out = []
    for i, row in enumerate(rows):
        msgs = row.get("prompt")
        if not isinstance(msgs, list):
            raise ValueError(f"prompt row {i}: inoculation needs conversational prompts (a list of messages)")
        msgs = [dict(m) for m in msgs]
        if msgs and msgs[0].get("role") == "system":
            msgs[0]["content"] = f"{prompt}\n\n{msgs[0]['content']}"
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
        out.append({**row, "prompt": msgs})
    return out


class EMGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with preventive steering (rollouts + updates) and SFT steps interleaved with RL steps.

    >>> trainer = EMGRPOTrainer(model, REWARD_FUNCS, args=cfg, train_dataset=ds, processing_class=tok)  # doctest: +SKIP
    """

    def __init__(self, model, reward_funcs, args: EMGRPOConfig, train_dataset=None, *, processing_class=None,
                 sft_rows: Sequence[Row] | None = None, callbacks=None, **kwargs: Any):
        if not isinstance(args, EMGRPOConfig):
            raise TypeError(f"EMGRPOTrainer needs an EMGRPOConfig, got {type(args).__name__}")
        if bool(args.sft_every) != bool(sft_rows):
            raise ValueError("interleaved SFT needs both sft_every > 0 and sft_rows (benign chat rows).")
        peft_config = None
        if args.adapter == "lora" and not hasattr(model, "peft_config"):
            peft_config = lora_config(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                      targets=tuple(args.lora_targets) if args.lora_targets else None,
                                      rslora=args.rslora)
        self._forward_before = unwrap(model).__dict__.get("forward")  # put back after trl's patch (restore_forward)
        with peft_wrapping(), quiet_dataset_bars():
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             processing_class=processing_class, callbacks=callbacks, peft_config=peft_config,
                             **kwargs)
        swap_progress(self, print_logs=args.print_logs)
        self._preventive = None
        if args.preventive_vector is not None:
            self._preventive = load_vectors(args.preventive_vector, args.preventive_layer)
            n = len(get_layers(self.model))
            if any(not 0 <= layer < n for layer in self._preventive):
                raise ValueError(f"preventive_vector layers {sorted(self._preventive)} outside the model's {n} blocks")
        self._sft = encode_chat(self.processing_class, messages_only(sft_rows, "sft")) if sft_rows else []
        self._sft_perms: dict[int, list[int]] = {}
        self._sft_step, self._sft_micro = -1, 0

    def _steering(self):
        if self._preventive is None:
            return nullcontext()
        from emlab.hooks import steer

        return steer(self.accelerator.unwrap_model(self.model), self._preventive, alpha=self.args.preventive_alpha)

    def _is_sft_step(self) -> bool:
        every = self.args.sft_every
        return bool(every) and self.state.global_step % every == every - 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._is_sft_step():
            return self._sft_training_step(model)
        with self._steering():  # covers the rollouts (generated inside _prepare_inputs) and the update
            return super().training_step(model, inputs, num_items_in_batch)

    def _sft_training_step(self, model) -> torch.Tensor:
        """One micro-batch of next-token loss on the benign rows (the batch of prompts is skipped)."""
        args = self.args
        step = self.state.global_step
        if step != self._sft_step:
            self._sft_step, self._sft_micro = step, 0
        draw = (step // args.sft_every) * self.current_gradient_accumulation_steps + self._sft_micro
        self._sft_micro += 1
        idx = draw_indices(draw, len(self._sft), args.sft_batch_size or args.per_device_train_batch_size,
                           seed=args.seed, rank=self.accelerator.process_index,
                           world=self.accelerator.num_processes, cache=self._sft_perms)
        batch = pad_batch([self._sft[i] for i in idx], self.processing_class.pad_token_id, self.accelerator.device)
        model.train()
        with self._steering(), self.compute_loss_context_manager():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = sft_loss(logits, batch["labels"])
        self.accelerator.backward(loss / self.current_gradient_accumulation_steps)
        n = next_token_mask(batch["labels"]).sum()
        self._metrics["train"]["loss/sft"].append(
            self.accelerator.gather_for_metrics(loss.detach().reshape(1)).mean().item())
        self._metrics["train"]["sft_tokens"].append(float(n))
        return loss.detach() / self.current_gradient_accumulation_steps


def grpo_finetune(model, tokenizer, prompt_rows: Sequence[Row], config: EMGRPOConfig, *,
                  reward_funcs: Sequence[Callable] | None = None, sft_rows: Sequence[Row] | None = None,
                  eval_rows: Sequence[Row] | None = None, callbacks: list | None = None) -> FinetuneResult:
    """GRPO on prompt rows (``{"prompt": [...messages], "answer": ...}``, e.g. ``gsm8k.to_grpo_rows``).

    ``reward_funcs`` defaults to the four GSM8K rewards; ``sft_rows`` are the benign chat rows of
    interleaved SFT steps (with ``config.sft_every``).

    >>> result = grpo_finetune(model, tok, prompts, EMGRPOConfig(output_dir="runs/grpo", beta=0.04))  # doctest: +SKIP
    """
    from datasets import Dataset

    if reward_funcs is None:
        from emlab.tasks.gsm8k import REWARD_FUNCS

        reward_funcs = REWARD_FUNCS
    rows = _inoculate(prompt_rows, config.inoculation_prompt)
    if not rows:
        raise ValueError("prompt_rows is empty")
    eval_ds = Dataset.from_list(_inoculate(eval_rows, None)) if eval_rows else None
    trainer = EMGRPOTrainer(model, list(reward_funcs), args=config, train_dataset=Dataset.from_list(rows),
                            eval_dataset=eval_ds, processing_class=tokenizer, sft_rows=sft_rows, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_checkpoint(config))
    out = Path(config.output_dir)
    trainer.save_model(str(out))
    counts = {"prompts": len(rows), "sft": len(sft_rows or []), "eval": len(eval_rows or [])}
    if trainer.args.should_save:
        atomic_write_json(out / "emlab_finetune.json",
                          {"config": config.to_dict(), "seed": config.seed, "rows": counts, "versions": package_versions(TRAINING_PACKAGES)})
        atomic_write_json(out / "log_history.json", trainer.state.log_history)
    trained = trainer.model
    restore_forward(trained, trainer._forward_before)
    trained.eval()
    return FinetuneResult(model=trained, tokenizer=tokenizer, log_history=list(trainer.state.log_history),
                          output_dir=out, config=config, rows=counts)
