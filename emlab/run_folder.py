"""Run-folder bookkeeping: ``status.json``, the folder lock and the manifest of emlab's files.

The rules these implement (live, finished, incomplete and overwritten runs) are in :mod:`emlab.runs`'s
docstring; public names are re-exported there.

>>> run_status("runs/demo").describe()  # doctest: +SKIP
'ok'
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emlab.run_files import RUN_FORMAT, atomic_write_json

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "OWNER_ENV",
    "STATUS_FILE",
    "RunExistsError",
    "RunLockedError",
    "RunStatus",
    "begin_manifest",
    "check_run_dir",
    "finish_manifest",
    "folder_key",
    "lock_run_dir",
    "prepare_run_dir",
    "read_json_safe",
    "register_written",
    "run_status",
    "unlock_run_dir",
    "write_status",
]

STATUS_FILE = "status.json"
MANIFEST_FILE = ".emlab-manifest.json"
LOCK_FILE = ".emlab.lock"
#: Set by ``emlab run`` for its kernel: the run folder it has locked and whose status it writes,
#: so that ``start_run`` inside the notebook neither locks it again nor rewrites its status.
OWNER_ENV = "EMLAB_RUN_OWNER"
_BOOKKEEPING = frozenset({STATUS_FILE, MANIFEST_FILE, LOCK_FILE})
_HELD: dict[str, Any] = {}  # resolved folder -> the FileLock this process holds on it


class RunLockedError(RuntimeError):
    """Another live process is writing a run into this folder."""


class RunExistsError(FileExistsError):
    """The folder holds a run that would be replaced; pass ``overwrite=True`` to replace it."""


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What :func:`run_status` found: ``status`` is ``"ok"``, ``"failed"``, ``"running"`` (its writer
    is alive), ``"incomplete"`` (it started but never finished: killed or crashed), ``"unknown"`` (a
    ``metrics.json`` alone, not written through emlab's run store) or ``"empty"`` (no run)."""

    status: str
    reason: str | None = None
    started: str | None = None
    finished: str | None = None

    @property
    def complete(self) -> bool:
        """True for a run that finished (ok or failed)."""
        return self.status in ("ok", "failed")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """``ok``, ``failed: reason``, ``incomplete: reason``..."""
        return self.status + (f": {self.reason}" if self.reason else "")


