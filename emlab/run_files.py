"""Atomic file writes and plain-JSON conversion: how every file of a run folder (and most of emlab's
other outputs) reaches the disk. Public names are re-exported by :mod:`emlab.runs`.

>>> atomic_write_json("out/metrics.json", {"em_rate": 0.1})  # doctest: +SKIP
PosixPath('out/metrics.json')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["RUN_FORMAT", "atomic_open", "atomic_write_json", "atomic_write_text", "to_jsonable"]

#: The format tag of a run's ``env.json`` (what tells an emlab run folder from any other).
RUN_FORMAT = "emlab-run/1"


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` in one step.

    If the body raises, the temporary file is removed and ``path`` keeps its old content.
    Parent folders are created. ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes).

    >>> with atomic_open("out/result.txt") as f:  # doctest: +SKIP
    ...     f.write("done\\n")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, like a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            f = os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding=encoding, newline="")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    >>> atomic_write_text("out/notes.txt", "hello\\n")  # doctest: +SKIP
    PosixPath('out/notes.txt')
    """
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically; dataclasses, paths, numpy and torch scalars are converted.

    Non-finite floats (NaN, inf) are written as ``null`` so that the file is standard JSON.

    >>> atomic_write_json("out/metrics.json", {"em_rate": 0.1})  # doctest: +SKIP
    PosixPath('out/metrics.json')
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types (dict, list, str, int, float, bool, None).

    >>> to_jsonable({"p": Path("a"), "t": (1, float("nan"))})
    {'p': 'a', 't': [1, None]}
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_jsonable(obj.item())
    return str(obj)

