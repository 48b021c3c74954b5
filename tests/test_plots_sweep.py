"""emlab.plots.sweep: every figure of a sweep's cells drawn once, points per seed; `emlab figures --sweep`."""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import pytest

from emlab.cli import main
from emlab.plots import record
from emlab.plots.sweep import cell_figures, save_sweep_figures, sweep_cells, sweep_figures


def make_sweep(root: Path, seeds=(0, 1, 2)) -> Path:
    cells = []
    for s in seeds:
        d = root / "cells" / f"seed={s}"
        record(d, "em", "em_bars", formats=("html",), metrics={"sft": 0.2 + 0.1 * s, "kl": 0.02})
        record(d, "cos", "cosine_heatmap", formats=("html",),
               rows=[{"a": "x", "b": "y", "layer": 1, "cos": 0.1 * s}])
        table = go.Figure(go.Table(header={"values": ["method", "EM"]},
                                   cells={"values": [["sft", "kl"], [f"<u>{10 + s}</u>", "2.0"]]}))
        table.write_json(d / "figures" / "table.json")
        scatter = go.Figure(go.Scatter(x=[s], y=[2 * s], mode="markers", name="pts"), layout={"title": f"pts (seed {s})"})
        scatter.write_json(d / "figures" / "pts.json")
        cells.append({"name": f"seed={s}", "parameters": {"seed": s, "domain": "medical"}, "run_dir": f"cells/seed={s}",
                      "status": "ok"})
    cells.append({"name": "seed=9", "parameters": {"seed": 9, "domain": "medical"}, "run_dir": "cells/seed=9",
                  "status": "failed"})
    (root / "sweep.json").write_text(json.dumps({"cells": cells}))
    return root


def test_every_figure_is_drawn_once_with_every_cells_points(tmp_path):
    sw = make_sweep(tmp_path / "sw")
    assert [label for label, _ in sweep_cells(sw)] == ["seed=0", "seed=1", "seed=2"]  # failed cell left out
    assert set(cell_figures(sw / "cells" / "seed=0")) == {"em", "cos", "table", "pts"}
    figs = sweep_figures(sw)
    assert set(figs) == {"em", "cos", "table", "pts"}
    pts = figs["pts"]
    assert [t.x[0] for t in pts.data] == [0, 1, 2] and [t.hovertext for t in pts.data] == ["seed=0", "seed=1", "seed=2"]
    assert [t.showlegend for t in pts.data] == [True, False, False]  # one legend entry per series
    assert "seed" not in pts.layout.title.text.split("<br>")[0] and "3 runs of sw" in pts.layout.title.text
    bars = figs["em"].data
    assert len(bars) == 3 and figs["em"].layout.barmode == "group"
    heat = [t for t in figs["cos"].data if t.type == "heatmap"]
    assert len(heat) == 1 and "mean over runs" in figs["cos"].layout.title.text
    assert [v for row in heat[0].z for v in row] == pytest.approx([1.0, 0.1, 0.1, 1.0])  # mean of 0.0, 0.1, 0.2
    table = figs["table"].data[0]
    assert list(table.cells.values[1]) == ["11.0 ± 1.0", "2.0 ± 0.0"] and list(table.cells.values[0]) == ["sft", "kl"]
    assert set(sweep_figures(sw, names=["em"])) == {"em"}


def test_cli_writes_sweep_figures_and_names_bad_folders(tmp_path, capsys):
    sw = make_sweep(tmp_path / "sw", seeds=(0, 1))
    assert main(["figures", "--sweep", str(sw)]) == 0
    assert sorted(p.name for p in (sw / "figures").glob("*.html")) == ["cos.html", "em.html", "pts.html", "table.html"]
    assert main(["figures", "--sweep", str(tmp_path / "nope")]) == 1
    assert "not a sweep folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sweep.json").write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="no finished cell"):
        save_sweep_figures(empty)
