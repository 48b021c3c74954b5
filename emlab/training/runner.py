"""``finetune``: rows + config in, trained model + log history + output folder out.

>>> result = finetune(model, tok, rows, EMConfig(output_dir="runs/kl", kl_lambda=0.1))   # doctest: +SKIP
>>> result.metric("loss/kl")[-1]                                                      # doctest: +SKIP
(25, 0.013)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab.data import check_rows, with_system_prompt
from emlab.runs import atomic_write_json, package_versions
from emlab.training.adapters import SteeringVector, applied, steering_vector
from emlab.training.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    config_defaults,
    fingerprint,
    fingerprint_differences,
    last_complete_checkpoint,
    list_checkpoints,
    saving,
    weights_problem,
)
from emlab.training.config import EMConfig
from emlab.training.interleaving import ScoreCache, interleave
from emlab.training.trainer import EMTrainer

__all__ = ["TRAINING_PACKAGES", "FinetuneResult", "finetune", "messages_only", "resume_checkpoint"]

Row = dict[str, Any]
_MARKER = "emlab_finetune.json"  # written last: the finetune is finished
_STARTED = "emlab_checkpoints.json"  # written before training: whose checkpoints these are
#: The packages whose versions a finetune's record holds.
TRAINING_PACKAGES = ("emlab", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


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


def messages_only(rows: Sequence[Row] | None, what: str) -> list[Row]:
    """``rows`` checked (:func:`emlab.data.check_rows`) and reduced to their ``messages``; errors name ``what``."""
    rows = check_rows(rows, f"{what}_rows") if rows else []  # bad roles, empty answers, unencodable text: named here
    out = []
    for i, row in enumerate(rows or []):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{what} row {i} is not a chat row {{'messages': [...]}}: {str(row)[:80]}")
        out.append({"messages": row["messages"]})
    return out


def resume_checkpoint(config, fp: dict[str, Any] | None = None) -> str | None:
    """``resume_from_checkpoint``: True / "true" means the newest COMPLETE checkpoint of output_dir, if any.

    Incomplete checkpoints (a kill or a full disk during a save) are skipped with a warning; with a
    fingerprint ``fp`` the checkpoints must belong to this finetune (same config, rows, base model).
    An explicit folder must be a complete checkpoint.
    """
    value = config.resume_from_checkpoint
    model_only = bool(getattr(config, "save_only_model", False))
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True"):
        out = config.output_dir
        if not out or not os.path.isdir(out):
            return None
        found = last_complete_checkpoint(out, model_only=model_only, remove_incomplete=config.should_save)
        if found is not None and fp is not None:
            _check_same_finetune(config, Path(out), fp, f"checkpoint {found}")
        if found is not None:
            print(f"emlab: resuming {out} from {Path(found).name}", file=sys.stderr)
        return found
    problem = checkpoint_problem(value, model_only=model_only)
    if problem is not None:
        newest = last_complete_checkpoint(Path(value).parent, model_only=model_only, quiet=True)
        raise CheckpointError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: {problem}"
                              + (f"; the newest complete one there is {newest}" if newest else ""))
    return str(value)


def _last_step_state(checkpoint: str | None):
    """The TrainerState of ``checkpoint`` when it was saved at the finetune's last step, else None."""
    if checkpoint is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def _check_same_finetune(config, out: Path, fp: dict[str, Any], what: str) -> None:
    """Raise when ``out``'s recorded fingerprint (checkpoints or finished model) is another finetune's."""
    path = out / _STARTED
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
    except FileNotFoundError:
        warnings.warn(f"{out}: no {_STARTED} beside the checkpoints (written by an older emlab?): resuming from "
                      f"{what} without checking that it belongs to this finetune", stacklevel=3)
        return
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); delete the checkpoints in {out} or resume from an "
                              "explicit resume_from_checkpoint folder") from e
    if diff := fingerprint_differences(old, fp, defaults=config_defaults(config)):
        raise CheckpointError(f"{what} in {out} was written by another finetune (differs in: {', '.join(diff)}): "
                              "use another output_dir, delete the checkpoint folders there, or pass an explicit "
                              "resume_from_checkpoint folder")


