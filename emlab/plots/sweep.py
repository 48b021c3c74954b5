"""Every figure of a sweep's runs drawn once for the whole sweep: each cell's points on one figure.

A notebook's figures are redrawn per run from its ``figure_data.json`` (:func:`emlab.plots.load_figures`)
or read from the plotly JSON it saved under ``figures/``. :func:`sweep_figures` overlays the same figure
of every finished cell of a sweep: each trace keeps its name and colour group, and its points are
drawn once per cell (seed), labelled with the cell's varying parameters, so the spread over seeds is
visible as points per seed. Heatmaps, which cannot be overlaid, become the mean over the cells, and
tables (Table 2) read ``mean ± sd`` over the cells in every numeric cell.
``emlab figures --sweep DIR`` writes them to ``DIR/figures/``.

>>> figs = sweep_figures("runs/sweeps/02_defences-1a2b3c4d")   # doctest: +SKIP
>>> save_sweep_figures("runs/sweeps/02_defences-1a2b3c4d")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from emlab.aggregate import SWEEP_FILE, sweep_runs
from emlab.plots.storage import load_figures, save

__all__ = ["cell_figures", "save_sweep_figures", "sweep_cells", "sweep_figures"]

_OVERLAID = ("scatter", "bar", "box", "violin")


def sweep_cells(sweep: str | os.PathLike) -> list[tuple[str, Path]]:
    """(label, run folder) of every finished cell of ``sweep``; the label names the parameters that vary.

    >>> sweep_cells("runs/sweeps/02_defences-1a2b3c4d")[0]   # doctest: +SKIP
    ('seed=0', PosixPath('runs/sweeps/02_defences-1a2b3c4d/cells/seed=0-...'))
    """
    root = Path(sweep)
    path = root / SWEEP_FILE
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{root} is not a sweep folder (no {SWEEP_FILE}): pass a folder made by `emlab sweep`") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    runs = sweep_runs(root)
    params = [p for _, p in runs]
    varying = [k for k in dict.fromkeys(k for p in params for k in p)
               if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]
    return [(", ".join(f"{k}={p.get(k)}" for k in varying) or run_dir.name, run_dir) for run_dir, p in runs]


def cell_figures(run_dir: str | os.PathLike) -> dict[str, go.Figure]:
    """A run's figures: those redrawn from ``figure_data.json`` and the plotly JSON files under ``figures/``."""
    d = Path(run_dir)
    figs = dict(load_figures(d))
    for f in sorted((d / "figures").glob("*.json")) if (d / "figures").is_dir() else []:
        if f.stem not in figs:
            try:
                figs[f.stem] = pio.from_json(f.read_text(encoding="utf-8"))
            except ValueError:
                continue  # a JSON file that is not a plotly figure
    return figs


def _mean_heatmap(traces: list[Any]) -> Any | None:
    zs = [np.asarray(t.z, dtype=float) for t in traces if t.z is not None]
    if not zs or any(z.shape != zs[0].shape for z in zs):
        return None
    mean = traces[0]
    mean.z = np.nanmean(np.stack(zs), axis=0)
    return mean


def _num(text: Any) -> float | None:
    try:
        return float(re.sub(r"<[^>]+>", "", str(text)).strip().strip("*_").rstrip("%"))
    except ValueError:
        return None


def _mean_table(traces: list[Any]) -> Any | None:
    """A table trace whose numeric cells read ``mean ± sd`` over the cells' tables (same shape); text cells
    are the first table's."""
    cols = [list(t.cells.values) for t in traces]
    if not cols or any(len(c) != len(cols[0]) or any(len(a) != len(b) for a, b in zip(c, cols[0])) for c in cols):
        return None
    out = []
    for j, column in enumerate(cols[0]):
        new = []
        for i, first in enumerate(column):
            vals = [_num(c[j][i]) for c in cols]
            if all(v is not None for v in vals) and len(vals) > 1:
                new.append(f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}")
            else:
                new.append(first)
        out.append(new)
    table = traces[0]
    table.cells.values = out
    return table


def sweep_figures(sweep: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, go.Figure]:
    """One figure per figure name found in the sweep's finished cells, every cell's points on it.

    Each trace of a cell is copied with its legend group set to the trace's name (one legend entry per
    series, not per cell) and the cell's label in its hover text; markers are half transparent so that
    overlapping seeds show. Heatmaps become the mean over the cells and tables ``mean ± sd`` per numeric
    cell (when their shapes agree).
    """
    cells = sweep_cells(sweep)
    if not cells:
        raise ValueError(f"{sweep}: no finished cell to draw")
    per_name: dict[str, list[tuple[str, go.Figure]]] = {}
    for label, run_dir in cells:
        for name, fig in cell_figures(run_dir).items():
            if names is None or name in names:
                per_name.setdefault(name, []).append((label, fig))
    out: dict[str, go.Figure] = {}
    for name, figs in per_name.items():
        first = figs[0][1]
        fig = go.Figure(layout=first.layout)
        heat = [t for _, f in figs for t in f.data if t.type == "heatmap"]
        seen: set[str] = set()
        for label, f in figs:
            for i, t in enumerate(f.data):
                if t.type not in _OVERLAID:
                    continue
                group = t.name or f"trace {i}"
                t = t.to_plotly_json()
                t.update(legendgroup=group, showlegend=group not in seen, name=group)
                t["hovertext"] = label
                if t.get("type") == "bar":
                    t.pop("text", None)  # one value label per cell would pile up; the hover names the cell
                if t.get("type") == "scatter":
                    t.setdefault("marker", {})["opacity"] = 0.6
                fig.add_trace(t)
                seen.add(group)
        mean = _mean_heatmap(heat) if heat else None
        if mean is not None:
            fig.add_trace(mean)
        tables = [t for _, f in figs for t in f.data if t.type == "table"]
        table = _mean_table(tables) if tables else None
        if table is not None:
            fig.add_trace(table)
            mean = table
        if any(t.type == "bar" for t in fig.data):
            fig.update_layout(barmode="group")
        title = re.sub(r"\s*\(seed \d+\)|,\s*seed \d+", "", first.layout.title.text or name)  # the cells' seeds vary
        fig.update_layout(title=f"{title}<br><sup>{len(figs)} runs of {Path(sweep).name}"
                                f"{' (mean over runs)' if mean is not None else ''}</sup>")
        out[name] = fig
    return out


def save_sweep_figures(sweep: str | os.PathLike, formats: Sequence[str] = ("html",),
                       names: Sequence[str] | None = None) -> list[Path]:
    """Write :func:`sweep_figures` to ``<sweep>/figures/<name>.<format>``; returns the files written."""
    written: list[Path] = []
    for name, fig in sweep_figures(sweep, names).items():
        written += save(fig, Path(sweep) / "figures" / name, formats)
    return written
