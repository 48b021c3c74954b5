"""Sweep cells: parsing and expanding parameter values, cell names, the code version, and running one cell.

The lower half of :mod:`emlab.sweeps` (which re-exports every public name here): what a cell is and
how one runs, in a worker process (``python -m emlab.sweeps``) or a Slurm job (submitit pickles
:func:`run_cell` by this module's path).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emlab.runs import atomic_write_json, to_jsonable

SWEEP_FILE = "sweep.json"  # the manifest, in the sweep folder
CELL_FILE = "sweep_cell.json"  # a cell's parameters, code version and outcome, in its run folder
RUN_INFO = "notebook.json"  # written by emlab.notebooks.run_notebook
THREAD_VARS = (
    "EMLAB_THREADS",  # emlab.threads: generate() and training use exactly this many
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


class SweepError(RuntimeError):
    """A sweep could not start or its executor failed (bad cells file, busy folder, no Slurm...)."""


# ---------------------------------------------------------------------------------------------
# Cells


def parse_values(text: str) -> list[Any]:
    """Split ``"0,1,2"`` or ``"medical,legal"`` at top-level commas and parse each value as ``emlab run`` does.

    Commas inside brackets or quotes do not split, so ``"[1, 2],[3]"`` is two list values.

    >>> parse_values("0,1,2"), parse_values("medical, legal"), parse_values("1e-4,[1, 2]")
    ([0, 1, 2], ['medical', 'legal'], [0.0001, [1, 2]])
    """
    from emlab.notebooks import parse_value

    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty value in {text!r} (values are separated by commas)")
    return [parse_value(p.strip()) for p in parts]


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cross product of parameter values, the last axis varying fastest.

    >>> grid({"seed": [0, 1], "domain": ["medical"]})
    [{'seed': 0, 'domain': 'medical'}, {'seed': 1, 'domain': 'medical'}]
    """
    names = list(axes)
    for name in names:
        if not isinstance(axes[name], Sequence) or isinstance(axes[name], str) or not len(axes[name]):
            raise ValueError(f"parameter {name!r} needs a non-empty list of values, got {axes[name]!r}")
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def read_cells(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A listed set of cells: a JSON list of objects, JSON Lines (one object a line) or a YAML list.

    >>> read_cells("cells.jsonl")  # doctest: +SKIP
    [{'seed': 0, 'domain': 'medical'}, {'seed': 3, 'domain': 'legal'}]
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cells file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    cells: list[Any]
    if p.suffix.lower() == ".jsonl":
        cells = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                cells.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{p}:{i}: not a JSON object: {e}") from None
            if not isinstance(cells[-1], dict):
                raise ValueError(f"{p}:{i}: each line must be a JSON object of parameters, got {line.strip()[:60]!r}")
        where = [f"{p}:{i}" for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        try:
            cells = yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ValueError(f"{p}: cannot parse: {e}") from None
        if not isinstance(cells, list):
            raise ValueError(f"{p}: must hold a list of parameter objects, got {type(cells).__name__}")
        where = [f"{p} (cell {i})" for i in range(1, len(cells) + 1)]
        for w, c in zip(where, cells):
            if not isinstance(c, dict):
                raise ValueError(f"{w}: each cell must be an object of parameters, got {c!r}")
    for w, c in zip(where, cells):
        if not c:
            raise ValueError(f"{w}: a cell with no parameters")
        bad = [k for k in c if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"{w}: parameter names must be Python identifiers, got {bad}")
    if not cells:
        raise ValueError(f"{p}: lists no cells")
    return [dict(c) for c in cells]


def canonical_json(params: Mapping[str, Any]) -> str:
    """The exact parameters as compact, key-sorted JSON: what cell names, reuse and sweep folders hash."""
    return json.dumps(to_jsonable(dict(params)), sort_keys=True, separators=(",", ":"))


def cell_name(params: Mapping[str, Any]) -> str:
    """A folder name for a cell: readable ``name=value`` pairs and a hash of the exact parameters.

    >>> cell_name({"seed": 0, "domain": "medical"}), cell_name({"domains": ["legal", "finance"]})
    ('seed=0_domain=medical-a5a9eed6', 'domains=legal+finance-e50dc330')
    """

    def text(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list | tuple):
            return "+".join(text(x) for x in v)
        return json.dumps(to_jsonable(v))

    readable = "_".join(f"{k}={text(v)}" for k, v in params.items())
    readable = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9=._+-]+", "-", readable)).strip("-")[:80] or "cell"
    digest = hashlib.sha256(canonical_json(params).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def _notebook_code(notebook: Path) -> str:
    """The code of a notebook: its cells' types and sources (outputs and metadata do not count)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells = [(c.get("cell_type"), "".join(c.get("source", ""))) for c in nb.get("cells", [])]
    return json.dumps(cells)


def code_version(notebook: str | os.PathLike) -> dict[str, Any]:
    """What a cell's result depends on besides its parameters: emlab's code and the notebook's cells.

    ``key`` (a hash of every ``.py``/``.yaml``/``.json`` file of the ``emlab`` package and the notebook's
    cell sources) decides whether a finished cell is reused; ``git_commit`` and ``git_dirty`` are recorded
    for the reader.

    >>> sorted(code_version("notebooks/01_quickstart.ipynb"))  # doctest: +SKIP
    ['emlab_sha256', 'git_commit', 'git_dirty', 'key', 'notebook_sha256']
    """
    from emlab.runs import git_state

    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".yaml", ".yml", ".json") and "__pycache__" not in f.parts:
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    emlab_sha = h.hexdigest()
    nb_sha = hashlib.sha256(_notebook_code(Path(notebook)).encode()).hexdigest()
    git = git_state(pkg.parent)
    return {
        "key": hashlib.sha256(f"{emlab_sha}:{nb_sha}".encode()).hexdigest()[:16],
        "emlab_sha256": emlab_sha,
        "notebook_sha256": nb_sha,
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
    }


# ---------------------------------------------------------------------------------------------
# One cell (runs in a worker process or a Slurm job)


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second: the timestamps of sweep records and logs."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def run_cell(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one cell: the notebook with the cell's parameters into its run folder; returns its record.

    ``spec`` has ``notebook``, ``parameters``, ``out_dir``, ``code`` (the code key), and optionally
    ``kernel_name``, ``timeout`` (seconds per notebook cell) and ``threads`` (sets OMP/MKL threads for
    the kernel, so torch there starts with that many). Never raises for a failing notebook: the record's
    ``status`` is ``"failed"`` with the error. The record is also written to ``<out_dir>/sweep_cell.json``.
    """
    from emlab.notebooks import NotebookFailed, run_notebook

    t0 = time.perf_counter()
    threads = spec.get("threads")
    if threads:
        for var in THREAD_VARS:
            os.environ[var] = str(int(threads))
    out = Path(spec["out_dir"])
    record: dict[str, Any] = {
        "name": spec.get("name") or out.name,
        "parameters": dict(spec["parameters"]),
        "code": spec["code"],
        "status": "failed",
        "error": None,
        "seconds": 0.0,
        "notebook_seconds": None,
        "started": utc_now(),
        "finished": None,
        "host": socket.gethostname(),
        "threads": threads,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    try:
        result = run_notebook(
            spec["notebook"],
            spec["parameters"],
            out_dir=out,
            kernel_name=spec.get("kernel_name") or "python3",
            timeout=spec.get("timeout"),
        )
        record["status"] = "ok"
        record["notebook_seconds"] = result.seconds
    except NotebookFailed as e:
        record["error"] = e.result.error
        record["notebook_seconds"] = e.result.seconds
    except Exception as e:  # noqa: BLE001 - a cell's failure is recorded, not fatal to the sweep
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = time.perf_counter() - t0
    record["finished"] = utc_now()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CELL_FILE, to_jsonable(record))
    return record
