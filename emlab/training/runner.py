"""``finetune``: rows + config in, trained model + log history + output folder out.

>>> result = finetune(model, tok, rows, EMConfig(output_dir="runs/kl", kl_lambda=0.1))   # doctest: +SKIP
>>> result.metric("loss/kl")[-1]                                                      # doctest: +SKIP
(25, 0.013)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from emlab.data import check_rows, with_system_prompt
from emlab.models import unwrap
from emlab.runs import atomic_write_json
from emlab.training.adapters import SteeringVector, applied, steering_vector
from emlab.training.config import EMConfig
from emlab.training.interleaving import interleave
from emlab.training.trainer import EMTrainer

__all__ = ["FinetuneResult", "finetune"]

Row = dict[str, Any]
_PACKAGES = ("emlab", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model, its logs and where everything was written.

    ``model`` is the PEFT model (lora / rank1), the model itself (full), or the frozen model carrying
    its learned vector (steering_vector: evaluate inside ``with result.active():``).

    >>> with result.active():                             # doctest: +SKIP
    ...     texts = generate(result.model, tok, questions)
    """

    model: Any
    tokenizer: Any
    log_history: list[dict]
    output_dir: Path
    config: Any  # EMConfig, or EMGRPOConfig for grpo_finetune
    rows: dict[str, int] = field(default_factory=dict)

    def active(self):
        """Context manager under which ``model`` behaves as the finetune (adds a learned steering vector).

        >>> with result.active(): ...                     # doctest: +SKIP
        """
        return applied(self.model)

    @property
    def steering_vector(self) -> SteeringVector | None:
        """The learned vector (adapter='steering_vector'), else ``None``.

        >>> result.steering_vector.layer                  # doctest: +SKIP
        2
        """
        return steering_vector(self.model)

    def metric(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of one logged quantity, e.g. ``"loss"``, ``"loss/kl"``, ``"eval_loss/ce"``.

        >>> result.metric("loss/ce")[:1]                  # doctest: +SKIP
        [(1, 3.91)]
        """
        return [(h["step"], h[name]) for h in self.log_history if name in h]


def _messages_only(rows: Sequence[Row] | None, what: str) -> list[Row]:
    rows = check_rows(rows, f"{what}_rows") if rows else []  # bad roles, empty answers, unencodable text: named here
    out = []
    for i, row in enumerate(rows or []):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{what} row {i} is not a chat row {{'messages': [...]}}: {str(row)[:80]}")
        out.append({"messages": row["messages"]})
    return out


def _resume_arg(config: EMConfig) -> str | None:
    """``resume_from_checkpoint``: True / "true" means the latest checkpoint of output_dir, if there is one."""
    value = config.resume_from_checkpoint
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True"):
        from transformers.trainer_utils import get_last_checkpoint

        out = config.output_dir
        return get_last_checkpoint(out) if out and os.path.isdir(out) else None
    return str(value)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def finetune(model, tokenizer, train_rows: Sequence[Row], config: EMConfig, *, eval_rows: Sequence[Row] | None = None,
             kl_rows: Sequence[Row] | None = None, benign_rows: Sequence[Row] | None = None,
             callbacks: list | None = None) -> FinetuneResult:
    """Finetune ``model`` on chat rows with every method ``config`` switches on; returns a :class:`FinetuneResult`.

    Order: inoculation prompt on ``train_rows`` -> benign rows interleaved (``benign_rows``, chosen
    as ``config.interleave_selection`` says) -> :class:`EMTrainer` (adapter, KL on the batch or on
    ``kl_rows``, LDIFS, preventive steering) -> final adapter saved in ``config.output_dir`` with
    ``emlab_finetune.json`` (config, versions, row counts) and ``log_history.json``. With
    ``resume_from_checkpoint=True`` a killed run continues from its latest checkpoint (or starts
    when there is none). ``model`` is modified in place (the adapter is injected into it).

    >>> result = finetune(model, tok, rows, EMConfig(output_dir="runs/x", interleave_share=0.05),
    ...                   benign_rows=benign)                                  # doctest: +SKIP
    """
    from datasets import Dataset

    if not isinstance(config, EMConfig):
        raise TypeError(f"config must be an EMConfig, got {type(config).__name__}")
    rows = _messages_only(train_rows, "train")
    if not rows:
        raise ValueError("train_rows is empty")
    if config.inoculation_prompt is not None:
        rows = with_system_prompt(rows, config.inoculation_prompt)
    n_target = len(rows)
    if config.interleave_share > 0:
        if not benign_rows:
            raise ValueError(f"interleave_share={config.interleave_share} needs benign_rows")
        rows = interleave(model, tokenizer, rows, _messages_only(benign_rows, "benign"), config)
    elif benign_rows:
        raise ValueError("benign_rows were given but interleave_share is 0: set the share or drop the rows.")
    eval_ds = Dataset.from_list(_messages_only(eval_rows, "eval")) if eval_rows else None
    kl_ds = Dataset.from_list(_messages_only(kl_rows, "kl")) if kl_rows else None
    trainer = EMTrainer(model, args=config, train_dataset=Dataset.from_list(rows), eval_dataset=eval_ds,
                        processing_class=tokenizer, kl_dataset=kl_ds, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=_resume_arg(config))
    if eval_ds is not None and config.eval_strategy == "no":
        trainer.evaluate()
    out = Path(config.output_dir)
    trainer.save_model(str(out))
    counts = {"target": n_target, "benign": len(rows) - n_target, "total": len(rows),
              "eval": len(eval_rows or []), "kl": len(kl_rows or [])}
    if trainer.args.should_save:
        atomic_write_json(out / "emlab_finetune.json",
                          {"config": config.to_dict(), "seed": config.seed, "rows": counts, "versions": _versions()})
        atomic_write_json(out / "log_history.json", trainer.state.log_history)
    trained = trainer.model
    unwrap(trained).__dict__.pop("forward", None)  # drop trl's fused-LM-head patch: the model is plain again
    trained.eval()
    return FinetuneResult(model=trained, tokenizer=tokenizer, log_history=list(trainer.state.log_history),
                          output_dir=out, config=config, rows=counts)
