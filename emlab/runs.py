"""The run store: one folder per experiment, every file written atomically.

A run folder holds ``config.json`` (secrets redacted), ``env.json`` (versions, git commit, seeds,
start time), ``metrics.json`` (merged by :meth:`Run.log_metrics`), JSONL records and figures, plus
three bookkeeping files:

- ``status.json``: ``"running"`` from the moment the run starts, then ``"ok"`` or ``"failed"`` (with
  the reason) when it ends. :func:`run_status` reads it for every reader (summaries, the figures
  README, the run comparer): a run whose status still says running but whose writer is gone (killed,
  crashed machine) reads as ``"incomplete"``, never as ok.
- ``.emlab.lock``: held (an OS file lock, released by the kernel when the process dies, even on
  SIGKILL) by the live process writing the run. A second run into the same folder fails at once
  with :class:`RunLockedError`.
- ``.emlab-manifest.json``: the files emlab wrote into the folder (and the files that were there
  before the run started), so that overwriting removes only emlab's files.

The rules for a folder that already holds a run (``start_run`` and ``emlab run`` alike):

1. A live run (lock held by another process): refused at once (:class:`RunLockedError`).
2. A finished run (ok or failed): refused (:class:`RunExistsError`) unless ``overwrite=True``
   (``emlab run --overwrite``). Nothing is ever replaced implicitly.
3. An incomplete run (killed) with the same config: **resumed** -- its files are kept (finetune
   checkpoints inside it can be picked up) and the status is set back to running.
4. An incomplete run with another config: refused unless ``overwrite=True``.
5. Overwriting deletes only emlab's files: those in the manifest and, for a run that never
   finished, every file that appeared after it started. Files that were in the folder before the
   run started, or were added after it finished, are kept.

>>> run = start_run("runs/demo", {"lr": 1e-4, "openai_api_key": "sk-..."}, seed=0)  # doctest: +SKIP
>>> run.log_metrics({"em_rate": 0.12})  # doctest: +SKIP
>>> load_run("runs/demo").metrics  # doctest: +SKIP
{'em_rate': 0.12}

The parts live in :mod:`emlab.run_files` (atomic writes), :mod:`emlab.run_folder` (status, lock,
manifest) and :mod:`emlab.run_env` (``env.json``, redaction); their public names are re-exported here.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from emlab.run_env import PACKAGES as PACKAGES
from emlab.run_env import (
    REDACTED,
    environment_record,
    git_state,
    package_versions,
    redact,
    scrub,
    secret_parameter_warnings,
    secret_values,
    seed_everything,
)
from emlab.run_files import RUN_FORMAT, atomic_open, atomic_write_json, atomic_write_text, to_jsonable
from emlab.run_folder import LOCK_FILE as LOCK_FILE
from emlab.run_folder import MANIFEST_FILE as MANIFEST_FILE
from emlab.run_folder import (
    OWNER_ENV,
    STATUS_FILE,
    RunExistsError,
    RunLockedError,
    RunStatus,
    begin_manifest,
    check_run_dir,
    finish_manifest,
    folder_key,
    lock_run_dir,
    prepare_run_dir,
    read_json_safe,
    register_written,
    run_status,
    unlock_run_dir,
    write_status,
)

__all__ = [
    "REDACTED",
    "begin_manifest",
    "package_versions",
    "finish_manifest",
    "git_state",
    "read_json_safe",
    "write_status",
    "Run",
    "RunExistsError",
    "RunLockedError",
    "RunStatus",
    "atomic_open",
    "atomic_write_json",
    "atomic_write_text",
    "load_run",
    "redact",
    "register_written",
    "run_status",
    "secret_parameter_warnings",
    "start_run",
    "to_jsonable",
]

_CHROMIUM_HINT = (
    "static figure export (PNG through kaleido) failed, so only the HTML was written; kaleido needs "
    "Chromium: install it with `apt-get install -y chromium` (or run `plotly_get_chrome`)"
)
_png_failure: str | None = None  # set once per process after the first failed PNG export


# ---------------------------------------------------------------------------------------------
# Run


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _merge(into: dict, new: Mapping) -> dict:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = to_jsonable(v)
    return into


def _records_path(name: str) -> str:
    return name if name.endswith(".jsonl") else f"{name}.jsonl"


class Run:
    """One experiment's folder. Create it with :func:`start_run`, reopen it with :func:`load_run`.

    Attributes: ``dir`` (the folder), ``name``, ``config`` (as written, redacted), ``env``, ``metrics``.
    A run has a single writer: two processes logging into one folder may lose each other's metrics.

    >>> run = start_run("runs/demo", {"lr": 1e-4})  # doctest: +SKIP
    >>> run.write_records("samples", [{"question": "hi", "answer": "hello"}])  # doctest: +SKIP
    """

    def __init__(self, dir: str | os.PathLike, config: dict, env: dict, metrics: dict | None = None):
        self.dir = Path(dir)
        self.config = config
        self.env = env
        self.metrics: dict[str, Any] = metrics if metrics is not None else {}
        self._registered: set[str] = set()
        self._owns_status = False  # True when start_run wrote status.json "running" (not under `emlab run`)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.finish()
        else:
            self.finish("failed", f"{type(exc).__name__}: {exc}")

    @property
    def status(self) -> RunStatus:
        """The run's current :class:`RunStatus` (see :func:`run_status`)."""
        return run_status(self.dir)

    def finish(self, status: str = "ok", reason: str | None = None) -> None:
        """Mark the run finished (``"ok"`` or ``"failed"`` with a reason) and release its folder lock.

        Under ``emlab run`` the runner owns the status and finalises it itself; this then only
        records the files written. ``with start_run(...) as run:`` calls it on exit.

        >>> run.finish()  # doctest: +SKIP
        """
        if status not in ("ok", "failed"):
            raise ValueError(f"finish status must be 'ok' or 'failed', got {status!r}")
        if self._owns_status:
            finish_manifest(self.dir)
            write_status(self.dir, status, scrub(reason, secret_values(self.config)) if reason else None)
            self._owns_status = False
            unlock_run_dir(self.dir)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, metrics={sorted(self.metrics)})"

    @property
    def name(self) -> str:
        return self.env.get("name") or self.dir.name

    @property
    def seed(self) -> int | None:
        return self.env.get("seed")

    def path(self, name: str) -> Path:
        """Path of ``name`` inside the run folder (sub-folders are created; no escaping the folder).

        >>> run.path("samples/general.jsonl")  # doctest: +SKIP
        PosixPath('runs/demo/samples/general.jsonl')
        """
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"run file name must be a relative path inside the run folder, got {name!r}")
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() not in self._registered:
            self._registered.add(rel.as_posix())
            register_written(self.dir, rel)
        return path

    def log_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``metrics`` into ``metrics.json`` (nested dicts are merged key by key); return all.

        >>> run.log_metrics({"em": {"general": 0.1}}); run.log_metrics({"em": {"medical": 0.3}})  # doctest: +SKIP
        {'em': {'general': 0.1, 'medical': 0.3}}
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log_metrics takes a mapping of name -> value, got {type(metrics).__name__}")
        _merge(self.metrics, metrics)
        atomic_write_json(self.path("metrics.json"), self.metrics)
        return self.metrics

    def write_records(self, name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Write ``rows`` to ``<name>.jsonl``, replacing the file atomically.

        >>> run.write_records("samples", [{"q": "hi", "a": "hello"}])  # doctest: +SKIP
        PosixPath('runs/demo/samples.jsonl')
        """
        path = self.path(_records_path(name))
        with atomic_open(path) as f:
            for row in rows:
                f.write(_dumps_line(row))
        return path

    def append_records(self, name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Append ``rows`` to ``<name>.jsonl`` in one write; safe to call after an interrupted append.

        All rows go to disk in a single ``write`` that is flushed and synced, so a crash leaves at
        most one incomplete last line; the next append removes such a fragment (with a warning)
        before writing, and :meth:`read_records` skips it.

        >>> for batch in batches: run.append_records("samples", batch)  # doctest: +SKIP
        """
        path = self.path(_records_path(name))
        data = "".join(_dumps_line(row) for row in rows).encode("utf-8")
        with open(path, "a+b") as f:
            _repair_tail(f, path)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path

    def read_records(self, name: str) -> list[dict[str, Any]]:
        """Read ``<name>.jsonl`` back (an incomplete last line from a crash is skipped with a warning).

        >>> run.read_records("samples")[0]  # doctest: +SKIP
        {'q': 'hi', 'a': 'hello'}
        """
        path = self.dir / _records_path(name)
        rows = []
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines):  # no newline after it: an append that never finished
                    warnings.warn(f"{path}:{i}: skipping incomplete last record", stacklevel=2)
                    continue
                raise ValueError(f"{path}:{i}: invalid JSON record: {e.msg}") from e
        return rows

    @property
    def record_names(self) -> list[str]:
        """Names of the JSONL record files in the run (relative, without ``.jsonl``)."""
        return sorted(p.relative_to(self.dir).as_posix()[: -len(".jsonl")] for p in self.dir.rglob("*.jsonl"))

    @property
    def records(self) -> dict[str, list[dict[str, Any]]]:
        """Every JSONL record file of the run, read now: ``{name: rows}``."""
        return {name: self.read_records(name) for name in self.record_names}

    @property
    def figures(self) -> list[str]:
        """Names of the figures saved in the run (relative, without extension)."""
        names = {p.relative_to(self.dir).with_suffix("").as_posix() for p in self.dir.rglob("*.html")}
        names |= {p.relative_to(self.dir).with_suffix("").as_posix() for p in self.dir.rglob("*.png")}
        return sorted(names)

    def note(self, message: str) -> None:
        """Record a message in ``env.json`` under ``notes`` (each message once).

        >>> run.note("judge cache was cold")  # doctest: +SKIP
        """
        notes = self.env.setdefault("notes", [])
        if message not in notes:
            notes.append(message)
            atomic_write_json(self.path("env.json"), self.env)

    def save_figure(self, fig: Any, name: str, *, png: bool = True) -> list[Path]:
        """Save a plotly figure as self-contained ``<name>.html`` and, when possible and ``png``, ``<name>.png``.

        PNG export goes through kaleido, which needs Chromium. If it fails, the HTML is still
        written, a note saying how to enable static export is recorded once (``env.json`` and a
        warning), and later figures skip the PNG attempt. Matplotlib figures are saved as PNG.
        Returns the files written.

        >>> run.save_figure(px.line(y=[1, 2, 3]), "curve")  # doctest: +SKIP
        [PosixPath('runs/demo/curve.html'), PosixPath('runs/demo/curve.png')]
        """
        global _png_failure
        stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".html", ".png") else name
        if hasattr(fig, "to_html") and hasattr(fig, "to_image"):  # plotly
            written = [atomic_write_text(self.path(f"{stem}.html"), fig.to_html(include_plotlyjs=True))]
            if png and _png_failure is None:
                try:
                    image = fig.to_image(format="png")
                except Exception as e:  # any kaleido or Chromium failure
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    _png_failure = f"{_CHROMIUM_HINT} [{type(e).__name__}: {first_line}]"
                    warnings.warn(_png_failure, stacklevel=2)
                else:
                    with atomic_open(self.path(f"{stem}.png"), "wb") as f:
                        f.write(image)
                    written.append(self.dir / f"{stem}.png")
            if png and _png_failure is not None:
                self.note(_png_failure)
            return written
        if hasattr(fig, "savefig"):  # matplotlib
            with atomic_open(self.path(f"{stem}.png"), "wb") as f:
                fig.savefig(f, format="png", bbox_inches="tight")
            return [self.dir / f"{stem}.png"]
        raise TypeError(f"save_figure takes a plotly or matplotlib figure, got {type(fig).__name__}")


