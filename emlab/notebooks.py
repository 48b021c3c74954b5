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

import datetime as _dt
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emlab.plots import FIGURE_DATA, _flatten, regenerate
from emlab.runs import atomic_write_json, atomic_write_text

__all__ = [
    "FIGURE_BUILDERS",
    "NotebookFailed",
    "NotebookResult",
    "figure_builder",
    "find_notebooks",
    "notebook_parameters",
    "parse_value",
    "rebuild_figures",
    "reproduce",
    "run_notebook",
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
    """What happened to one notebook: ``status`` is ``"ok"``, ``"failed"`` or ``"not run"``.

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
            return _flatten(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            return {}

    def describe(self) -> str:
        """One or two lines for a terminal."""
        if self.ok:
            return f"ok      {self.notebook} -> {self.out_dir} ({self.seconds:.1f} s)"
        if self.status != "failed":
            return f"{self.status:<8}{self.notebook}"
        return f"FAILED  {self.error}\n        executed copy with the full traceback: {self.output}"


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


def _failed_cell(err: Exception, output: Path) -> tuple[int | None, str]:
    """1-based position of the failing cell in the source notebook and its first source line."""
    index = getattr(err, "cell_index", None)
    source = str(getattr(err, "source", "") or "")
    if index is None:
        return None, source
    try:
        import nbformat

        cells = [  # papermill adds error banner cells to the saved copy after the failure
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


def run_notebook(
    notebook: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike = "runs",
    strict: bool = True,
    kernel_name: str = "python3",
    timeout: float | None = None,
    progress_bar: bool = False,
    stamp: str | None = None,
) -> NotebookResult:
    """Execute ``notebook`` headless; its executed copy and outputs go to ``runs/<stem>/<timestamp>/``.

    ``parameters`` are injected after the cell tagged ``parameters``; ``out_dir`` is set to the run
    folder unless given. With ``strict`` a parameter the notebook does not declare is an error,
    otherwise it is skipped. The kernel runs in the notebook's folder. Raises :class:`NotebookFailed`
    (naming the notebook, the cell and the exception) when a cell raises.

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
    unknown = [k for k in params if k not in declared]
    if unknown and strict:
        raise ValueError(
            f"{nb} declares no parameter {', '.join(map(repr, unknown))}; its parameters cell declares "
            f"{', '.join(declared) or 'nothing (tag a cell `parameters`)'}"
        )
    params = {k: v for k, v in params.items() if k in declared}
    out = Path(out_dir) if out_dir is not None else _new_run_dir(Path(runs_dir), nb.stem, stamp or _timestamp())
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    if "out_dir" in declared and "out_dir" not in params:
        params["out_dir"] = str(out)
    output = out / nb.name
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    result = NotebookResult(nb, out, "ok", params, started=started)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(
            str(nb),
            str(output),
            parameters=params,
            kernel_name=kernel_name,
            language=_language(load_notebook_node(str(nb))),
            cwd=str(nb.resolve().parent),
            progress_bar=progress_bar,
            execution_timeout=timeout,
            log_output=False,
        )
    except Exception as e:  # noqa: BLE001 - reported with the cell, re-raised as NotebookFailed
        cell, first = _failed_cell(e, output)
        ename = getattr(e, "ename", None) or type(e).__name__
        evalue = getattr(e, "evalue", None)
        if evalue is None:
            evalue = (str(e).strip().splitlines() or [""])[-1]
        where = f" in cell {cell} (`{first[:80]}`)" if cell is not None else ""
        result.status = "failed"
        result.cell = cell
        result.error = f"{nb} failed{where}: {ename}: {evalue}"
    result.seconds = time.perf_counter() - t0
    _write_info(result)
    if not result.ok:
        raise NotebookFailed(result)
    return result


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
    keep_going: bool = False,
    kernel_name: str = "python3",
    timeout: float | None = None,
    progress_bar: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[NotebookResult]:
    """Run every notebook of ``notebooks_dir`` (quickstart first, then by name) and summarise.

    Each notebook gets the ``parameters`` its parameters cell declares (others are skipped for it)
    and runs into ``runs/<stem>/<timestamp>/``; its figures are copied to ``figures/<stem>/``.
    ``runs/summary.md`` and ``figures/README.md`` list every notebook, its status, run folder and
    metrics. On a failure the rest is skipped unless ``keep_going``. Returns one result per notebook.

    >>> results = reproduce("notebooks", {"seed": 1}, keep_going=True)  # doctest: +SKIP
    >>> [r.status for r in results]  # doctest: +SKIP
    ['ok', 'failed', 'ok']
    """
    say = log or (lambda _msg: None)
    nbs = find_notebooks(notebooks_dir)
    runs, figs = Path(runs_dir), Path(figures_dir)
    params = dict(parameters or {})
    declared = {nb: notebook_parameters(nb, kernel_name) for nb in nbs}
    unused = [k for k in params if not any(k in d for d in declared.values())]
    if unused:
        say(f"warning: no notebook declares parameter(s) {', '.join(unused)}; they are ignored")
    stamp = _timestamp()
    results: list[NotebookResult] = []
    stop = False
    for i, nb in enumerate(nbs, 1):
        if stop:
            results.append(NotebookResult(nb, None, "not run"))
            continue
        mine = {k: v for k, v in params.items() if k in declared[nb]}
        say(f"[{i}/{len(nbs)}] {nb}" + (f" with {mine}" if mine else ""))
        try:
            result = run_notebook(
                nb,
                mine,
                runs_dir=runs,
                kernel_name=kernel_name,
                timeout=timeout,
                progress_bar=progress_bar,
                stamp=stamp,
            )
        except NotebookFailed as e:
            result = e.result
            stop = not keep_going
        if result.out_dir is not None:
            collect_figures(result.out_dir, figs / nb.stem)
        say("    " + result.describe())
        results.append(result)
    write_summary(results, runs / "summary.md", figures_dir=figs)
    write_summary(results, figs / "README.md", figures_dir=figs)
    failed = [r for r in results if r.status == "failed"]
    say(
        f"{sum(r.ok for r in results)} of {len(results)} notebooks ran; summary: {runs / 'summary.md'}"
        + (f"; FAILED: {', '.join(str(r.notebook) for r in failed)}" if failed else "")
    )
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
        secs = f"{r.seconds:.0f} s" if r.out_dir is not None else ""
        lines.append(f"| {r.notebook.stem} | {status} | {_rel(r.out_dir, here)} | {secs} |")
    for r in results:
        lines += ["", f"## {r.notebook.stem}", ""]
        if r.error:
            lines += [f"Error: {r.error.replace(chr(10), ' ')}", ""]
        if r.status == "not run":
            lines += ["Not run: an earlier notebook failed (`emlab reproduce --keep-going` runs the rest).", ""]
        if r.parameters:
            shown = {k: v for k, v in r.parameters.items() if k != "out_dir"}
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
    return NotebookResult(
        Path(info.get("notebook") or f"{stem}.ipynb"),
        run_dir,
        info.get("status", "ok"),
        info.get("parameters") or {},
        info.get("error"),
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