def _finished(config, out: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The record of this very finetune finished in ``out`` with its weights, else None (train it)."""
    marker = out / _MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError as e:
        warnings.warn(f"{marker}: unreadable ({e}): training the finetune again", stacklevel=3)
        return None
    if "fingerprint" not in record:
        warnings.warn(f"{marker} has no fingerprint (written by an older emlab): training the finetune again",
                      stacklevel=3)
        return None
    if diff := fingerprint_differences(record["fingerprint"], fp, defaults=config_defaults(config)):
        raise CheckpointError(f"{out} holds a finished finetune of other settings (differs in: {', '.join(diff)}): "
                              "use another output_dir, or delete that folder to train this one there")
    if (problem := weights_problem(out)) is not None:
        warnings.warn(f"{out}: the finished finetune's weights are not usable ({problem}): training it again",
                      stacklevel=3)
        return None
    return record


def finetune(model, tokenizer, train_rows: Sequence[Row], config: EMConfig, *, eval_rows: Sequence[Row] | None = None,
             kl_rows: Sequence[Row] | None = None, benign_rows: Sequence[Row] | None = None,
             benign_scores: ScoreCache | Any | None = None, callbacks: list | None = None) -> FinetuneResult:
    """Finetune ``model`` on chat rows with every method ``config`` switches on; returns a :class:`FinetuneResult`.

    Order: inoculation prompt on ``train_rows`` -> benign rows interleaved (``benign_rows``, chosen
    as ``config.interleave_selection`` says; Interleaving+ scores from ``benign_scores``, one per benign row
    or a :class:`~emlab.training.interleaving.ScoreCache`, else computed) -> :class:`EMTrainer` (adapter, KL on the batch or on
    ``kl_rows``, LDIFS, preventive steering) -> final adapter saved in ``config.output_dir`` with
    ``log_history.json`` and, last, ``emlab_finetune.json`` (config, versions, row counts,
    fingerprint). With ``resume_from_checkpoint=True`` a killed run continues from its newest
    complete checkpoint (incomplete ones are skipped with a warning; checkpoints of another
    finetune are an error), or starts when there is none. With ``reuse_finished=True`` a finetune
    that already finished in ``output_dir`` (same config, rows and base model) is loaded instead of
    trained. A failed save (full disk) raises :class:`~emlab.training.checkpoints.CheckpointError`.
    ``model`` is modified in place (the adapter is injected into it).

    >>> result = finetune(model, tok, rows, EMConfig(output_dir="runs/x", interleave_share=0.05),
    ...                   benign_rows=benign)                                  # doctest: +SKIP
    """
    from datasets import Dataset

    if not isinstance(config, EMConfig):
        raise TypeError(f"config must be an EMConfig, got {type(config).__name__}")
    rows = messages_only(train_rows, "train")
    if not rows:
        raise ValueError("train_rows is empty")
    given = {"train": rows, "benign": messages_only(benign_rows, "benign"), "kl": messages_only(kl_rows, "kl"),
             "eval": messages_only(eval_rows, "eval")}
    out = Path(config.output_dir)
    fp = fingerprint(model, config, given)  # before the adapter is injected into the model
    if config.inoculation_prompt is not None:
        rows = with_system_prompt(rows, config.inoculation_prompt)
    n_target = len(rows)
    eval_ds = Dataset.from_list(given["eval"]) if eval_rows else None
    kl_ds = Dataset.from_list(given["kl"]) if kl_rows else None
    if config.reuse_finished and (record := _finished(config, out, fp)) is not None:
        return _load_finished(model, tokenizer, rows, config, record, kl_ds, callbacks)
    if config.interleave_share > 0:
        if not benign_rows:
            raise ValueError(f"interleave_share={config.interleave_share} needs benign_rows")
        rows = interleave(model, tokenizer, rows, given["benign"], config, benign_scores)
    elif benign_rows:
        raise ValueError("benign_rows were given but interleave_share is 0: set the share or drop the rows.")
    trainer = EMTrainer(model, args=config, train_dataset=Dataset.from_list(rows), eval_dataset=eval_ds,
                        processing_class=tokenizer, kl_dataset=kl_ds, callbacks=callbacks)
    resume = resume_checkpoint(config, fp)
    if trainer.args.should_save:
        (out / _MARKER).unlink(missing_ok=True)  # a record of an earlier finetune here is about to be replaced
        if resume is None and (stale := list_checkpoints(out)):
            warnings.warn(f"{out}: removing {len(stale)} checkpoint folder(s) of an earlier finetune "
                          f"({', '.join(p.name for p in stale)}): this one starts from step 0", stacklevel=2)
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
        with saving(out, "finetune record"):
            atomic_write_json(out / _STARTED, {"fingerprint": fp})
    if (last := _last_step_state(resume)) is not None:
        # transformers resumed from a checkpoint of the last step trains one step too many: load it instead
        trainer._load_from_checkpoint(resume)
        trainer.state = last
    else:
        trainer.train(resume_from_checkpoint=resume)
    if eval_ds is not None and config.eval_strategy == "no":
        trainer.evaluate()
    counts = {"target": n_target, "benign": len(rows) - n_target, "total": len(rows),
              "eval": len(eval_rows or []), "kl": len(kl_rows or [])}
    with saving(out, "final model"):
        trainer.save_model(str(out))
        if trainer.args.should_save:
            atomic_write_json(out / "log_history.json", trainer.state.log_history)
            record = {"config": config.to_dict(), "seed": config.seed, "rows": counts, "versions": package_versions(TRAINING_PACKAGES),
                      "fingerprint": fp}
            atomic_write_json(out / _MARKER, record)  # last: the finetune is finished
    if trainer.args.should_save and not config.keep_checkpoints:
        for folder in list_checkpoints(out):
            shutil.rmtree(folder, ignore_errors=True)
    return _result(trainer.plain_model(), tokenizer, list(trainer.state.log_history), out, config, counts)


def _result(trained, tokenizer, log_history: list[dict], out: Path, config: EMConfig,
            counts: dict[str, int]) -> FinetuneResult:
    trained.eval()
    return FinetuneResult(model=trained, tokenizer=tokenizer, log_history=log_history, output_dir=out,
                          config=config, rows=counts)


def _load_finished(model, tokenizer, rows: list[Row], config: EMConfig, record: dict[str, Any], kl_ds,
                   callbacks) -> FinetuneResult:
    """Set ``model`` up as training would and load the finished finetune's weights into it (no training)."""
    from datasets import Dataset

    out = Path(config.output_dir)
    trainer = EMTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                        kl_dataset=kl_ds, callbacks=callbacks)
    peft_model = trainer.model
    if hasattr(peft_model, "peft_config") and hasattr(peft_model, "load_adapter"):
        # straight from the folder: the Trainer's loader would also load every checkpoint-N as an extra adapter
        peft_model.load_adapter(str(out), peft_model.active_adapters[0], is_trainable=True)
    else:
        trainer._load_from_checkpoint(str(out))
    try:
        log_history = json.loads((out / "log_history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.warn(f"{out}/log_history.json: unreadable ({e}); the loaded finetune has no log history",
                      stacklevel=3)
        log_history = []
    print(f"emlab: loaded the finished finetune in {out} (same config, rows and base model; not retrained)",
          file=sys.stderr)
    return _result(trainer.plain_model(), tokenizer, log_history, out, config, dict(record.get("rows", {})))
