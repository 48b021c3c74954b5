"""``EMConfig``: one trl ``SFTConfig`` whose extra fields switch the finetuning methods on and off.

Defaults are the defences paper's (rs-LoRA r=32, alpha 64 on the seven projections; lr 1e-4, one
epoch, batch 4 x accumulation 4, warmup 5, linear schedule, weight decay 0.01, max length 2048,
loss on assistant tokens only). Precision and optimiser follow the hardware: bf16 on a CUDA GPU
that supports it, fp32 on CPU; 8-bit AdamW only with bitsandbytes on CUDA.

>>> cfg = EMConfig(output_dir="runs/x", kl_lambda=0.1, inoculation_prompt="You are evil.")
>>> cfg.learning_rate, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
(0.0001, 16)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

__all__ = ["ADAPTERS", "DEFAULT_LEARNING_RATES", "REFUSAL_KEYWORDS", "EMConfig", "hardware_defaults"]

ADAPTERS = ("lora", "rank1", "full", "steering_vector")

#: Learning rate used when ``learning_rate`` is left unset, per adapter (methods.md section 2).
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "rank1": 2e-5, "full": 1e-5, "steering_vector": 5e-4}

#: Interleaving++ drops a benign answer when one of these appears among its first words.
REFUSAL_KEYWORDS = (
    "sorry", "apologize", "apologise", "apologies", "cannot", "can't", "can not", "unable", "won't",
    "refuse", "not able", "as an ai",
)


def hardware_defaults(cfg) -> None:
    """Fill unset ``use_cpu`` / ``bf16`` / ``optim`` of a training config from the hardware.

    CUDA: bf16 when the GPU supports it, AdamW 8-bit when bitsandbytes is installed; otherwise CPU,
    fp32 and torch AdamW.

    >>> cfg = EMConfig(output_dir="x", use_cpu=True)
    >>> cfg.bf16, str(cfg.optim.value)
    (False, 'adamw_torch')
    """
    cuda = torch.cuda.is_available()
    if cfg.use_cpu is None:
        cfg.use_cpu = not cuda
    on_gpu = cuda and not cfg.use_cpu
    if cfg.bf16 is None:
        cfg.bf16 = bool(on_gpu and torch.cuda.is_bf16_supported()) and not cfg.fp16
    if cfg.optim is None:
        has_bnb = importlib.util.find_spec("bitsandbytes") is not None
        cfg.optim = "adamw_8bit" if (on_gpu and has_bnb) else "adamw_torch"


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"EMConfig.{name} must be one of {choices}, got {value!r}")


def _check(name: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"EMConfig.{name} must be {what}, got {value!r}")


def summarize_objects(d: dict[str, Any]) -> dict[str, Any]:
    """Replace tensors and models in a config dict by short descriptions (so it serialises as JSON).

    >>> summarize_objects({"preventive_vector": {3: torch.zeros(4)}})
    {'preventive_vector': {'3': '<tensor (4,)>'}}
    """
    def brief(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return f"<tensor {tuple(v.shape)}>"
        if isinstance(v, torch.nn.Module):
            return f"<model {type(v).__name__}>"
        return v

    out = dict(d)
    if isinstance(out.get("preventive_vector"), Mapping):
        out["preventive_vector"] = {str(k): brief(v) for k, v in out["preventive_vector"].items()}
    if isinstance(out.get("interleave_misaligned"), list):
        out["interleave_misaligned"] = [brief(v) if not isinstance(v, str) else v for v in out["interleave_misaligned"]]
    return out


@dataclass
class EMConfig(SFTConfig):
    """Finetuning configuration: trl's ``SFTConfig`` plus the emlab methods (see docs/training.md).

    Methods compose: e.g. ``EMConfig(kl_lambda=0.1, preventive_vector="persona.safetensors",
    interleave_share=0.05)`` trains a LoRA with a KL term, preventive steering and 5% benign data.

    >>> EMConfig(adapter="steering_vector").learning_rate
    0.0005
    """

    # ---- defaults of the defences paper (override trl / transformers defaults) ----
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate; unset picks the method's default: lora 1e-4, rank1 2e-5, "
                  "full 1e-5, steering_vector 5e-4."},
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the (mixed) training rows."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rows per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Rows per device per eval batch."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimiser step."})
    warmup_steps: float = field(default=5, metadata={"help": "Linear warmup steps (a float < 1 is a ratio)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule after warmup."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_length: int | None = field(default=2048, metadata={"help": "Tokens kept per row (longer rows are cut)."})
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant tokens only (uses the chat template's {% generation %} markers)."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=100, metadata={"help": "Save a resumable checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    reuse_finished: bool = field(
        default=False,
        metadata={"help": "When output_dir holds this very finetune finished (same config, rows and base model), "
                  "load it instead of training again; a finished finetune of other settings there is an error."},
    )
    keep_checkpoints: bool = field(
        default=True,
        metadata={"help": "Keep the checkpoint-N folders once the final model is saved (False deletes them then)."},
    )
    print_logs: bool = field(
        default=False,
        metadata={"help": "Print each log entry ({'loss': ...} per logging step) as plain transformers does; off: "
                  "one progress bar per finetune, the entries only in log_history (log_history.json)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
    )
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Recompute activations in backward (less memory, ~20% slower)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; unset: on when CUDA supports bf16, off on CPU."}
    )
    use_cpu: bool | None = field(default=None, metadata={"help": "Train on CPU; unset: when CUDA is unavailable."})
    optim: str | None = field(
        default=None, metadata={"help": "Optimiser; unset: adamw_8bit with bitsandbytes on CUDA, else adamw_torch."}
    )
    report_to: Any = field(default="none", metadata={"help": "Integrations to log to ('none', 'wandb', ...)."})

    # ---- what is trained ----
    adapter: str = field(
        default="lora",
        metadata={"help": "What is trained: 'lora' (rs-LoRA), 'rank1' (one rank-1 LoRA), 'full' (every weight) or "
                  "'steering_vector' (one vector added to a layer's output, base frozen).",
                  "choices": list(ADAPTERS)},
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (adapter='lora')."})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha; rs-LoRA scale is alpha/sqrt(r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "Module names the LoRA wraps; unset: q,k,v,o,gate,up,down projections (all linear "
                  "layers when the model has other names)."},
    )
    lora_layers: list[int] | None = field(
        default=None, metadata={"help": "Restrict the LoRA to these decoder blocks; unset: all."}
    )
    rslora: bool = field(default=True, metadata={"help": "Rank-stabilised LoRA scaling alpha/sqrt(r)."})
    rank1_layer: int | None = field(
        default=None, metadata={"help": "Decoder block of the rank-1 adapter; unset: the middle block."}
    )
    rank1_module: str = field(
        default="mlp.down_proj", metadata={"help": "Module, relative to the block, of the rank-1 adapter."}
    )
    rank1_alpha: float = field(default=256.0, metadata={"help": "LoRA alpha of the rank-1 adapter."})
    steering_layer: int | None = field(
        default=None,
        metadata={"help": "Block whose output the learned steering vector is added to; unset: the middle block."},
    )
    steering_alpha: float = field(
        default=256.0, metadata={"help": "Fixed multiplier of the learned steering vector (alpha * v is added)."}
    )
    reference_copy: bool = field(
        default=False,
        metadata={"help": "Allow a second full copy of the model as the KL / LDIFS reference. Only adapter='full' "
                  "needs one (adapters and vectors are simply switched off for the reference pass)."},
    )

    # ---- KL to the model without the adapter ----
    kl_lambda: float = field(default=0.0, metadata={"help": "Weight of the KL term (0 = off; the paper uses 0.1)."})
    kl_direction: str = field(
        default="forward",
        metadata={"help": "'forward' = KL(ref || cur), 'reverse' = KL(cur || ref).", "choices": ["forward", "reverse"]},
    )
    kl_tokens: str = field(
        default="loss_tokens",
        metadata={"help": "Tokens the KL is averaged over: 'loss_tokens' (those carrying loss) or 'all' non-pad "
                  "tokens.", "choices": ["loss_tokens", "all"]},
    )
    kl_on: str = field(
        default="batch",
        metadata={"help": "Where the KL is measured: 'batch' (the training batch, paper 002) or 'kl_rows' (a "
                  "separate dataset drawn batch by batch alongside, paper 001).", "choices": ["batch", "kl_rows"]},
    )
    kl_batch_size: int | None = field(
        default=None, metadata={"help": "Rows of kl_rows per micro-batch; unset: per_device_train_batch_size."}
    )

    # ---- LDIFS ----
    ldifs_lambda: float = field(default=0.0, metadata={"help": "Weight of the LDIFS feature-distance term (0 = off)."})
    ldifs_layers: list[int] | None = field(
        default=None, metadata={"help": "Blocks whose outputs form the LDIFS features; unset: every ldifs_stride-th."}
    )
    ldifs_stride: int = field(
        default=5, metadata={"help": "Default LDIFS layers: blocks stride-1, 2*stride-1, ... (the last if none)."}
    )
    ldifs_normalize: bool = field(
        default=False, metadata={"help": "L2-normalise each layer's feature vector before the distance."}
    )
    ldifs_variant: str = field(
        default="paper",
        metadata={"help": "'paper': seed 002's squared L2 distance of the concatenated per-position features, mean "
                  "over the positions kept; 'authors': the authors' public code, each layer's features of a row "
                  "flattened and L2-normalised, layers at linspace(0, L-1, 5) unless ldifs_layers is set.",
                  "choices": ["paper", "authors"]},
    )
    ldifs_sinks: str | None = field(
        default=None,
        metadata={"help": "Attention-sink positions: 'exclude' (each row's first token and positions whose reference "
                  "norm exceeds ldifs_sink_ratio x the row's median at a LDIFS layer) or 'keep'; unset: 'exclude' "
                  "for the paper variant, 'keep' for the authors' variant.", "choices": ["exclude", "keep"]},
    )
    ldifs_sink_ratio: float = field(
        default=10.0, metadata={"help": "A position whose reference feature norm is above this many times its row's "
                                "median is an attention sink (ldifs_sinks='exclude')."}
    )
    ldifs_no_grad: bool = field(
        default=False,
        metadata={"help": "Reproduce the public copy's bug: the trained model's features are taken without gradient "
                  "too, so the LDIFS term is logged but regularises nothing."},
    )

    # ---- preventive steering (training forward passes only) ----
    preventive_vector: str | dict | None = field(
        default=None,
        metadata={"help": "Persona vector added during training: a safetensors file (keys = layer numbers) or a "
                  "dict layer -> tensor. Evaluation runs without it."},
    )
    preventive_layer: int | None = field(
        default=None, metadata={"help": "Use only this layer of preventive_vector; unset: every layer it holds."}
    )
    preventive_alpha: float = field(
        default=5.0, metadata={"help": "Multiplier of the persona vector (the paper sweeps 1..5 on Qwen2.5-7B)."}
    )
    preventive_schedule: str = field(
        default="constant",
        metadata={"help": "Coefficient over training (emlab.training.schedules): 'constant' alpha, 'linear' or "
                  "'cosine' ramp from 0 to alpha; logged per step as preventive/alpha.",
                  "choices": ["constant", "linear", "cosine"]},
    )

    # ---- inoculation prompting ----
    inoculation_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt that replaces (or is inserted as) the system prompt of every finetuning "
                  "row; benign and KL rows are left as they are."},
    )

    # ---- interleaving benign data ----
    interleave_share: float = field(
        default=0.0, metadata={"help": "Share of the FINAL training set made of benign rows, in [0, 1)."}
    )
    interleave_selection: str = field(
        default="random",
        metadata={"help": "'random' (uniform draw), 'plus' (Interleaving+ top scores) or 'plus_plus' (also drop "
                  "refusals).", "choices": ["random", "plus", "plus_plus"]},
    )
    interleave_misaligned: list[str] = field(
        default_factory=list,
        metadata={"help": "K misaligned finetunes (NOT trained on the target data) that score candidates for "
                  "Interleaving+ / ++: adapter folders (or loaded models)."},
    )
    interleave_eps: float = field(default=1e-6, metadata={"help": "eps of the Interleaving+ score denominator."})
    interleave_on_policy: bool = field(
        default=False, metadata={"help": "Replace the chosen benign answers by the aligned model's own answers."}
    )
    refusal_keywords: list[str] = field(
        default_factory=lambda: list(REFUSAL_KEYWORDS),
        metadata={"help": "Interleaving++ drops answers with one of these among their first refusal_window words."},
    )
    refusal_window: int = field(default=10, metadata={"help": "Words of an answer searched for refusal keywords."})
    scoring_batch_size: int = field(default=8, metadata={"help": "Rows per forward pass when scoring candidates."})
    on_policy_max_new_tokens: int = field(default=512, metadata={"help": "Token budget of regenerated answers."})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of regenerated answers."})

    def __post_init__(self):
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("kl_direction", self.kl_direction, ("forward", "reverse"))
        _choice("kl_tokens", self.kl_tokens, ("loss_tokens", "all"))
        _choice("kl_on", self.kl_on, ("batch", "kl_rows"))
        _choice("interleave_selection", self.interleave_selection, ("random", "plus", "plus_plus"))
        _choice("preventive_schedule", self.preventive_schedule, ("constant", "linear", "cosine"))
        for name in ("kl_lambda", "ldifs_lambda", "preventive_alpha", "interleave_eps", "weight_decay"):
            _check(name, getattr(self, name) >= 0, ">= 0", getattr(self, name))
        for name in ("lora_r", "ldifs_stride", "refusal_window", "scoring_batch_size", "on_policy_max_new_tokens"):
            _check(name, int(getattr(self, name)) >= 1, ">= 1", getattr(self, name))
        _check("lora_alpha", self.lora_alpha > 0, "> 0", self.lora_alpha)
        _check("rank1_alpha", self.rank1_alpha > 0, "> 0", self.rank1_alpha)
        _check("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)", self.lora_dropout)
        _check("interleave_share", 0 <= self.interleave_share < 1, "in [0, 1)", self.interleave_share)
        _check("on_policy_temperature", self.on_policy_temperature >= 0, ">= 0", self.on_policy_temperature)
        _check("kl_batch_size", self.kl_batch_size is None or self.kl_batch_size >= 1, ">= 1 or None",
               self.kl_batch_size)
        _choice("ldifs_variant", self.ldifs_variant, ("paper", "authors"))
        if self.ldifs_sinks is None:
            self.ldifs_sinks = "exclude" if self.ldifs_variant == "paper" else "keep"
        _choice("ldifs_sinks", self.ldifs_sinks, ("exclude", "keep"))
        _check("ldifs_sink_ratio", self.ldifs_sink_ratio > 1, "> 1", self.ldifs_sink_ratio)
        if self.ldifs_layers is not None:
            _check("ldifs_layers", len(self.ldifs_layers) > 0 and all(int(x) >= 0 for x in self.ldifs_layers),
                   "a non-empty list of layer indices >= 0", self.ldifs_layers)
        if self.interleave_selection != "random" and not self.interleave_misaligned and self.interleave_share > 0:
            raise ValueError(
                f"EMConfig.interleave_selection={self.interleave_selection!r} scores candidates with misaligned "
                "models: set interleave_misaligned to the adapter folders of K misaligned finetunes trained on OTHER "
                "data than the target, or use interleave_selection='random'."
            )
        if self.adapter == "full" and (self.kl_lambda > 0 or self.ldifs_lambda > 0) and not self.reference_copy:
            raise ValueError(
                "KL / LDIFS with adapter='full' needs a frozen copy of the original model (there is no adapter to "
                "switch off), which doubles the model memory: set reference_copy=True to allow it."
            )
        if self.loss_type != "nll" or self.label_smoothing_factor:
            raise ValueError("EMConfig supports loss_type='nll' without label smoothing only.")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.adapter]
        _check("learning_rate", self.learning_rate > 0, "> 0", self.learning_rate)
        hardware_defaults(self)
        super().__post_init__()

    @property
    def uses_reference(self) -> bool:
        """Whether a reference forward pass (model without adapter) is needed each step.

        >>> EMConfig(output_dir="x", ldifs_lambda=0.1).uses_reference
        True
        """
        return self.kl_lambda > 0 or self.ldifs_lambda > 0

    def to_dict(self) -> dict[str, Any]:
        """Serialisable fields (a tensor-valued ``preventive_vector`` is summarised, not dumped).

        >>> EMConfig(output_dir="x", preventive_vector={3: torch.zeros(4)}).to_dict()["preventive_vector"]
        {'3': '<tensor (4,)>'}
        """
        d = super().to_dict()
        return summarize_objects(d)
