"""How many CPU threads torch uses for generation and training, chosen from the machine, not guessed.

torch's default is one thread per core. When another process holds a core, OpenMP threads wait on
each other at every barrier: SmolLM2 generated 1.4 tokens/s with 2 threads against 17.8 with one
while one other process used one of 2 cores (issue 16). The rule (:func:`choose_threads`):

1. ``$EMLAB_THREADS``, when set, wins;
2. a model under 20M parameters (the toy organism) gets 1 thread: its matrices are too small to share;
3. the cores this process may run on (``os.sched_getaffinity``, capped by a cgroup CPU quota) are
   divided among ``$EMLAB_WORKERS`` emlab processes when the sweep machinery sets it;
4. otherwise the cores other processes keep busy (the 1-minute load average, rounded) are left to
   them; never fewer than 1 thread.

Only CPU work is affected; a model on a GPU leaves torch's setting alone.

>>> with cpu_threads(model):          # doctest: +SKIP
...     model.generate(...)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

__all__ = ["available_cores", "choose_threads", "cpu_threads"]

#: Models with fewer parameters than this run on one thread (the toy organism: see docs/toy-organism.md).
SMALL_MODEL_PARAMS = 20_000_000


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota (``"200000 100000"`` -> 2.0), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(float(quota) / float(period), 1.0)
    except (ValueError, ZeroDivisionError):
        return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    >>> available_cores() >= 1
    True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(cores, 1)


def _positive_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"${name} must be a positive integer, got {raw!r}")
    return value


def choose_threads(n_params: int | None = None, *, cores: int | None = None, workers: int | None = None,
                   load: float | None = None) -> int:
    """Torch CPU threads for one emlab process (the rule in this module's docstring).

    ``cores`` defaults to :func:`available_cores`, ``workers`` to ``$EMLAB_WORKERS`` and ``load`` to
    the 1-minute load average (read only when ``workers`` is unknown).

    >>> choose_threads(cores=16, workers=4), choose_threads(cores=2, load=1.2), choose_threads(5_000_000, cores=8)
    (4, 1, 1)
    """
    forced = _positive_int("EMLAB_THREADS")
    if forced is not None:
        return forced
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    cores = available_cores() if cores is None else cores
    workers = _positive_int("EMLAB_WORKERS") if workers is None else workers
    if workers is not None:
        return max(1, cores // workers)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cores, cores - round(load)))


@contextmanager
def cpu_threads(model=None, n: int | None = None):
    """Run the block with ``n`` torch threads (default :func:`choose_threads` for ``model``), then restore.

    Does nothing for a model on a GPU.

    >>> with cpu_threads(n=1):
    ...     import torch; torch.get_num_threads()
    1
    """
    import torch

    if model is not None:
        try:
            first = next(model.parameters())
        except (StopIteration, AttributeError):
            first = None
        if first is not None and first.device.type != "cpu":
            yield torch.get_num_threads()
            return
    if n is None:
        n_params = sum(p.numel() for p in model.parameters()) if model is not None else None
        n = choose_threads(n_params)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
