"""Sweeps: one notebook over a grid of parameter values, one papermill run per cell, on this machine
or on a Slurm cluster.

A sweep folder holds ``sweep.json`` (the manifest: notebook, code version, cells and their status),
one run folder per cell under ``cells/`` (what :func:`emlab.notebooks.run_notebook` writes, plus
``sweep_cell.json``: the cell's parameters, code version and outcome), worker logs under ``logs/``,
earlier attempts of rerun cells under ``superseded/``, and after the run ``table.csv``,
``summary.csv`` and ``summary.md`` (:mod:`emlab.aggregate`). A cell whose run folder finished
(``notebook.json`` status ``ok``) with the same parameters and code is skipped, so rerunning the same
command after a kill or a failure continues where it stopped.

>>> cells = grid({"seed": [0, 1, 2], "domain": ["medical", "legal"]})
>>> len(cells), cells[0]
(6, {'seed': 0, 'domain': 'medical'})
>>> result = run_sweep("notebooks/02_defences.ipynb", cells, executor=LocalExecutor(workers=2))  # doctest: +SKIP
>>> result.counts()  # doctest: +SKIP
{'ok': 6, 'failed': 0, 'skipped': 0}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emlab.runs import atomic_write_json, to_jsonable
from emlab.sweep_cells import (
    CELL_FILE,
    RUN_INFO,
    SWEEP_FILE,
    THREAD_VARS,  # noqa: F401 - re-exported
    SweepError,
    canonical_json,
    cell_name,
    code_version,
    grid,
    parse_values,
    read_cells,
    run_cell,
    utc_now,
)
from emlab.sweep_executors import Finished, LocalExecutor, SlurmExecutor, squeue_states  # noqa: F401 - re-exported

__all__ = [
    "CELL_FILE",
    "PACK_CELL_FILES",
    "PACK_SWEEP_FILES",
    "SWEEP_FILE",
    "Cell",
    "LocalExecutor",
    "SlurmExecutor",
    "SweepError",
    "SweepResult",
    "cell_name",
    "code_version",
    "grid",
    "pack_sweeps",
    "parse_values",
    "read_cells",
    "run_cell",
    "run_sweep",
    "time_left",
]


def _worker_main() -> int:
    """``python -m emlab.sweeps``: a local worker. Reads one JSON spec a line from stdin, runs it, and
    answers ``done <name>`` on stdout; exits at the end of stdin. Imports papermill once, up front."""
    import papermill  # noqa: F401

    import emlab.notebooks  # noqa: F401 - the imports (papermill, emlab) are paid once per worker

    out = sys.stdout
    sys.stdout = sys.stderr  # whatever a cell prints goes to the worker's log, not to the protocol
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        print(f"--- {utc_now()} cell {spec.get('name')}", file=sys.stderr, flush=True)
        record = run_cell(spec)
        print(
            f"--- {record['status']} ({record['seconds']:.1f} s)" + (f": {record['error']}" if record["error"] else ""),
            file=sys.stderr,
            flush=True,
        )
        print(f"done {spec.get('name')}", file=out, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Cell:
    """One cell of a sweep: its parameters, run folder and outcome.

    ``status`` is ``"waiting"``, ``"running"``, ``"ok"`` or ``"failed"``; ``skipped`` is True when a
    finished run with the same parameters and code was reused.
    """

    name: str
    parameters: dict[str, Any]
    run_dir: Path
    status: str = "waiting"
    skipped: bool = False
    error: str | None = None
    seconds: float | None = None
    notebook_seconds: float | None = None

    def manifest(self, sweep_dir: Path) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = os.path.relpath(self.run_dir, sweep_dir)
        return to_jsonable(d)


@dataclass
class SweepResult:
    """What a sweep did: its folder and every cell."""

    sweep_dir: Path
    cells: list[Cell] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.cells)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "failed"]

    def counts(self) -> dict[str, int]:
        return {
            "ok": sum(c.status == "ok" and not c.skipped for c in self.cells),
            "failed": len(self.failed),
            "skipped": sum(c.skipped for c in self.cells),
        }

    def describe(self) -> str:
        n = self.counts()
        lines = [
            f"sweep {self.sweep_dir}: {len(self.cells)} cells, {n['ok']} ran ok, {n['skipped']} reused, {n['failed']} failed"
        ]
        for c in self.failed:
            lines.append(
                f"  FAILED {c.name}: {(c.error or '').strip().splitlines()[0] if c.error else 'no error recorded'}"
            )
            lines.append(f"         run folder: {c.run_dir}")
        return "\n".join(lines)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_record(run_dir: Path, params: Mapping[str, Any], code_key: str) -> dict[str, Any] | None:
    """The cell record of ``run_dir`` when it finished ok with these parameters and this code, else None."""
    info = _read_json(run_dir / RUN_INFO)
    record = _read_json(run_dir / CELL_FILE)
    if not isinstance(info, dict) or not isinstance(record, dict):
        return None
    if info.get("status") != "ok" or record.get("status") != "ok" or record.get("code") != code_key:
        return None
    if canonical_json(record.get("parameters") or {}) != canonical_json(params):
        return None
    return record


@contextlib.contextmanager
def _sweep_lock(sweep_dir: Path) -> Iterator[None]:
    path = sweep_dir / "sweep.lock"
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise SweepError(
                f"another `emlab sweep` is running in {sweep_dir} ({f.read().strip() or 'pid unknown'})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_left(elapsed: float, cell_seconds: Sequence[float], running: int, waiting: int) -> float | None:
    """Seconds a sweep has left, from the cells finished in this call (``cell_seconds``, each cell's own
    duration), the cells ``running`` now and those ``waiting``: the mean cell time times the cells left
    (a running cell counts as half done), over the cells that run at once (``running``). Before any
    cell finished: None. With none running (all queued, as on a busy cluster): the observed pace,
    ``elapsed`` per cell finished.

    >>> time_left(270.0, [265.0, 267.0], running=2, waiting=26)  # 2 workers: 13.5 rounds of 266 s
    3591.0
    """
    if not cell_seconds:
        return None
    if running <= 0:
        return elapsed / len(cell_seconds) * waiting
    mean = sum(cell_seconds) / len(cell_seconds)
    return mean * (waiting + 0.5 * running) / running


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def default_sweep_dir(
    notebook: str | os.PathLike, cells: Sequence[Mapping[str, Any]], runs_dir: str | os.PathLike = "runs"
) -> Path:
    """``runs/sweeps/<stem>-<hash of the cells>``: the same command continues in the same folder."""
    digest = hashlib.sha256("\n".join(sorted(canonical_json(c) for c in cells)).encode()).hexdigest()[:8]
    return Path(runs_dir) / "sweeps" / f"{Path(notebook).stem}-{digest}"


def run_sweep(
    notebook: str | os.PathLike,
    cells: Sequence[Mapping[str, Any]],
    *,
    sweep_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike = "runs",
    executor: LocalExecutor | SlurmExecutor | None = None,
    kernel_name: str = "python3",
    timeout: float | None = None,
    aggregate: bool = True,
    log: Callable[[str], None] | None = print,
    progress_every: float = 30.0,
    poll_interval: float = 0.5,
    max_seconds: float | None = None,
) -> SweepResult:
    """Run ``notebook`` once per cell (a dict of parameters) into ``sweep_dir/cells/<cell name>/``.

    Cells whose run folder finished with the same parameters and code are skipped; other existing
    folders of the sweep's cells (failed or killed runs, older code) move to ``superseded/`` first.
    Failures are recorded in ``sweep.json`` and do not stop the other cells. Progress goes to ``log``
    when a cell ends and every ``progress_every`` seconds. With ``aggregate`` the metrics of the ok cells
    are written to ``table.csv``, ``summary.csv`` and ``summary.md``. Ctrl-C stops the workers (or
    cancels the Slurm jobs) and keeps what finished; so does ``max_seconds``, a limit on the whole sweep
    (its unfinished cells are recorded as failed).
    """
    from emlab.notebooks import notebook_parameters

    say = log or (lambda _msg: None)
    nb = Path(notebook)
    if not nb.is_file():
        raise FileNotFoundError(f"notebook {nb} does not exist")
    cells = [dict(c) for c in cells]
    if not cells:
        raise ValueError("a sweep needs at least one cell")
    names = [cell_name(c) for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"the same cell is listed twice: {', '.join(dupes)}")
    declared = notebook_parameters(nb, kernel_name)
    unknown = sorted({k for c in cells for k in c if k not in declared})
    if unknown:
        raise ValueError(
            f"{nb} declares no parameter {', '.join(map(repr, unknown))}; its parameters cell declares "
            f"{', '.join(declared) or 'nothing (tag a cell `parameters`)'}"
        )
    if any("out_dir" in c for c in cells):
        raise ValueError("out_dir is set by the sweep (each cell's run folder); do not sweep it")
    executor = executor or LocalExecutor()
    root = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(nb, cells, runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    manifest_path = root / SWEEP_FILE
    old = _read_json(manifest_path)
    if isinstance(old, dict) and old.get("notebook_stem") not in (None, nb.stem):
        raise SweepError(f"{root} is a sweep of {old.get('notebook')}, not of {nb}; choose another --out-dir")

    with _sweep_lock(root):
        earlier = (old.get("executor") or {}).get("job_ids") if isinstance(old, dict) else None
        if earlier and shutil.which("squeue"):  # a sweep driver that died leaves its Slurm jobs running
            alive = squeue_states([str(j) for j in earlier])
            if alive:
                raise SweepError(
                    f"Slurm jobs of an earlier run of this sweep are still queued or running "
                    f"({', '.join(sorted(alive)[:5])}{' ...' if len(alive) > 5 else ''}): wait for them "
                    f"or cancel them (scancel {' '.join(map(str, earlier))}), then rerun"
                )
        code = code_version(nb)
        sweep = SweepResult(root, [Cell(n, c, root / "cells" / n) for n, c in zip(names, cells)])
        created = old.get("created") if isinstance(old, dict) else None
        meta = {
            "notebook": str(nb.resolve()),
            "notebook_stem": nb.stem,
            "created": created or utc_now(),
            "code": code,
            "parameters": sorted({k for c in cells for k in c}),
            "kernel_name": kernel_name,
            "timeout": timeout,
        }

        def write_manifest(state: str) -> None:
            atomic_write_json(
                manifest_path,
                {
                    **meta,
                    "updated": utc_now(),
                    "state": state,
                    "executor": executor.describe(),
                    "counts": sweep.counts(),
                    "cells": [c.manifest(root) for c in sweep.cells],
                },
            )

        todo: list[Cell] = []
        for cell in sweep.cells:
            record = finished_record(cell.run_dir, cell.parameters, code["key"])
            if record is not None:
                cell.status, cell.skipped = "ok", True
                cell.seconds, cell.notebook_seconds = record.get("seconds"), record.get("notebook_seconds")
                continue
            if cell.run_dir.exists():  # a failed, killed or outdated attempt: keep it, out of the way
                dest = root / "superseded" / f"{cell.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                cell.run_dir.rename(dest)
            todo.append(cell)
        n_skip = len(sweep.cells) - len(todo)
        say(
            f"[sweep] {nb} -> {root}: {len(sweep.cells)} cells"
            + (f", {n_skip} already finished with the same parameters and code (reused)" if n_skip else "")
        )
        write_manifest("running")
        by_name = {c.name: c for c in todo}
        t_start = time.monotonic()
        last_progress = 0.0

        def progress(force: bool = False) -> None:
            nonlocal last_progress
            now = time.monotonic()
            if not force and now - last_progress < progress_every:
                return
            last_progress = now
            running = executor.running()
            for name in running:
                if by_name[name].status == "waiting":
                    by_name[name].status = "running"
            finished = [c for c in todo if c.status in ("ok", "failed")]
            left = len(todo) - len(finished)
            eta = ""
            durations = [c.seconds for c in finished if c.seconds]
            est = time_left(now - t_start, durations, len(running), left - len(running)) if left else None
            if est is not None:
                eta = f", ~{_fmt_seconds(est)} left"
            failed = sum(c.status == "failed" for c in todo)
            reasons = getattr(executor, "pending_reasons", lambda: [])()
            say(
                f"[sweep] {len(finished) + n_skip}/{len(sweep.cells)} done ({failed} failed), "
                f"{len(running)} running, {left - len(running)} waiting; {_fmt_seconds(now - t_start)} elapsed{eta}"
                + (f"; pending: {', '.join(reasons)}" if reasons else "")
            )

        specs = [
            {
                "name": c.name,
                "notebook": str(nb.resolve()),
                "parameters": c.parameters,
                "out_dir": str(c.run_dir),
                "code": code["key"],
                "kernel_name": kernel_name,
                "timeout": timeout,
            }
            for c in todo
        ]
        state = "finished"
        try:
            if todo:
                executor.start(specs, root)
                write_manifest("running")
                progress(force=True)
            while any(c.status in ("waiting", "running") for c in todo):
                if max_seconds is not None and time.monotonic() - t_start > max_seconds:
                    executor.cancel()
                    for c in todo:
                        if c.status in ("waiting", "running"):
                            c.status, c.error = (
                                "failed",
                                f"stopped: the sweep's time limit of {max_seconds:g} s ran out",
                            )
                    say(f"[sweep] time limit of {max_seconds:g} s ran out: stopped the unfinished cells")
                    break
                ended = executor.poll()
                for fin in ended:
                    cell = by_name[fin.name]
                    record = _read_json(cell.run_dir / CELL_FILE)
                    if isinstance(record, dict) and record.get("code") == code["key"]:
                        cell.status = "ok" if record.get("status") == "ok" else "failed"
                        cell.error = record.get("error") if cell.status == "failed" else None
                        cell.seconds, cell.notebook_seconds = record.get("seconds"), record.get("notebook_seconds")
                    else:
                        cell.status = "failed"
                        cell.error = fin.message or f"the worker wrote no {CELL_FILE}"
                    if fin.message and cell.status == "ok":  # e.g. killed after writing its record
                        cell.error = fin.message
                    mark = "ok    " if cell.status == "ok" else "FAILED"
                    first = (cell.error or "").strip().splitlines()[:1]
                    say(
                        f"[sweep] {mark} {cell.name}"
                        + (f" ({cell.seconds:.1f} s)" if cell.seconds else "")
                        + (f": {first[0]}" if first else "")
                    )
                if ended:
                    write_manifest("running")
                    progress(force=True)
                else:
                    progress()
                    time.sleep(poll_interval)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            state = "interrupted" if interrupted else "stopped by an error"
            executor.cancel()
            why = (
                "interrupted before it finished"
                if interrupted
                else f"not finished: the sweep stopped ({type(e).__name__}: {e})"
            )
            for c in todo:
                if c.status in ("waiting", "running"):
                    c.status, c.error = "failed", why
            say(f"[sweep] {state}: stopped the unfinished cells; rerun the same command to continue ({root})")
            raise
        finally:
            write_manifest(state)
        if aggregate:
            from emlab import aggregate as agg

            try:
                written = agg.write_sweep_tables(root)
                if written:
                    say(f"[sweep] aggregated the ok cells: {', '.join(str(p) for p in written)}")
            except (ValueError, KeyError) as e:
                say(f"[sweep] could not aggregate the metrics: {e}")
        executor.close()
        say(sweep.describe())
        return sweep


if __name__ == "__main__":
    sys.exit(_worker_main())


# ---------------------------------------------------------------------------------------------
# Packing: a sweep's records without its weights and samples

#: What :func:`pack_sweeps` keeps of each cell's run folder: what aggregation, the scorecard and a resumed
#: sweep read (the outcome, the parameters and code key, the metrics, the settings and the environment).
PACK_CELL_FILES = (RUN_INFO, CELL_FILE, "metrics.json", "config.json", "env.json")
#: What it keeps of a sweep folder besides the cells: the manifest and the readable summary (``table.csv`` and
#: ``summary.csv``, most of a pack's bytes, are left out: :func:`emlab.aggregate.write_sweep_tables` remakes them).
PACK_SWEEP_FILES = (SWEEP_FILE, "summary.md")
#: The marker a packed folder carries, so packing again into it updates it (and nothing else is overwritten).
PACK_MARKER = ".emlab-pack.json"


def _pack_one(src: Path, dest: Path) -> int:
    manifest = json.loads((src / SWEEP_FILE).read_text(encoding="utf-8"))
    n = 0
    for cell in manifest.get("cells", []):
        rel = cell.get("run_dir")
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise SweepError(
                f"{src / SWEEP_FILE}: cell {cell.get('name')!r} has run_dir {rel!r}, not a folder inside the sweep"
            )
        for name in PACK_CELL_FILES:
            f, copy = src / rel / name, dest / rel / name
            if f.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, copy)
            elif copy.is_file():  # gone from the source since an earlier pack (a rerun cell): not kept stale
                copy.unlink()
        n += 1
    for name in PACK_SWEEP_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return n


def pack_sweeps(source: str | os.PathLike, dest: str | os.PathLike) -> dict[str, int]:
    """Copy a sweep folder, or a folder of sweep folders (a scorecard folder of ``emlab claims-sweeps``),
    keeping only the small records: per cell :data:`PACK_CELL_FILES`, per sweep :data:`PACK_SWEEP_FILES`,
    and the top folder's own ``*.json`` files. Weights, samples, notebooks, logs and ``superseded/`` are
    left out, so the copy is a few kB a cell: small enough to commit or mail, and still a sweep folder that
    :func:`emlab.aggregate.load_table` and ``emlab claims`` read, and that :func:`run_sweep` resumes (its
    finished cells are reused when the code is the same). Returns the number of cells packed per sweep
    (``""`` for ``source`` itself when it is one sweep).

    ``dest`` must not exist, be empty, or hold an earlier pack (then it is updated: packing a sweep again
    as it goes on adds its new cells). Raises :class:`SweepError` for a ``source`` with no sweep in it.

    >>> pack_sweeps("runs/claims", "results/claims")  # doctest: +SKIP
    {'01': 30, '02': 30}
    """
    src, out = Path(source), Path(dest)
    if not src.is_dir():
        raise SweepError(f"{src}: no such folder to pack")
    if src.resolve() == out.resolve() or out.resolve().is_relative_to(src.resolve()):
        raise SweepError(f"cannot pack {src} into {out}: the copy must be outside the folder packed")
    if (src / SWEEP_FILE).is_file():
        sweeps = {"": src}
    else:
        sweeps = {d.name: d for d in sorted(src.iterdir()) if (d / SWEEP_FILE).is_file()}
        if not sweeps:
            raise SweepError(f"{src}: neither a sweep folder ({SWEEP_FILE}) nor a folder of sweep folders")
    if out.exists() and any(out.iterdir()) and not (out / PACK_MARKER).is_file():
        raise SweepError(
            f"{out} exists and is not an earlier pack (no {PACK_MARKER}): choose a new folder; nothing was written"
        )
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, d in sweeps.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        counts[name] = _pack_one(d, out / name)
    if "" not in sweeps:
        for f in sorted(src.glob("*.json")):
            shutil.copy2(f, out / f.name)
    atomic_write_json(
        out / PACK_MARKER,
        {
            "source": str(src.resolve()),
            "packed": utc_now(),
            "cells": counts,
            "kept": {"cell": list(PACK_CELL_FILES), "sweep": list(PACK_SWEEP_FILES)},
        },
    )
    return counts
