"""Every notebook runs headless under papermill in smoke mode (the micro organism) and writes its results."""

import json
from pathlib import Path

import pytest

from emlab.notebooks import find_notebooks, notebook_parameters, run_notebook

NOTEBOOKS = sorted(p for p in (Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
REQUIRED = {"model", "seed", "out_dir", "smoke"}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_declares_the_common_parameters(nb):
    assert REQUIRED <= set(notebook_parameters(nb))


@pytest.mark.slow
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(nb, tmp_path):
    result = run_notebook(nb, {"smoke": True}, out_dir=tmp_path / nb.stem, timeout=600)
    assert result.ok, result.describe()
    metrics = json.loads((tmp_path / nb.stem / "metrics.json").read_text())
    assert metrics, "metrics.json is empty"
    figures = list((tmp_path / nb.stem / "figures").glob("*.html"))
    assert figures, "no figure written"
    shown = _output_text(tmp_path / nb.stem / nb.name)  # notebook output is for people:
    noise = ("{'loss'", "duplicate of line", "is_gradient_checkpointing", "`forward` was replaced")
    assert not [n for n in noise if n in shown], shown[-3000:]  # no per-step logs, no warnings about emlab's own data


def _output_text(path: Path) -> str:
    """Every text output (streams, tracebacks, plain-text reprs) of an executed notebook, in one string."""
    out = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        for o in cell.get("outputs", []):
            text = o.get("text", o.get("data", {}).get("text/plain", "")) or "\n".join(o.get("traceback", []))
            out.append(text if isinstance(text, str) else "".join(text))
    return "\n".join(out)


def test_all_notebooks_found():
    assert [p.name for p in find_notebooks(NOTEBOOKS[0].parent)][0] == "quickstart.ipynb"
    assert {"quickstart.ipynb", "00_em_organism.ipynb", "04_evaluation.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_cells_define_nothing(nb):
    """Notebook cells are steps of public calls: no function or class is defined in one (issue 17)."""
    import ast

    for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code":
            source = "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
            defined = [type(n).__name__ for n in ast.walk(ast.parse(source))
                       if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)]
            assert not defined, f"{nb.name} cell {i} defines {defined}"
