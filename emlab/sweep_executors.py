"""Sweep executors: a pool of local worker processes and a Slurm array job through submitit.

The executors of :mod:`emlab.sweeps` (which re-exports them). Each takes the specs of the cells to
run (:func:`emlab.sweep_cells.run_cell`'s argument) and reports :class:`Finished` cells as they end.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emlab.runs import to_jsonable
from emlab.sweep_cells import THREAD_VARS, SweepError, run_cell


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


def squeue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
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
            states = squeue_states(sorted({j.job_id.split("_")[0] for j in self._jobs.values()}))
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
