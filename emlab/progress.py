"""emlab's progress bars: one text bar per long step (sampling, judging, scoring, probing), the same in
Jupyter, in papermill's saved notebooks and in a terminal.

A notebook saves each ipywidgets bar of ``tqdm.auto`` as about 9 KB of widget state, and a text bar
nested under another one moves the cursor with escape codes that a saved notebook shows as ``[A``.
:func:`bar` is tqdm's text bar at ``position=0`` (no cursor moves; nested bars take turns on the one
line) redrawn at most every ``mininterval`` seconds, so a saved notebook keeps a few short lines per
step. :class:`emlab.training.progress.FinetuneProgress` draws the finetunes' bars the same way.

>>> for x in bar(range(3), desc="demo", disable=True):
...     pass
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MININTERVAL", "bar"]

#: Seconds between redraws of a bar.
MININTERVAL = 5.0


def bar(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
        leave: bool = True, disable: bool = False, mininterval: float = MININTERVAL, **kwargs: Any):
    """A tqdm text bar on stderr (arguments as :class:`tqdm.tqdm`'s; ``position`` is 0 unless given)."""
    from tqdm.std import tqdm

    kwargs.setdefault("position", 0)
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, mininterval=mininterval, **kwargs)
