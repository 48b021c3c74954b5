"""Run notebooks headless with papermill, reproduce them all, and rebuild their figures from runs.

A notebook starts with a cell tagged ``parameters`` (with an ``out_dir`` parameter) and writes its
numbers to ``<out_dir>/metrics.json`` and its figures through :func:`emlab.plots.record`.
:func:`run_notebook` executes one into ``runs/<stem>/<timestamp>/``, :func:`reproduce` runs every
notebook of a folder and writes a summary, :func:`rebuild_figures` redraws the figures of stored runs.
The papermill engine and time limits are in :mod:`emlab.notebook_engine`, the result record and the
summary pages in :mod:`emlab.notebook_results`; their public names are re-exported here.

>>> result = run_notebook("notebooks/01_quickstart.ipynb", {"n_samples": 8})  # doctest: +SKIP
>>> result.out_dir, result.metrics  # doctest: +SKIP
(PosixPath('runs/01_quickstart/20250101-120000'), {'sft/toy/general_em': 0.25})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emlab.notebook_engine import CELL_TIMEOUT_ENV as CELL_TIMEOUT_ENV
from emlab.notebook_engine import DEFAULT_CELL_TIMEOUT as DEFAULT_CELL_TIMEOUT
from emlab.notebook_engine import DEFAULT_NOTEBOOK_TIMEOUT as DEFAULT_NOTEBOOK_TIMEOUT
from emlab.notebook_engine import ENGINE, describe_failure, kernel_start_timeout, register_engine, time_limits
from emlab.notebook_engine import NOTEBOOK_TIMEOUT_ENV as NOTEBOOK_TIMEOUT_ENV
from emlab.notebook_results import FIGURE_SUFFIXES as FIGURE_SUFFIXES
from emlab.notebook_results import RUN_INFO, NotebookFailed, NotebookResult, collect_figures, load_result, write_summary
from emlab.notebook_results import latest_run as latest_run
from emlab.plots import regenerate
from emlab.runs import (
    OWNER_ENV,
    RunLockedError,
    atomic_write_json,
    begin_manifest,
    check_run_dir,
    finish_manifest,
    finish_nested,
    lock_run_dir,
    prepare_run_dir,
    read_json_safe,
    redact,
    register_written,
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


class ParameterError(ValueError):
    """A ``-p`` parameter name that the notebook(s) do not declare (the message suggests close names)."""


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
# Running




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
        register_engine()
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
                    start_timeout=kernel_start_timeout(),
                )
            result.status = "ok"
        except (Exception, KeyboardInterrupt) as e:  # reported with the cell, re-raised as NotebookFailed
            cell, message = describe_failure(e, nb, output, progress, (cell_limit, nb_limit))
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
# Rebuilding figures




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
        results.append(load_result(run, stem))
        say(f"{stem}: {len({p.with_suffix('') for p in written})} figure(s) redrawn from {run}")
    if not out:
        say(f"no runs with figure data under {runs}")
    write_summary(results, figs / "README.md", figures_dir=figs)
    return out