def read_json_safe(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a run folder's optional files)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def folder_key(d: Path) -> str:
    """The resolved path of run folder ``d`` as a string: the key of its lock and of ``EMLAB_RUN_OWNER``."""
    return str(Path(d).resolve())


def _is_live(d: Path) -> bool:
    """True when another process holds the folder's lock (this process's own locks do not count)."""
    from filelock import FileLock, Timeout

    if folder_key(d) in _HELD:
        return False
    if not (d / LOCK_FILE).exists():  # a run nested in a live `emlab run` folder is as live as it
        up = next((p for p in list(d.parents)[:3] if (p / LOCK_FILE).exists()), None)
        return up is not None and (up / STATUS_FILE).exists() and _is_live(up)
    probe = FileLock(str(d / LOCK_FILE), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    except OSError:  # a read-only folder: nobody can be writing a run into it
        return False
    probe.release()
    return False


def run_status(dir: str | os.PathLike) -> RunStatus:
    """The status of the run in ``dir``; every reader of run folders uses this.

    ``status.json`` says ``running`` while a run is written; when its writer is gone (the folder's lock
    is free) the run reads as ``incomplete``. Folders written before ``status.json`` existed fall back
    to ``notebook.json``; a run folder with neither reads as incomplete, never as ok.

    >>> run_status("runs/02_defences/20250101-120000")  # doctest: +SKIP
    RunStatus(status='ok', reason=None, started='2025-01-01T12:00:00+00:00', finished='...')
    """
    d = Path(dir)
    info = read_json_safe(d / STATUS_FILE)
    if isinstance(info, dict) and info.get("status"):
        status, reason = str(info["status"]), info.get("reason")
        if status == "running":
            if folder_key(d) in _HELD or _is_live(d) or os.environ.get(OWNER_ENV) == folder_key(d):
                return RunStatus("running", None, info.get("started"))
            status = "incomplete"
            reason = "it started but never finished (the process was killed or crashed)"
        return RunStatus(status, reason, info.get("started"), info.get("finished"))
    nb = read_json_safe(d / "notebook.json")
    if isinstance(nb, dict) and nb.get("status") in ("ok", "failed"):
        return RunStatus(nb["status"], nb.get("error"), nb.get("started"))
    if any((d / f).exists() for f in ("config.json", "env.json", "notebook.json")):
        return RunStatus("incomplete", "no status.json: the run never recorded that it finished")
    if (d / "metrics.json").exists():
        return RunStatus("unknown", "a metrics.json without emlab's run files")
    return RunStatus("empty")


def write_status(d: Path, status: str, reason: str | None = None, *, started: str | None = None) -> None:
    """Write ``status.json`` of run folder ``d`` (running / finished / failed, with the reason and times)."""
    old = read_json_safe(d / STATUS_FILE)
    old = old if isinstance(old, dict) else {}
    info = {
        "status": status,
        "reason": reason,
        "started": started or (old.get("started") if status != "running" else None) or _now(),
        "finished": None if status == "running" else _now(),
        "pid": os.getpid(),
        "host": platform.node(),
    }
    atomic_write_json(d / STATUS_FILE, info)


def _files(d: Path) -> set[str]:
    """Every file under ``d`` (relative POSIX paths), bookkeeping and temporary files excluded."""
    out = set()
    for p in d.rglob("*"):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and rel not in _BOOKKEEPING and not (p.name.startswith(".") and p.name.endswith(".tmp")):
            out.add(rel)
    return out


def begin_manifest(d: Path, *, keep: bool) -> None:
    """Start the manifest: the files already in the folder are the user's (unless resuming)."""
    old = read_json_safe(d / MANIFEST_FILE)
    if keep and isinstance(old, dict):
        return
    atomic_write_json(d / MANIFEST_FILE, {"preexisting": sorted(_files(d)), "written": [], "started": _now()})


def register_written(dir: str | os.PathLike, *names: str | os.PathLike) -> None:
    """Record that emlab wrote ``names`` (files or folders, relative to the run folder ``dir``).

    Overwriting a run deletes exactly these (see :mod:`emlab.runs`). :class:`Run` registers
    everything written through :meth:`Run.path`; call this for files written another way.

    >>> register_written("runs/demo", "checkpoints/sft")  # doctest: +SKIP
    """
    d = Path(dir)
    m = read_json_safe(d / MANIFEST_FILE)
    if not isinstance(m, dict):
        m = {"preexisting": [], "written": [], "started": _now()}
    written = set(m.get("written") or [])
    new = set()
    for name in names:
        p = Path(name)
        rel = (p.resolve().relative_to(d.resolve()) if p.is_absolute() else p).as_posix()
        new.add(rel)
    if new <= written:
        return
    m["written"] = sorted(written | new)
    atomic_write_json(d / MANIFEST_FILE, m)


def finish_manifest(d: Path) -> None:
    """At the end of a run: every file that appeared since it started is emlab's."""
    m = read_json_safe(d / MANIFEST_FILE)
    if not isinstance(m, dict):
        return
    pre = set(m.get("preexisting") or [])
    m["written"] = sorted(set(m.get("written") or []) | (_files(d) - pre))
    m["finished"] = _now()
    atomic_write_json(d / MANIFEST_FILE, m)


def _remove_emlab_files(d: Path) -> list[str]:
    """Delete what emlab wrote into ``d`` (see :mod:`emlab.runs`); return the removed paths."""
    m = read_json_safe(d / MANIFEST_FILE)
    if not isinstance(m, dict):  # a run from before the manifest: it was all emlab's
        env = read_json_safe(d / "env.json")
        if not (isinstance(env, dict) and env.get("format") == RUN_FORMAT) and not (d / "notebook.json").exists():
            raise RunExistsError(f"{d} has a config.json but is not an emlab run folder; refusing to delete it")
        m = {"preexisting": [], "written": sorted(_files(d))}
    pre = set(m.get("preexisting") or [])
    doomed = set(m.get("written") or [])
    if not m.get("finished"):  # killed: everything that appeared after it started
        doomed |= _files(d) - pre
    removed = []
    for rel in sorted(doomed, key=lambda r: -len(Path(r).parts)):
        if rel in pre or rel in _BOOKKEEPING or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue  # never outside the folder
        p = d / rel
        if p.is_dir() and not p.is_symlink():
            inner_pre = [x for x in pre if x.startswith(rel + "/")]
            if inner_pre:  # a folder holding user files: remove only emlab's files in it
                for f in sorted(_files(p)):
                    if f"{rel}/{f}" not in pre:
                        (p / f).unlink()
            else:
                shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(rel)
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        rel = sub.relative_to(d).as_posix()
        if not any(x == rel or x.startswith(rel + "/") for x in pre):
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty
    for f in (STATUS_FILE, MANIFEST_FILE):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    return removed


def check_run_dir(out: Path) -> Path:
    """Create ``out`` if needed and check that a run can be written there; a clear error otherwise.

    Raises :class:`NotADirectoryError` (a file is in the way) or :class:`PermissionError`.
    """
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"run folder {out}: {parent} is a file, not a folder; choose another out_dir")
        if parent.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PermissionError(f"run folder {out} cannot be created: {e.strerror} ({e.filename})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"run folder {out} is not writable; choose another out_dir")
    return out


def lock_run_dir(out: Path) -> Any:
    """Take the folder's lock at once (a :class:`RunLockedError` when another live process holds it).

    Returns the held ``filelock.FileLock``; it is released by :func:`unlock_run_dir` or when the
    process ends (even on SIGKILL).
    """
    from filelock import FileLock, Timeout

    key = folder_key(out)
    old = _HELD.pop(key, None)
    if old is not None:  # an earlier run of this same process that never finished (a notebook cell rerun)
        old.release(force=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        info = read_json_safe(out / STATUS_FILE) or {}
        who = f" (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})" if info else ""
        raise RunLockedError(
            f"{out} is in use by a live run{who}; wait for it to finish or choose another out_dir"
        ) from None
    _HELD[key] = lock
    return lock


def unlock_run_dir(out: Path) -> None:
    """Release the lock this process holds on ``out`` (no-op when it holds none)."""
    lock = _HELD.pop(folder_key(out), None)
    if lock is not None:
        lock.release(force=True)


def prepare_run_dir(out: Path, *, overwrite: bool, same: Callable[[], bool], what: str) -> str:
    """Apply the folder rules (:mod:`emlab.runs`) to a locked ``out``; return ``"new"``, ``"resume"``
    or ``"overwrite"``. ``same()`` tells whether the folder's run has the same config as the new one.
    Raises :class:`RunExistsError` when the folder's run must not be replaced."""
    prior = run_status(out)
    if prior.status == "running" and folder_key(out) in _HELD:
        prior = RunStatus("incomplete", "an earlier run of this process never finished")
    if prior.status == "empty":
        return "new"
    if overwrite:
        _remove_emlab_files(out)
        return "overwrite"
    if prior.complete:
        raise RunExistsError(
            f"{out} already holds a finished run (status {prior.status}, started {prior.started}); choose "
            f"another out_dir, or replace it with {what} (only the files emlab wrote are removed)"
        )
    if same():
        return "resume"
    raise RunExistsError(
        f"{out} holds an incomplete run (killed?) with another config; rerun with the same config to "
        f"resume it, choose another out_dir, or replace it with {what}"
    )
