"""Finetuning: one trainer whose methods are config fields (see docs/training.md).

>>> from emlab.training import EMConfig, finetune
>>> cfg = EMConfig(output_dir="runs/kl", kl_lambda=0.1)
>>> result = finetune(model, tok, rows, cfg)          # doctest: +SKIP

Submodules: ``losses`` (pure loss terms), ``interleaving`` (benign data selection), ``adapters``
(what is trained), ``trainer`` (``EMTrainer``), ``runner`` (``finetune``), ``checkpoints`` (which
checkpoint a killed finetune resumes from), ``grpo`` (RL variant).
"""

from emlab.training.adapters import SteeringVector
from emlab.training.config import EMConfig
from emlab.training.runner import FinetuneResult, finetune
from emlab.training.trainer import EMTrainer

__all__ = ["EMConfig", "EMTrainer", "FinetuneResult", "SteeringVector", "finetune"]
