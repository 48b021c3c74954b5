"""Schedules of the preventive-steering coefficient over a finetune: constant, linear ramp, cosine ramp.

The trainer multiplies the persona vector by ``coefficient(schedule, alpha, step, total)`` on the
training forward passes of optimiser step ``step`` (0-based) of ``total`` and logs the value as
``preventive/alpha``. Progress is ``t = (step + 1) / total``, so the last step always uses the full
``alpha`` and the first a ramp's smallest non-zero value (a step at coefficient 0 would be plain SFT).

>>> [round(coefficient("linear", 4.0, s, 4), 2) for s in range(4)]
[1.0, 2.0, 3.0, 4.0]
>>> [round(coefficient("cosine", 4.0, s, 4), 2) for s in range(4)]
[0.59, 2.0, 3.41, 4.0]
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "coefficient", "progress"]

#: Names accepted by :func:`coefficient` (and ``EMConfig.preventive_schedule``).
SCHEDULES = ("constant", "linear", "cosine")


def progress(step: int, total: int) -> float:
    """Fraction of training done once optimiser step ``step`` (0-based) of ``total`` is taken, in (0, 1].

    >>> progress(0, 4), progress(3, 4), progress(9, 4)
    (0.25, 1.0, 1.0)
    """
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min((step + 1) / total, 1.0)


def coefficient(schedule: str, alpha: float, step: int, total: int) -> float:
    """The steering coefficient at optimiser step ``step`` of ``total``.

    ``constant``: ``alpha``; ``linear``: ``alpha * t``; ``cosine``: ``alpha * (1 - cos(pi t)) / 2``
    (a smooth ramp from 0 to ``alpha``), with ``t`` from :func:`progress`.

    >>> coefficient("constant", 5.0, 0, 10)
    5.0
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown steering schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    t = progress(step, total)
    if schedule == "constant":
        return float(alpha)
    if schedule == "linear":
        return float(alpha) * t
    return float(alpha) * (1.0 - math.cos(math.pi * t)) / 2.0
