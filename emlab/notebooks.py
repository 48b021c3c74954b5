"""Run notebooks headless with papermill, reproduce them all, and rebuild their figures from runs.

A notebook starts with a cell tagged ``parameters`` (with an ``out_dir`` parameter) and writes its
numbers to ``<out_dir>/metrics.json`` and its figures through :func:`emlab.plots.record`.
:func:`run_notebook` executes one into ``runs/<stem>/<timestamp>/``, :func:`reproduce` runs every
notebook of a folder and writes a summary, :func:`rebuild_figures` redraws the figures of stored runs.

>>> result = run_notebook("notebooks/01_quickstart.ipynb", {"n_samples": 8})  # doctest: +SKIP
>>> result.out_dir, result.metrics  # doctest: +SKIP
(PosixPath('runs/01_quickstart/20250101-120000'), {'sft/toy/general_em': 0.25})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emlab.metrics import flatten
from emlab.plots import FIGURE_DATA, regenerate
from emlab.runs import (
    OWNER_ENV,
    RunLockedError,
    atomic_write_json,
    atomic_write_text,
    begin_manifest,
    check_run_dir,
    finish_manifest,
    finish_nested,
    lock_run_dir,
    prepare_run_dir,
    read_json_safe,
    redact,
    register_written,
    run_status,
    scrub,
    secret_parameter_warnings,
    secret_values,
    unlock_run_dir,
    write_status,
)

__all__ = [
    "FIGURE_BUILDERS",
    "NotebookFailed",
    "NotebookResult",
    "ParameterError",
    "figure_builder",
    "find_notebooks",
    "notebook_parameters",
    "parse_value",
    "rebuild_figures",
    "reproduce",
    "run_notebook",
    "time_limits",
]

RUN_INFO = "notebook.json"  # written by run_notebook into each run folder
FIGURE_SUFFIXES = (".png", ".svg", ".html", ".pdf", ".jpg", ".jpeg", ".webp")
QUICKSTART = "quickstart"

#: Extra figure builders by notebook stem: ``fn(run_dir) -> list[Path]``, called by ``emlab figures``
#: after the figures recorded in ``figure_data.json`` are redrawn. Register with :func:`figure_builder`.
FIGURE_BUILDERS: dict[str, Callable[[Path], list[Path]]] = {}


def figure_builder(stem: str) -> Callable[[Callable[[Path], list[Path]]], Callable[[Path], list[Path]]]:
    """Register a function that rebuilds extra figures of notebook ``stem`` from its run folder.

    Most notebooks need none: every figure drawn with :func:`emlab.plots.record` is redrawn from
    ``figure_data.json``. Use this for figures computed from other stored files (records, metrics).

    >>> @figure_builder("03_steering")  # doctest: +SKIP
    ... def _(run_dir):
    ...     return plots.save(plots.em_bars(json.loads((run_dir / "metrics.json").read_text())), run_dir / "figures/em")
    """

    def register(fn: Callable[[Path], list[Path]]) -> Callable[[Path], list[Path]]:
        FIGURE_BUILDERS[stem] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class NotebookResult:
    """What happened to one notebook: ``status`` is ``"ok"``, ``"failed"``, ``"not run"``, ``"running"``
    (while it runs) or ``"incomplete"`` (read back from a run that was killed).

    ``cell`` is the failing cell's 1-based position in the source notebook (all cells counted).
    """

    notebook: Path
    out_dir: Path | None
    status: str
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cell: int | None = None
    seconds: float = 0.0
    started: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def output(self) -> Path | None:
        """The executed copy of the notebook (with outputs and tracebacks)."""
        return None if self.out_dir is None else self.out_dir / self.notebook.name

    @property
    def metrics(self) -> dict[str, Any]:
        """Every metric of the run's ``metrics.json``, nested keys joined by ``/``."""
        path = None if self.out_dir is None else self.out_dir / "metrics.json"
        if path is None or not path.exists():
            return {}
        try:
            return flatten(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            return {}

    def describe(self) -> str:
        """One or two lines for a terminal."""
        if self.ok:
            return f"ok      {self.notebook} -> {self.out_dir} ({self.seconds:.1f} s)"
        if self.status != "failed":
            return f"{self.status:<8}{self.notebook}"
        if self.output is None or not self.output.exists():
            return f"FAILED  {self.error}"
        return f"FAILED  {self.error}\n        executed copy with the full traceback: {self.output}"


class ParameterError(ValueError):
    """A ``-p`` parameter name that the notebook(s) do not declare (the message suggests close names)."""


class NotebookFailed(RuntimeError):
    """A notebook raised; ``.result`` names the notebook, the cell and the exception."""

    def __init__(self, result: NotebookResult):
        super().__init__(result.error)
        self.result = result


# ---------------------------------------------------------------------------------------------
# Parameters

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """Parse a command-line parameter value as YAML (numbers, booleans, null, lists), else keep the string.

    >>> parse_value("1e-4"), parse_value("true"), parse_value("[1, 2]"), parse_value("medical")
    (0.0001, True, [1, 2], 'medical')
    """
    import yaml

    if _NUMBER.match(text.strip()):  # YAML 1.1 reads "1e-4" as a string
        v = float(text)
        return int(v) if re.fullmatch(r"[-+]?\d+", text.strip()) else v
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _language(nb: Any) -> str | None:
    """The notebook's language from its metadata, or ``"python"`` when it records none."""
    meta = nb.metadata
    known = meta.get("language_info", {}).get("name") or meta.get("kernelspec", {}).get("language")
    return None if known else "python"


def notebook_parameters(notebook: str | os.PathLike, kernel_name: str = "python3") -> dict[str, Any]:
    """The parameters declared in the notebook's ``parameters`` cell: ``{name: default}`` (as source text).

    >>> notebook_parameters("notebooks/01_quickstart.ipynb")  # doctest: +SKIP
    {'out_dir': 'None', 'n_samples': '8'}
    """
    from papermill.inspection import _infer_parameters  # inspect_notebook cannot take a kernel name
    from papermill.iorw import load_notebook_node

    nb = load_notebook_node(str(notebook))
    return {p.name: p.default for p in _infer_parameters(nb, name=kernel_name, language=_language(nb))}


def check_parameters(names: Sequence[str], declared: Sequence[str], where: str, *, what: str = "its parameters cell declares") -> None:
    """Raise :class:`ParameterError` for names not in ``declared``, suggesting the closest ones.

    >>> check_parameters(["smoek"], ["smoke", "seed"], "notebooks/x.ipynb declares no parameter")
    Traceback (most recent call last):
    ...
    emlab.notebooks.ParameterError: notebooks/x.ipynb declares no parameter 'smoek' (did you mean 'smoke'?); its parameters cell declares smoke, seed
    """
    unknown = [k for k in names if k not in declared]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(declared), n=3, cutoff=0.6)
        hints.append(repr(k) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    raise ParameterError(
        f"{where} {', '.join(hints)}; {what} "
        f"{', '.join(declared) or 'nothing (tag a cell `parameters`)'}"
    )


_PATH_KEYS = ("out_dir", "files", "adapter", "model")


def _resolve_paths(params: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative paths in path-like parameters, made absolute against the caller's folder ``cwd``.

    The kernel runs in the notebook's folder, so ``-p out_dir runs/x`` typed in the repository root
    would otherwise land in ``notebooks/runs/x``. ``out_dir`` is always resolved; ``files``,
    ``adapter``, ``model`` and names ending in ``_dir``/``_path``/``_file``/``_files`` are resolved
    when the path exists relative to ``cwd`` (a hub id such as ``Qwen/Qwen2.5-7B`` stays as typed).
    """

    def fix(key: str, v: Any) -> Any:
        if isinstance(v, str) and v.strip() and not Path(v).is_absolute() and "://" not in v:
            if key == "out_dir" or (cwd / v).exists():
                return str((cwd / v).resolve())
            return v
        if isinstance(v, Mapping):
            return {k: fix(key, x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(key, x) for x in v]
        return v

    return {
        k: fix(k, v) if k in _PATH_KEYS or k.endswith(("_dir", "_path", "_file", "_files")) else v
        for k, v in params.items()
    }


@contextlib.contextmanager
def _owner_env(out: Path) -> Iterator[None]:
    """Tell the kernel (through its inherited environment) that this process owns the run folder."""
    old = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(out)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = old


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _new_run_dir(runs_dir: Path, stem: str, stamp: str) -> Path:
    base = runs_dir / stem / stamp
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{stamp}-{n}")
    return out


# ---------------------------------------------------------------------------------------------
# The papermill engine: atomic saves with secrets scrubbed, time limits, no Output-widget echo

ENGINE = "emlab"
#: Default time limits in seconds (``None``: no limit); the environment variables override them and
#: ``--cell-timeout`` / ``--notebook-timeout`` override both. A cell that runs longer fails and names itself.
CELL_TIMEOUT_ENV = "EMLAB_CELL_TIMEOUT"
NOTEBOOK_TIMEOUT_ENV = "EMLAB_NOTEBOOK_TIMEOUT"
DEFAULT_CELL_TIMEOUT = 6 * 3600.0
DEFAULT_NOTEBOOK_TIMEOUT = 24 * 3600.0


def _limit_from_env(name: str, default: float | None) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds (0 or 'none': no limit)") from None
    return value if value > 0 else None


def time_limits(cell: float | None = None, notebook: float | None = None) -> tuple[float | None, float | None]:
    """The per-cell and per-notebook time limits: the arguments, else the environment variables
    ``EMLAB_CELL_TIMEOUT`` / ``EMLAB_NOTEBOOK_TIMEOUT``, else 6 h and 24 h. ``0`` or less: no limit.

    >>> time_limits(60, None)  # doctest: +SKIP
    (60.0, 86400.0)
    """
    c = _limit_from_env(CELL_TIMEOUT_ENV, DEFAULT_CELL_TIMEOUT) if cell is None else (float(cell) if cell > 0 else None)
    n = (
        _limit_from_env(NOTEBOOK_TIMEOUT_ENV, DEFAULT_NOTEBOOK_TIMEOUT)
        if notebook is None
        else (float(notebook) if notebook > 0 else None)
    )
    return c, n


_ENGINE_READY = False


def _register_engine() -> None:
    """Register emlab's papermill engine (once per process)."""
    global _ENGINE_READY
    if _ENGINE_READY:
        return
    import nbformat
    from nbclient.output_widget import OutputWidget
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, NotebookExecutionManager, catch_nb_assignment, papermill_engines
    from papermill.log import logger

    class HeadlessOutputWidget(OutputWidget):
        """nbclient's Output-widget mimic, minus the state echo it sends to the kernel.

        Upstream, every output captured by ``with out: display(...)`` makes nbclient send a
        ``comm_msg`` on the shell socket from its iopub task while another task awaits the cell's
        ``execute_reply`` on that same socket; the reply's wake-up can then be lost (13 of 80 cells
        in the reproduction in docs/failures.md), and with no time limit the run waits forever. The
        kernel gets nothing useful from the echo (nbclient drops the kernel's answers to it), so it
        is not sent.
        """

        def _publish_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - see the class
            return None

    class Client(PapermillNotebookClient):
        def __init__(self, nb_man: Any, **kw: Any):
            super().__init__(nb_man, **kw)
            self.widget_registry = {"@jupyter-widgets/output": {"OutputModel": HeadlessOutputWidget}}

    class Manager(NotebookExecutionManager):
        """Saves the executed notebook atomically, with the secret parameter values scrubbed."""

        save_to: str | None = None
        secrets: tuple[str, ...] = ()
        progress: dict[str, Any] | None = None

        @catch_nb_assignment
        def save(self, **kwargs: Any) -> None:
            if self.save_to:
                atomic_write_text(self.save_to, scrub(nbformat.writes(self.nb), self.secrets))
            self.last_save_time = self.now()

        @catch_nb_assignment
        def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress["cell"] = cell_index
            super().cell_start(cell, cell_index, **kwargs)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(
            cls,
            nb: Any,
            kernel_name: str,
            output_path: str | None = None,
            progress_bar: bool = True,
            log_output: bool = False,
            autosave_cell_every: int = 30,
            save_to: str | None = None,
            secrets: Sequence[str] = (),
            progress: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> Any:
            nb_man = Manager(
                nb, output_path=None, progress_bar=progress_bar, log_output=log_output,
                autosave_cell_every=autosave_cell_every,
            )  # fmt: skip
            nb_man.save_to, nb_man.secrets, nb_man.progress = save_to, tuple(secrets), progress
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

        @classmethod
        def execute_managed_notebook(
            cls,
            nb_man: Any,
            kernel_name: str,
            log_output: bool = False,
            stdout_file: Any = None,
            stderr_file: Any = None,
            start_timeout: int = 60,
            execution_timeout: Any = None,
            cell_timeout: float | None = None,
            notebook_timeout: float | None = None,
            **kwargs: Any,
        ) -> Any:
            deadline: list[float] = []  # the notebook's clock starts with its first cell (kernel started)

            def limit(cell: Any) -> int | None:
                if notebook_timeout is not None and not deadline:
                    deadline.append(time.monotonic() + notebook_timeout)
                left = None if notebook_timeout is None else max(1.0, deadline[0] - time.monotonic())
                if nb_man.progress is not None:
                    nb_man.progress["limit"] = "notebook" if left is not None and (
                        cell_timeout is None or left < cell_timeout) else "cell"
                vals = [v for v in (cell_timeout, left) if v is not None]
                return math.ceil(min(vals)) if vals else None

            kwargs.pop("input_path", None)
            kwargs.pop("timeout", None)
            client = Client(
                nb_man, kernel_name=kernel_name, timeout_func=limit, startup_timeout=start_timeout, log=logger,
                log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file, **kwargs,
            )  # fmt: skip
            return client.execute()

    papermill_engines.register(ENGINE, Engine)
    _ENGINE_READY = True


# ---------------------------------------------------------------------------------------------
# Running


def _cell_at(index: int | None, output: Path) -> tuple[int | None, str]:
    """1-based position in the source notebook of the executed copy's cell ``index``, and its first line."""
    if index is None:
        return None, ""
    source = ""
    try:
        import nbformat

        cells = [  # papermill may add error banner cells to a saved copy after a failure
            c
            for c in nbformat.read(str(output), as_version=4).cells
            if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])
        ]
        injected = sum("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells[:index])
        source = cells[index].source
    except Exception:  # noqa: BLE001 - the position is a convenience
        injected = 0
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return index - injected + 1, first


def _failed_cell(err: Exception, output: Path) -> tuple[int | None, str]:
    """1-based position of the failing cell in the source notebook and its first source line."""
    index = getattr(err, "cell_index", None)
    cell, first = _cell_at(index, output)
    if not first:
        source = str(getattr(err, "source", "") or "")
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return cell, first


def _describe_failure(e: BaseException, nb: Path, output: Path, progress: dict[str, Any],
                      limits: tuple[float | None, float | None]) -> tuple[int | None, str]:
    """The failing cell and a one-line message for an exception raised while executing ``nb``."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    if isinstance(e, CellTimeoutError | DeadKernelError | KeyboardInterrupt) or getattr(e, "cell_index", None) is None:
        cell, first = _cell_at(progress.get("cell"), output)
    else:
        cell, first = _failed_cell(e, output)  # type: ignore[arg-type]
    where = f" in cell {cell} (`{first[:80]}`)" if cell is not None else ""
    if isinstance(e, CellTimeoutError):
        if progress.get("limit") == "notebook":
            what = f"the notebook time limit ({limits[1]:.0f} s; --notebook-timeout, EMLAB_NOTEBOOK_TIMEOUT) ran out"
        else:
            what = f"the cell ran past its time limit ({limits[0]:.0f} s; --cell-timeout, EMLAB_CELL_TIMEOUT)"
        return cell, f"{nb} stopped{where}: {what}; the kernel was shut down"
    if isinstance(e, DeadKernelError):
        return cell, f"{nb} failed{where}: the kernel died (killed, out of memory, or a crash in native code)"
    if isinstance(e, KeyboardInterrupt):
        return cell, f"{nb} interrupted{where}"
    ename = getattr(e, "ename", None) or type(e).__name__
    evalue = getattr(e, "evalue", None)
    if evalue is None:
        evalue = (str(e).strip().splitlines() or [""])[-1]
    return cell, f"{nb} failed{where}: {ename}: {evalue}"


def run_notebook(
    notebook: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike = "runs",
    strict: bool = True,
    kernel_name: str = "python3",
    timeout: float | None = None,
    notebook_timeout: float | None = None,
    progress_bar: bool = False,
    stamp: str | None = None,
    overwrite: bool = False,
) -> NotebookResult:
    """Execute ``notebook`` headless; its executed copy and outputs go to ``runs/<stem>/<timestamp>/``.

    ``parameters`` are injected after the cell tagged ``parameters``; ``out_dir`` is set to the run
    folder unless given (``out_dir=`` and the ``out_dir`` parameter are the same thing). With
    ``strict`` a parameter the notebook does not declare is a :class:`ParameterError` (naming the
    closest declared ones), otherwise it is skipped. Relative paths are relative to the current
    folder, although the kernel runs in the notebook's folder. ``timeout`` (per cell) and
    ``notebook_timeout`` are time limits in seconds (default: :func:`time_limits`). The run folder
    follows the rules of :mod:`emlab.runs`: locked while the notebook runs, a finished run is only
    replaced with ``overwrite=True``, a killed one with the same parameters is resumed.
    ``status.json`` says running first, then ok or failed; the executed copy is saved atomically
    after every cell, with secret parameter values scrubbed. Raises :class:`NotebookFailed` (naming
    the notebook, the cell and the exception, the time limit or the kernel's death).

    >>> run_notebook("notebooks/02_defences.ipynb", {"domains": ["medical"]}).out_dir  # doctest: +SKIP
    PosixPath('runs/02_defences/20250101-120000')
    """
    import papermill as pm
    from papermill.iorw import load_notebook_node

    nb = Path(notebook)
    if not nb.is_file():
        raise FileNotFoundError(f"notebook {nb} does not exist")
    declared = notebook_parameters(nb, kernel_name)
    params = dict(parameters or {})
    if strict:
        check_parameters(list(params), list(declared), f"{nb} declares no parameter")
    params = _resolve_paths({k: v for k, v in params.items() if k in declared}, Path.cwd())
    if out_dir is None and params.get("out_dir") is not None:
        out_dir = params["out_dir"]
    if out_dir is not None:
        out = Path(out_dir).resolve()
    else:
        out = _new_run_dir(Path(runs_dir), nb.stem, stamp or _timestamp()).resolve()
    cell_limit, nb_limit = time_limits(timeout, notebook_timeout)
    check_run_dir(out)
    lock_run_dir(out)
    try:
        if "out_dir" in declared:
            params["out_dir"] = str(out)
        shown = redact(params)
        prior = read_json_safe(out / RUN_INFO)
        mode = prepare_run_dir(
            out,
            overwrite=overwrite,
            same=lambda: isinstance(prior, dict) and prior.get("parameters") == shown
            and Path(str(prior.get("notebook"))).name == nb.name,
            what="`emlab run --overwrite` (run_notebook(..., overwrite=True))",
        )
        output = out / nb.name
        begin_manifest(out, keep=mode == "resume")
        register_written(out, nb.name, RUN_INFO)
        started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        result = NotebookResult(nb, out, "running", shown, started=started)
        write_status(out, "running")
        _write_info(result)
        secrets = secret_values(params)
        progress: dict[str, Any] = {}
        _register_engine()
        t0 = time.perf_counter()
        try:
            with _owner_env(out):
                pm.execute_notebook(
                    str(nb),
                    None,  # papermill itself writes nothing; the engine saves atomically, scrubbed
                    parameters=params,
                    engine_name=ENGINE,
                    kernel_name=kernel_name,
                    language=_language(load_notebook_node(str(nb))),
                    cwd=str(nb.resolve().parent),
                    progress_bar=progress_bar,
                    log_output=False,
                    save_to=str(output),
                    secrets=secrets,
                    progress=progress,
                    cell_timeout=cell_limit,
                    notebook_timeout=nb_limit,
                )
            result.status = "ok"
        except (Exception, KeyboardInterrupt) as e:  # reported with the cell, re-raised as NotebookFailed
            cell, message = _describe_failure(e, nb, output, progress, (cell_limit, nb_limit))
            result.status, result.cell, result.error = "failed", cell, scrub(message, secrets)
            if isinstance(e, KeyboardInterrupt):
                result.seconds = time.perf_counter() - t0
                _finalise(result)
                raise
        result.seconds = time.perf_counter() - t0
        _finalise(result)
    finally:
        unlock_run_dir(out)
    if not result.ok:
        raise NotebookFailed(result)
    return result


def _finalise(result: NotebookResult) -> None:
    assert result.out_dir is not None
    _write_info(result)
    finish_nested(result.out_dir, result.status, result.error)
    finish_manifest(result.out_dir)
    write_status(result.out_dir, result.status, result.error)


def _write_info(result: NotebookResult) -> None:
    if result.out_dir is None:
        return
    atomic_write_json(result.out_dir / RUN_INFO, asdict(result))


def find_notebooks(folder: str | os.PathLike = "notebooks") -> list[Path]:
    """The notebooks of ``folder`` in the order :func:`reproduce` runs them: the quickstart first
    (the cheapest check that the setup works), then the rest sorted by name. Names starting with
    ``_`` or ``.`` are skipped.

    >>> [p.name for p in find_notebooks("notebooks")]  # doctest: +SKIP
    ['quickstart.ipynb', '00_em_organism.ipynb', '01_directions.ipynb']
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"notebook folder {d} does not exist")
    nbs = sorted(p for p in d.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return sorted(nbs, key=lambda p: QUICKSTART not in p.stem.lower())  # stable: quickstart first


def collect_figures(run_dir: Path, dest: Path) -> list[Path]:
    """Copy the figure files a run wrote (in its folder or its ``figures/`` folder) to ``dest``."""
    files = [p for p in run_dir.iterdir() if p.is_file() and p.suffix.lower() in FIGURE_SUFFIXES]
    if (run_dir / "figures").is_dir():
        files += [p for p in (run_dir / "figures").rglob("*") if p.is_file() and p.suffix.lower() in FIGURE_SUFFIXES]
    if dest.is_dir():  # stale figures of an older run would mislead
        for old in dest.rglob("*"):
            if old.is_file() and old.suffix.lower() in FIGURE_SUFFIXES:
                old.unlink()
    copied = []
    for f in sorted(files):
        rel = f.relative_to(run_dir / "figures") if f.parent != run_dir else Path(f.name)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        copied.append(target)
    return copied


def reproduce(
    notebooks_dir: str | os.PathLike = "notebooks",
    parameters: Mapping[str, Any] | None = None,
    *,
    runs_dir: str | os.PathLike = "runs",
    figures_dir: str | os.PathLike = "figures",
    keep_going: bool = True,
    kernel_name: str = "python3",
    timeout: float | None = None,
    notebook_timeout: float | None = None,
    progress_bar: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[NotebookResult]:
    """Run every notebook of ``notebooks_dir`` (quickstart first, then by name) and summarise.

    Each notebook gets the ``parameters`` its parameters cell declares and runs into
    ``runs/<stem>/<timestamp>/``; its figures are copied to ``figures/<stem>/``. A parameter that
    no notebook declares is a :class:`ParameterError` before anything runs. A notebook that fails
    (an exception, a time limit, a dead kernel) does not stop the others (``keep_going=False``
    stops at the first failure); every failure is listed at the end. ``runs/summary.md`` and
    ``figures/README.md`` list every notebook, its status, run folder and metrics.

    >>> results = reproduce("notebooks", {"seed": 1})  # doctest: +SKIP
    >>> [r.status for r in results]  # doctest: +SKIP
    ['ok', 'failed', 'ok']
    """
    say = log or (lambda _msg: None)
    nbs = find_notebooks(notebooks_dir)
    runs, figs = Path(runs_dir), Path(figures_dir)
    params = dict(parameters or {})
    declared = {nb: notebook_parameters(nb, kernel_name) for nb in nbs}
    if "out_dir" in params:
        raise ParameterError("reproduce gives each notebook its own run folder; use --runs-dir instead of -p out_dir")
    every = sorted({k for d in declared.values() for k in d})
    check_parameters(list(params), every, f"no notebook of {notebooks_dir} declares a parameter", what="they declare")
    for warning in secret_parameter_warnings(params):
        say(f"warning: {warning}")
    time_limits(timeout, notebook_timeout)  # a bad EMLAB_*_TIMEOUT fails now, not after the first notebook
    stamp = _timestamp()
    results: list[NotebookResult] = []
    stop = False
    for i, nb in enumerate(nbs, 1):
        if stop:
            results.append(NotebookResult(nb, None, "not run"))
            continue
        mine = {k: v for k, v in params.items() if k in declared[nb]}
        say(f"[{i}/{len(nbs)}] {nb}" + (f" with {redact(mine)}" if mine else ""))
        try:
            result = run_notebook(
                nb,
                mine,
                runs_dir=runs,
                kernel_name=kernel_name,
                timeout=timeout,
                notebook_timeout=notebook_timeout,
                progress_bar=progress_bar,
                stamp=stamp,
            )
        except NotebookFailed as e:
            result = e.result
        except (OSError, RunLockedError, ValueError) as e:  # its run folder could not be used
            result = NotebookResult(nb, None, "failed", redact(mine), error=f"{nb}: {e}")
        if not result.ok:
            stop = not keep_going
        if result.out_dir is not None:
            collect_figures(result.out_dir, figs / nb.stem)
        say("    " + result.describe())
        results.append(result)
    write_summary(results, runs / "summary.md", figures_dir=figs)
    write_summary(results, figs / "README.md", figures_dir=figs)
    failed = [r for r in results if r.status == "failed"]
    say(f"{sum(r.ok for r in results)} of {len(results)} notebooks ran; summary: {runs / 'summary.md'}")
    if failed:
        say(f"{len(failed)} FAILED:")
        for r in failed:
            say("  " + (r.error or str(r.notebook)).replace("\n", " "))
    return results


# ---------------------------------------------------------------------------------------------
# Summary


def _fmt(v: Any) -> str:
    if isinstance(v, list | tuple) and any(isinstance(x, dict) for x in v):  # a log or table: too long for a cell
        return f"{len(v)} rows (in the run's metrics.json)"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _rel(path: Path | None, start: Path) -> str:
    if path is None:
        return "–"
    try:
        return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive
        return str(path)


def write_summary(
    results: Sequence[NotebookResult], path: str | os.PathLike, *, figures_dir: str | os.PathLike = "figures"
) -> Path:
    """Write a Markdown page listing each notebook, its status, run folder, metrics and figures."""
    page = Path(path)
    here = page.parent
    figs = Path(figures_dir)
    n_ok = sum(r.ok for r in results)
    lines = [
        "# Notebook runs",
        "",
        f"Written {_dt.datetime.now().isoformat(timespec='seconds')}: {n_ok} of {len(results)} notebooks ran.",
        "",
        "| notebook | status | run folder | time |",
        "|---|---|---|---:|",
    ]
    for r in results:
        status = r.status if r.status != "failed" else f"**failed** (cell {r.cell})"
        if r.status == "incomplete":
            status = "**incomplete** (killed before it finished)"
        secs = f"{r.seconds:.0f} s" if r.out_dir is not None else ""
        lines.append(f"| {r.notebook.stem} | {status} | {_rel(r.out_dir, here)} | {secs} |")
    for r in results:
        lines += ["", f"## {r.notebook.stem}", ""]
        if r.error:
            lines += [f"Error: {r.error.replace(chr(10), ' ')}", ""]
        if r.status == "not run":
            lines += ["Not run: an earlier notebook failed (`emlab reproduce` without --stop-on-failure runs the rest).", ""]
        if r.status in ("incomplete", "running"):
            lines += [f"Status {r.status}: its numbers below are partial.", ""]
        if r.parameters:
            shown = {k: v for k, v in redact(r.parameters).items() if k != "out_dir"}
            if shown:
                lines += ["Parameters: " + ", ".join(f"`{k}={_fmt(v)}`" for k, v in shown.items()), ""]
        metrics = r.metrics
        if metrics:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
            lines.append("")
        elif r.out_dir is not None:
            lines += ["No metrics.json.", ""]
        fdir = figs / r.notebook.stem
        pngs = sorted(fdir.rglob("*.png")) if fdir.is_dir() else []
        htmls = {p.with_suffix("") for p in fdir.rglob("*.html")} if fdir.is_dir() else set()
        for p in pngs:
            lines.append(f"![{p.stem}]({_rel(p, here)})")
        for stem in sorted(htmls - {p.with_suffix("") for p in pngs}):
            lines.append(f"- [{stem.name}]({_rel(stem.with_suffix('.html'), here)}) (interactive HTML)")
    atomic_write_text(page, "\n".join(lines).rstrip() + "\n")
    return page


# ---------------------------------------------------------------------------------------------
# Rebuilding figures


def _load_result(run_dir: Path, stem: str) -> NotebookResult:
    info_path = run_dir / RUN_INFO
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError:
            info = {}
    status = run_status(run_dir)
    return NotebookResult(
        Path(info.get("notebook") or f"{stem}.ipynb"),
        run_dir,
        status.status if status.status != "empty" else "incomplete",
        redact(info.get("parameters") or {}),
        info.get("error") or (status.reason if not status.ok else None),
        info.get("cell"),
        info.get("seconds") or 0.0,
        info.get("started"),
    )


def latest_run(runs_dir: str | os.PathLike, stem: str) -> Path | None:
    """The newest run folder of notebook ``stem`` that finished (newest by start time, then mtime)."""
    d = Path(runs_dir) / stem
    if not d.is_dir():
        return None
    candidates = []
    for run in (p for p in d.iterdir() if p.is_dir()):
        r = _load_result(run, stem)
        if not (run / FIGURE_DATA).exists() and not (run / "metrics.json").exists():
            continue
        candidates.append((r.ok, r.started or "", run.stat().st_mtime, run))
    return max(candidates)[-1] if candidates else None


def rebuild_figures(
    runs_dir: str | os.PathLike = "runs",
    figures_dir: str | os.PathLike = "figures",
    *,
    formats: Sequence[str] = ("html", "png"),
    log: Callable[[str], None] | None = print,
) -> dict[str, list[Path]]:
    """Redraw every figure of the newest run of each notebook from stored data (nothing is trained).

    For each ``runs/<stem>/``: the figures recorded in ``figure_data.json`` are redrawn (and any
    builder registered with :func:`figure_builder` runs), then copied to ``figures/<stem>/``;
    ``figures/README.md`` is rewritten. Returns ``{stem: files written in the run folder}``.

    >>> rebuild_figures("runs", "figures")  # doctest: +SKIP
    {'02_defences': [PosixPath('runs/02_defences/20250101-120000/figures/tradeoff.html'), ...]}
    """
    say = log or (lambda _msg: None)
    runs, figs = Path(runs_dir), Path(figures_dir)
    if not runs.is_dir():
        raise FileNotFoundError(f"runs folder {runs} does not exist; run `emlab reproduce` first")
    out: dict[str, list[Path]] = {}
    results = []
    for stem_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        stem = stem_dir.name
        run = latest_run(runs, stem)
        if run is None:
            continue
        written = regenerate(run, formats=formats)
        if stem in FIGURE_BUILDERS:
            written += FIGURE_BUILDERS[stem](run)
        collect_figures(run, figs / stem)
        out[stem] = written
        results.append(_load_result(run, stem))
        say(f"{stem}: {len({p.with_suffix('') for p in written})} figure(s) redrawn from {run}")
    if not out:
        say(f"no runs with figure data under {runs}")
    write_summary(results, figs / "README.md", figures_dir=figs)
    return out
