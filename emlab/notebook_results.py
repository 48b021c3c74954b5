"""What a notebook run produced: :class:`NotebookResult` (and ``notebook.json``), the summary pages
(``runs/summary.md``, ``figures/README.md``) and reading stored runs back. :mod:`emlab.notebooks`
re-exports the public names.

>>> latest_run("runs", "02_defences")  # doctest: +SKIP
PosixPath('runs/02_defences/20250101-120000')
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab.metrics import flatten
from emlab.plots import FIGURE_DATA
from emlab.run_env import redact
from emlab.run_files import atomic_write_text
from emlab.run_folder import run_status

__all__ = [
    "FIGURE_SUFFIXES",
    "RUN_INFO",
    "NotebookFailed",
    "NotebookResult",
    "collect_figures",
    "latest_run",
    "load_result",
    "write_summary",
]

RUN_INFO = "notebook.json"  # written by run_notebook into each run folder
FIGURE_SUFFIXES = (".png", ".svg", ".html", ".pdf", ".jpg", ".jpeg", ".webp")


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



class NotebookFailed(RuntimeError):
    """A notebook raised; ``.result`` names the notebook, the cell and the exception."""

    def __init__(self, result: NotebookResult):
        super().__init__(result.error)
        self.result = result


# ---------------------------------------------------------------------------------------------
# Figures and summary pages


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
# Reading runs back


def load_result(run_dir: Path, stem: str) -> NotebookResult:
    """The :class:`NotebookResult` of the stored run ``run_dir`` of notebook ``stem`` (from its
    ``notebook.json`` and :func:`emlab.runs.run_status`; a killed run reads as incomplete)."""
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
        r = load_result(run, stem)
        if not (run / FIGURE_DATA).exists() and not (run / "metrics.json").exists():
            continue
        candidates.append((r.ok, r.started or "", run.stat().st_mtime, run))
    return max(candidates)[-1] if candidates else None