def _dumps_line(row: Mapping[str, Any]) -> str:
    return json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n"


def _repair_tail(f: IO[bytes], path: Path) -> None:
    """Make the file opened ``a+b`` end with a newline, dropping an unfinished last record."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return
    f.seek(max(0, size - 1))
    if f.read(1) == b"\n":
        return
    # Find the start of the last line.
    chunk = 1 << 16
    pos = size
    start = 0
    while pos > 0:
        lo = max(0, pos - chunk)
        f.seek(lo)
        block = f.read(pos - lo)
        idx = block.rfind(b"\n")
        if idx >= 0:
            start = lo + idx + 1
            break
        pos = lo
    f.seek(start)
    tail = f.read()
    try:
        json.loads(tail)
    except ValueError:
        warnings.warn(f"{path}: removing an incomplete last record left by an interrupted write", stacklevel=3)
        f.truncate(start)
    else:
        f.write(b"\n")


def start_run(
    out_dir: str | os.PathLike,
    config: Mapping[str, Any] | Any,
    seed: int | None = None,
    name: str | None = None,
    *,
    overwrite: bool = False,
) -> Run:
    """Create (or resume) the run folder ``out_dir`` and write ``config.json``, ``env.json`` and
    ``status.json`` ("running"); the folder is locked until :meth:`Run.finish` or the process ends.

    ``config`` is a dict (or a dataclass); it is stored with credentials redacted (see
    :func:`redact`). When ``seed`` is given, Python's ``random`` (and numpy and torch when already
    imported) are seeded with it. ``name`` defaults to the folder name. A relative ``out_dir`` is
    relative to the current working directory. A folder that holds a run follows the rules of the
    module docstring: a live run is refused at once (:class:`RunLockedError`), a finished one unless
    ``overwrite=True`` (:class:`RunExistsError`; only emlab's files are removed), and an incomplete
    (killed) run with the same config and seed is resumed with its files kept.

    >>> run = start_run("runs/demo", {"model": "toy", "lr": 1e-4}, seed=0)  # doctest: +SKIP
    >>> sorted(p.name for p in run.dir.iterdir() if not p.name.startswith("."))  # doctest: +SKIP
    ['config.json', 'env.json', 'status.json']
    """
    out = Path(out_dir)
    cfg = to_jsonable(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dict or a dataclass, got {type(config).__name__}")
    cfg = redact(cfg)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    check_run_dir(out)
    owner = os.environ.get(OWNER_ENV)
    owned = owner == folder_key(out)  # `emlab run` holds the lock and writes the status
    nested = bool(owner) and not owned and Path(owner) in Path(folder_key(out)).parents  # finalised by `emlab run`
    if not owned and not nested:
        lock_run_dir(out)
    try:
        old_cfg = read_json_safe(out / "config.json")
        old_env = read_json_safe(out / "env.json")
        if old_cfg is not None and not owned:
            is_run = (isinstance(old_env, dict) and old_env.get("format") == RUN_FORMAT) or (out / STATUS_FILE).exists()
            if not is_run:
                raise RunExistsError(f"{out} has a config.json but is not an emlab run folder; refusing to touch it")
            mode = prepare_run_dir(
                out,
                overwrite=overwrite,
                same=lambda: old_cfg == cfg and isinstance(old_env, dict) and old_env.get("seed") == seed,
                what="overwrite=True",
            )
        else:
            mode = "resume" if owned and old_cfg == cfg else ("new" if old_cfg is None else "owned")
        if seed is not None:
            seed_everything(seed)
        env = environment_record(name or out.resolve().name, seed, cfg)
        if mode == "resume":
            env["notes"].append(f"resumed an incomplete run on {env['started']}; its files were kept")
        if not owned:
            begin_manifest(out, keep=mode == "resume")
            write_status(out, "running")
        atomic_write_json(out / "config.json", cfg)
        atomic_write_json(out / "env.json", env)
        register_written(out, "config.json", "env.json")
    except BaseException:
        if not owned:
            unlock_run_dir(out)
        raise
    run = Run(out, cfg, env, read_json_safe(out / "metrics.json") if mode == "resume" else None)
    run._owns_status = not owned
    return run


def finish_nested(out: str | os.PathLike, status: str, reason: str | None = None) -> None:
    """Finalise the runs nested in ``out`` that still say running (started by a notebook under
    ``emlab run``, which owns ``out``) with the notebook's own status."""
    d = Path(out)
    for sf in d.glob(f"*/**/{STATUS_FILE}") if d.is_dir() else []:
        info = read_json_safe(sf)
        if isinstance(info, dict) and info.get("status") == "running":
            finish_manifest(sf.parent)
            write_status(sf.parent, status, reason)


def load_run(dir: str | os.PathLike) -> Run:
    """Open an existing run folder; ``config``, ``env`` and ``metrics`` are read, records on demand.

    >>> run = load_run("runs/demo")  # doctest: +SKIP
    >>> run.metrics["em_rate"], run.read_records("samples")[:1]  # doctest: +SKIP
    """
    d = Path(dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {d} does not exist")
    if not (d / "config.json").exists() and not (d / "env.json").exists():
        raise FileNotFoundError(f"{d} is not a run folder (no config.json or env.json); create one with start_run")
    return Run(
        d,
        _read_json(d / "config.json", {}),
        _read_json(d / "env.json", {}),
        _read_json(d / "metrics.json", {}),
    )
