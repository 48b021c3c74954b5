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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any

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

REDACTED = "<redacted>"
RUN_FORMAT = "emlab-run/1"
#: The packages whose versions a run's env.json records (:func:`package_versions`).
PACKAGES = ("torch", "transformers", "peft", "trl", "nnsight", "openai", "emlab")
_CHROMIUM_HINT = (
    "static figure export (PNG through kaleido) failed, so only the HTML was written; kaleido needs "
    "Chromium: install it with `apt-get install -y chromium` (or run `plotly_get_chrome`)"
)
_png_failure: str | None = None  # set once per process after the first failed PNG export


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


# ---------------------------------------------------------------------------------------------
# Redaction

_SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "passphrase", "credential", "credentials"}
)
_SECRET_VALUE = re.compile(r"^\s*sk-[A-Za-z0-9_\-]+\s*$|sk-[A-Za-z0-9_\-]{20,}|hf_[A-Za-z0-9]{30,}")


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # apiKey -> api Key
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _is_secret_key(key: str) -> bool:
    words = _key_words(key)
    return any(w in _SECRET_WORDS for w in words) or "".join(words).endswith(("apikey", "password"))


def redact(obj: Any, *, _secret: bool = False) -> Any:
    """Return a copy of ``obj`` with credentials replaced by ``"<redacted>"``.

    Strings are redacted when their key names a credential (a word of the key is ``key``,
    ``token``, ``secret``, ``password``..., as in ``openai_api_key``, ``hf_token``, ``apiKey``; all
    strings nested under such a key too), and wherever they look like an API key (``sk-...``,
    ``hf_...``). Numbers are kept, so counts such as ``max_new_tokens`` or ``key_layer`` survive.

    >>> redact({"api_key": "abc", "max_new_tokens": 600, "judge": {"url": "sk-123"}})
    {'api_key': '<redacted>', 'max_new_tokens': 600, 'judge': {'url': '<redacted>'}}
    """
    if isinstance(obj, Mapping):
        return {k: redact(v, _secret=_secret or _is_secret_key(str(k))) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, _secret=_secret) for v in obj]
    if isinstance(obj, str) and (_secret or _SECRET_VALUE.search(obj)):
        return REDACTED
    return obj


def secret_values(obj: Any, *, _secret: bool = False) -> list[str]:
    """The strings of ``obj`` that :func:`redact` would hide (to scrub them from text emlab writes).

    >>> secret_values({"openai_api_key": "sk-test-123", "seed": 0, "judge": "gpt-4o"})
    ['sk-test-123']
    """
    found: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found += secret_values(v, _secret=_secret or _is_secret_key(str(k)))
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += secret_values(v, _secret=_secret)
    elif isinstance(obj, str) and obj.strip() and (_secret or _SECRET_VALUE.search(obj)):
        found.append(obj)
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret in ``text`` (raw or JSON-escaped) by ``<redacted>``.

    >>> scrub('key = "sk-test-123"', ["sk-test-123"])
    'key = "<redacted>"'
    """
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
        escaped = json.dumps(value)[1:-1]
        if escaped != value:
            text = text.replace(escaped, REDACTED)
    return text


def secret_parameter_warnings(parameters: Mapping[str, Any]) -> list[str]:
    """One warning per parameter that carries a credential, pointing to the environment variable.

    A parameter is a credential when its name says so (``openai_api_key``, ``hf_token``) or its value
    looks like a key (``sk-...``, ``hf_...``). Values are never repeated in the message.

    >>> secret_parameter_warnings({"openai_api_key": "sk-test-abc"})[0].split(":")[0]
    'parameter openai_api_key holds a credential'
    """
    out = []
    for name, value in parameters.items():
        if not secret_values({name: value}):
            continue
        if _is_secret_key(name):
            env = re.sub(r"[^A-Za-z0-9]+", "_", name).upper()
        else:
            env = "HF_TOKEN" if "hf_" in json.dumps(to_jsonable(value)) else "OPENAI_API_KEY"
        out.append(
            f"parameter {name} holds a credential: set it in the environment instead "
            f"(export {env}=...; emlab's judge reads OPENAI_API_KEY). It is redacted ({REDACTED}) "
            "in everything emlab writes and prints."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Run status, lock and manifest

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


def _key(d: Path) -> str:
    return str(Path(d).resolve())


def _is_live(d: Path) -> bool:
    """True when another process holds the folder's lock (this process's own locks do not count)."""
    from filelock import FileLock, Timeout

    if _key(d) in _HELD:
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
            if _key(d) in _HELD or _is_live(d) or os.environ.get(OWNER_ENV) == _key(d):
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

    Overwriting a run deletes exactly these (see the module docstring). :class:`Run` registers
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
    """Delete what emlab wrote into ``d`` (see the module docstring); return the removed paths."""
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

    key = _key(out)
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
    lock = _HELD.pop(_key(out), None)
    if lock is not None:
        lock.release(force=True)


def prepare_run_dir(out: Path, *, overwrite: bool, same: Callable[[], bool], what: str) -> str:
    """Apply the folder rules (module docstring) to a locked ``out``; return ``"new"``, ``"resume"``
    or ``"overwrite"``. ``same()`` tells whether the folder's run has the same config as the new one.
    Raises :class:`RunExistsError` when the folder's run must not be replaced."""
    prior = run_status(out)
    if prior.status == "running" and _key(out) in _HELD:
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


# ---------------------------------------------------------------------------------------------
# Environment


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where not installed; emlab from its source when not installed).

    >>> package_versions(["emlab"])["emlab"] is not None
    True
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if "emlab" in versions and versions["emlab"] is None:
        from emlab.version import __version__

        versions["emlab"] = __version__
    return versions


def git_state(folder: Path) -> dict[str, Any]:
    """The git commit and dirty flag of the repository holding ``folder`` (None values outside one)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _find_seeds(obj: Any, prefix: str = "") -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            where = f"{prefix}.{k}" if prefix else str(k)
            if "seed" in str(k).lower() and (v is None or isinstance(v, int | list | tuple)):
                seeds[where] = v
            else:
                seeds.update(_find_seeds(v, where))
    return seeds


def _seed_everything(seed: int) -> None:
    """Seed Python's ``random`` and, when already imported, numpy and torch."""
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def _environment(name: str, seed: int | None, config: dict) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    return {
        "format": RUN_FORMAT,
        "name": name,
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "config_seeds": _find_seeds(config),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": package_versions(),
        "git": git_state(repo),
        "argv": list(sys.argv),
        "notes": [],
    }


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
    owned = owner == _key(out)  # `emlab run` holds the lock and writes the status
    nested = bool(owner) and not owned and Path(owner) in Path(_key(out)).parents  # finalised by `emlab run`
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
            _seed_everything(seed)
        env = _environment(name or out.resolve().name, seed, cfg)
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
