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
import getpass
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emlab.runs import atomic_write_json, to_jsonable

__all__ = [
    "CELL_FILE",
    "SWEEP_FILE",
    "Cell",
    "LocalExecutor",
    "SlurmExecutor",
    "SweepError",
    "SweepResult",
    "cell_name",
    "code_version",
    "grid",
    "parse_values",
    "read_cells",
    "run_cell",
    "run_sweep",
]

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


def _canonical(params: Mapping[str, Any]) -> str:
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
    digest = hashlib.sha256(_canonical(params).encode()).hexdigest()[:8]
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


def _now() -> str:
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
        "started": _now(),
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
    record["finished"] = _now()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CELL_FILE, to_jsonable(record))
    return record


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
        print(f"--- {_now()} cell {spec.get('name')}", file=sys.stderr, flush=True)
        record = run_cell(spec)
        print(
            f"--- {record['status']} ({record['seconds']:.1f} s)" + (f": {record['error']}" if record["error"] else ""),
            file=sys.stderr,
            flush=True,
        )
        print(f"done {spec.get('name')}", file=out, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Executors


@dataclass
class Finished:
    """An executor's report that a cell's process or job ended; ``message`` explains an abnormal end."""

    name: str
    message: str | None = None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _kill_tree(pid: int, grace: float = 5.0) -> None:
    """Terminate a process and every descendant (the papermill kernel runs in its own session)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


class _Worker:
    """One persistent worker process of :class:`LocalExecutor` and the thread reading its answers."""

    def __init__(self, index: int, threads: int, log_path: Path, answers: queue.Queue):
        env = dict(os.environ)
        env.update({var: str(threads) for var in THREAD_VARS})
        self.index = index
        self.log_path = log_path
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "emlab.sweeps"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            start_new_session=True,  # a Ctrl-C reaches the driver, which stops the workers itself
        )
        self.cell: str | None = None
        self.since = time.monotonic()
        self.ready = False
        self._reader = threading.Thread(target=self._read, args=(answers,), daemon=True)
        self._reader.start()

    def _read(self, answers: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            answers.put((self, line.strip()))
        answers.put((self, None))  # end of output: the worker exited

    def send(self, spec: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.cell, self.since = spec["name"], time.monotonic()
        self.proc.stdin.write(json.dumps(to_jsonable(dict(spec))) + "\n")
        self.proc.stdin.flush()

    def stop(self, kill: bool = False) -> None:
        if kill:
            _kill_tree(self.proc.pid)
        else:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc.pid)
        self._reader.join(timeout=10)
        self.log.close()


class LocalExecutor:
    """A pool of ``workers`` persistent worker processes on this machine, one cell each at a time.

    Each worker imports papermill and emlab once and then runs cells as they come; its kernels get
    ``threads`` OpenMP/MKL threads (default ``max(1, cores // workers)``), so torch in the workers does
    not fight over the cores. A cell running longer than ``cell_time_limit`` seconds is killed with its
    worker and kernel, recorded as failed, and a fresh worker takes the next cell. A worker that does not
    start within ``start_timeout`` seconds is an error.
    """

    kind = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads: int | None = None,
        cell_time_limit: float = 86400.0,
        start_timeout: float = 300.0,
    ):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.workers = workers
        self.threads = threads
        self.cell_time_limit = cell_time_limit
        self.start_timeout = start_timeout
        self._queue: list[dict[str, Any]] = []
        self._pool: list[_Worker] = []
        self._retired: list[_Worker] = []
        self._answers: queue.Queue = queue.Queue()
        self._spawned = 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "workers": self.workers,
            "threads": self.threads,
            "cell_time_limit": self.cell_time_limit,
        }

    @property
    def parallel(self) -> int:
        return self.workers or 1

    def start(self, specs: list[dict[str, Any]], sweep_dir: Path) -> None:
        if self.workers is None:
            self.workers = max(1, min(len(specs), _cores()))
        if self.threads is None:
            self.threads = max(1, _cores() // self.workers)
        self._logs = sweep_dir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)
        self._queue = [dict(s, threads=self.threads) for s in specs]
        for _ in range(min(self.workers, len(self._queue))):
            self._spawn()

    def _spawn(self) -> None:
        self._spawned += 1
        log = self._logs / f"worker-{self._spawned}.log"
        self._pool.append(_Worker(self._spawned, self.threads or 1, log, self._answers))

    def running(self) -> list[str]:
        return [w.cell for w in self._pool if w.cell is not None]

    def waiting(self) -> int:
        return len(self._queue)

    def _dispatch(self, w: _Worker) -> None:
        if self._queue:
            try:
                w.send(self._queue[0])
                self._queue.pop(0)
                return
            except (BrokenPipeError, OSError, ValueError):
                w.cell = None  # it died; its end-of-output answer replaces it
                return
        self._pool.remove(w)  # no more work: let it exit on its own, reaped in close()
        with contextlib.suppress(OSError, ValueError):
            w.proc.stdin.close()  # type: ignore[union-attr]
        self._retired.append(w)

    def poll(self) -> list[Finished]:
        done: list[Finished] = []
        while True:
            try:
                w, line = self._answers.get_nowait()
            except queue.Empty:
                break
            if w not in self._pool:
                continue
            if line == "ready":
                w.ready = True
                self._dispatch(w)
            elif line is not None and line.startswith("done "):
                done.append(Finished(line[5:]))
                w.cell = None
                self._dispatch(w)
            elif line is None:  # the worker exited
                self._pool.remove(w)
                w.stop()
                rc = w.proc.returncode
                msg = f"worker {w.index} exited (code {rc}); log {w.log_path}:\n{_tail(w.log_path)}"
                if w.cell is not None:
                    done.append(Finished(w.cell, msg))
                elif not w.ready:
                    self.cancel()
                    raise SweepError(f"a sweep worker could not start: {msg}")
                if self._queue and len(self._pool) < (self.workers or 1):
                    self._spawn()
        now = time.monotonic()
        for w in list(self._pool):
            if not w.ready and now - w.since > self.start_timeout:
                self.cancel()
                raise SweepError(f"a sweep worker did not start within {self.start_timeout:g} s; log {w.log_path}")
            if w.cell is not None and now - w.since > self.cell_time_limit:
                cell = w.cell
                self._pool.remove(w)
                w.stop(kill=True)
                done.append(
                    Finished(
                        cell, f"killed after the cell time limit of {self.cell_time_limit:g} s (log: {w.log_path})"
                    )
                )
                if self._queue:
                    self._spawn()
        return done

    def cancel(self) -> None:
        self._queue.clear()
        for w in self._pool + self._retired:
            w.stop(kill=True)
        self._pool.clear()
        self._retired.clear()

    def close(self) -> None:
        """Wait for the workers that ran out of work to exit (30 s each at most, then killed)."""
        for w in self._retired:
            w.stop()
        self._retired.clear()


def _squeue(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """``{task id: (state, reason)}`` of the listed Slurm jobs still queued or running; None if squeue failed."""
    if not job_ids:
        return {}
    try:
        res = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:  # every listed job has ended and been purged
            return {}
        return None
    out = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


class SlurmExecutor:
    """Cells as one Slurm array job through submitit: ``partition``, ``time_min`` per cell, ``mem_gb``,
    ``gpus_per_cell``, ``cpus_per_cell`` (also the kernel's torch threads) and ``array_parallelism``
    (cells running at once). ``queue_timeout`` bounds how long the sweep waits for cells that are still
    pending in the queue; ``extra`` passes further ``sbatch`` options (``{"qos": "high"}``). The queue is
    read with ``squeue`` every ``poll_interval`` seconds; a job that left it without a result (killed,
    out of time or memory) is failed after ``result_grace`` seconds, with the end of its log.
    """

    kind = "slurm"

    def __init__(
        self,
        *,
        partition: str | None = None,
        time_min: int = 60,
        mem_gb: float | None = None,
        gpus_per_cell: int | None = None,
        cpus_per_cell: int = 1,
        array_parallelism: int = 64,
        queue_timeout: float = 6 * 3600,
        poll_interval: float = 5.0,
        squeue_patience: float = 600.0,
        result_grace: float = 15.0,
        extra: Mapping[str, Any] | None = None,
    ):
        self.partition = partition
        self.time_min = time_min
        self.mem_gb = mem_gb
        self.gpus_per_cell = gpus_per_cell
        self.cpus_per_cell = cpus_per_cell
        self.array_parallelism = array_parallelism
        self.queue_timeout = queue_timeout
        self.poll_interval = poll_interval
        self.squeue_patience = squeue_patience
        self.result_grace = result_grace
        self._last_squeue = -math.inf
        self._seen_queue = False
        self._squeue_ok = time.monotonic()
        self.extra = dict(extra or {})
        self._jobs: dict[str, Any] = {}
        self.job_ids: list[str] = []
        self._gone: dict[str, float] = {}
        self._states: dict[str, tuple[str, str]] = {}
        self._started = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "partition": self.partition,
            "time_min": self.time_min,
            "mem_gb": self.mem_gb,
            "gpus_per_cell": self.gpus_per_cell,
            "cpus_per_cell": self.cpus_per_cell,
            "array_parallelism": self.array_parallelism,
            "job_ids": self.job_ids,
        }

    @property
    def parallel(self) -> int:
        return max(1, min(self.array_parallelism, len(self._jobs) or 1))

    def sbatch_parameters(self, job_name: str) -> dict[str, Any]:
        """The parameters of submitit's ``SlurmExecutor`` (its ``sbatch`` options) for one cell."""
        params: dict[str, Any] = {
            "time": int(self.time_min),
            "cpus_per_task": int(self.cpus_per_cell),
            "array_parallelism": int(self.array_parallelism),
            "job_name": job_name[:64],
            "stderr_to_stdout": True,
        }
        if self.partition:
            params["partition"] = self.partition
        if self.mem_gb:
            params["mem"] = f"{int(math.ceil(self.mem_gb * 1024))}M"
        if self.gpus_per_cell:
            params["gpus_per_node"] = int(self.gpus_per_cell)
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return params

    def start(self, specs: list[dict[str, Any]], sweep_dir: Path) -> None:
        try:
            import submitit
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise SweepError("the Slurm executor needs submitit: pip install submitit") from e
        if shutil.which("sbatch") is None:
            raise SweepError("the Slurm executor needs sbatch on PATH (no Slurm client on this machine)")
        ex = submitit.SlurmExecutor(folder=sweep_dir / "slurm" / "%j", max_num_timeout=0)
        params = self.sbatch_parameters(f"emlab-sweep-{sweep_dir.name}")
        ex.update_parameters(**params)
        specs = [dict(s, threads=self.cpus_per_cell) for s in specs]
        try:
            jobs = ex.map_array(run_cell, specs)
        except Exception as e:  # noqa: BLE001 - sbatch's message is the useful part
            raise SweepError(f"sbatch refused the sweep's array job: {e}") from e
        self._jobs = {s["name"]: j for s, j in zip(specs, jobs)}
        self.job_ids = sorted({j.job_id.split("_")[0] for j in jobs})
        self._started = time.monotonic()

    def running(self) -> list[str]:
        return [n for n, j in self._jobs.items() if self._states.get(j.job_id, ("",))[0] == "RUNNING"]

    def waiting(self) -> int:
        return sum(self._states.get(j.job_id, ("PENDING",))[0] == "PENDING" for j in self._jobs.values())

    def pending_reasons(self) -> list[str]:
        return sorted({r for s, r in self._states.values() if s == "PENDING" and r and r != "None"})

    def poll(self) -> list[Finished]:
        if not self._jobs:
            return []
        now = time.monotonic()
        states = None
        if now - self._last_squeue >= self.poll_interval:  # squeue at most every poll_interval seconds
            self._last_squeue = now
            states = _squeue(sorted({j.job_id.split("_")[0] for j in self._jobs.values()}))
            if states is not None:
                self._states, self._squeue_ok, self._seen_queue = states, now, True
            elif now - self._squeue_ok > self.squeue_patience:
                raise SweepError(
                    f"squeue has not answered for {self.squeue_patience:g} s (is slurmctld up?); "
                    f"the sweep's jobs {', '.join(self.job_ids)} may still run: check them with squeue"
                )
        done = []
        for name, job in list(self._jobs.items()):
            result_file = job.paths.result_pickle
            if result_file.exists():
                done.append(Finished(name))
            elif self._seen_queue and job.job_id not in self._states:
                # left the queue without a result: give the shared file system a moment
                first = self._gone.setdefault(name, now)
                if now - first < self.result_grace:
                    continue
                log = _tail(job.paths.stdout, 20) or _tail(job.paths.stderr, 20)
                done.append(
                    Finished(name, f"Slurm job {job.job_id} ended without a result; log {job.paths.stdout}:\n{log}")
                )
            elif now - self._started > self.queue_timeout and self._states.get(job.job_id, ("",))[0] == "PENDING":
                reason = self._states[job.job_id][1]
                self._cancel([job.job_id])
                done.append(
                    Finished(name, f"still pending after {self.queue_timeout:g} s (reason: {reason}); cancelled")
                )
            else:
                continue
            del self._jobs[name]
        return done

    def _cancel(self, ids: Sequence[str]) -> None:
        if ids:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)

    def cancel(self) -> None:
        self._cancel(sorted({j.job_id.split("_")[0] for j in self._jobs.values()}))
        self._jobs.clear()

    def close(self) -> None:
        """Nothing to wait for: finished Slurm jobs are gone."""


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
    if _canonical(record.get("parameters") or {}) != _canonical(params):
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
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    digest = hashlib.sha256("\n".join(sorted(_canonical(c) for c in cells)).encode()).hexdigest()[:8]
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
            alive = _squeue([str(j) for j in earlier])
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
            "created": created or _now(),
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
                    "updated": _now(),
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
            if finished and left:  # the observed pace, overheads and queueing included
                eta = f", ~{_fmt_seconds((now - t_start) / len(finished) * left)} left"
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
