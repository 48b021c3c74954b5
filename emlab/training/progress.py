"""What a finetune shows while it runs: one progress bar, not transformers' per-step log dictionaries.

transformers gives every ``Trainer`` a ``PrinterCallback`` (with ``disable_tqdm=True``) or a
``ProgressCallback`` / ``NotebookProgressCallback`` (otherwise), and each prints every log entry:
with ``logging_steps=1`` a notebook fills with one ``{'loss': ...}`` line per step. emlab's trainers
swap them for :class:`FinetuneProgress`, one tqdm bar per finetune showing the latest loss, unless
the config asks for ``print_logs``. Every log entry still lands in ``trainer.state.log_history``,
which :func:`emlab.training.finetune` writes to ``log_history.json`` in the finetune's folder.

>>> swap_progress(trainer, print_logs=False)     # doctest: +SKIP
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["FinetuneProgress", "SameSecondCheckpoints", "quiet_dataset_bars", "swap_progress"]

#: transformers' callbacks that print each log entry (the notebook one is named: importing it needs IPython)
_PRINTERS = (PrinterCallback, ProgressCallback)


class FinetuneProgress(TrainerCallback):
    """One tqdm text bar per finetune (optimiser steps, latest loss) on stderr; prints no log entry.

    >>> trainer.add_callback(FinetuneProgress("finetune sft"))    # doctest: +SKIP
    """

    MININTERVAL = 5.0  # seconds between redraws

    def __init__(self, desc: str = "finetune"):
        self.desc = desc
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from emlab.progress import bar

            # a text bar (emlab.progress): a notebook keeps each widget bar's state (~9 KB) in the saved file, a
            # text bar's few redraws (one every MININTERVAL s) cost a few hundred bytes
            self.bar = bar(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                           mininterval=self.MININTERVAL)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and isinstance((logs or {}).get("loss"), int | float):
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SameSecondCheckpoints(logging.Filter):
    """Drops transformers' "mtime may not be reliable on this filesystem" warning, and only it.

    When a finetune saves two checkpoints within one second (a small model on a CPU does), transformers'
    checkpoint rotation cannot order them by modification time, says so once, and orders them by step
    number, which is the right order; the warning says nothing about the user's data or filesystem.
    :func:`swap_progress` installs it on ``transformers.trainer_utils``'s logger (once).

    >>> SameSecondCheckpoints().filter(logging.makeLogRecord({"msg": "mtime may not be reliable on x"}))
    False
    """

    MESSAGE = "mtime may not be reliable"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.MESSAGE)


def _quiet_checkpoint_ordering() -> None:
    log = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, SameSecondCheckpoints) for f in log.filters):
        log.addFilter(SameSecondCheckpoints())


def swap_progress(trainer, *, print_logs: bool = False) -> None:
    """Replace ``trainer``'s log-printing callbacks by a :class:`FinetuneProgress` bar (none with
    ``disable_tqdm``) and drop the same-second checkpoint warning (:class:`SameSecondCheckpoints`); with
    ``print_logs`` leave transformers' own callbacks and messages as they are."""
    if print_logs:
        return
    _quiet_checkpoint_ordering()
    handler = trainer.callback_handler
    for cb in list(handler.callbacks):
        if isinstance(cb, _PRINTERS) or type(cb).__name__ == "NotebookProgressCallback":
            handler.remove_callback(cb)
    if not trainer.args.disable_tqdm:
        handler.add_callback(FinetuneProgress(f"finetune {Path(trainer.args.output_dir).name}"))


@contextmanager
def quiet_dataset_bars():
    """Switch off the ``datasets`` progress bars (trl tokenises the rows with four ``map`` calls, each a
    bar per finetune) for the block, then restore them; ``HF_DATASETS_DISABLE_PROGRESS_BARS=0`` keeps them."""
    from datasets import config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch = config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not are_progress_bars_disabled()
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()
