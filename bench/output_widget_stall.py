"""Count cells that stall when a notebook captures plotly figures into ipywidgets.Output (issue 15).

Usage: python bench/output_widget_stall.py [N_CELLS] [LIMIT_S]

Builds a notebook of N cells doing ``with out: display(fig)`` and runs it twice, with plain papermill
and with emlab's engine (``emlab.notebooks.run_notebook``), each with a per-cell limit of LIMIT
seconds. A stalled cell is one that ends at the limit although its code takes milliseconds: its
``execute_reply`` was lost by the client (docs/failures.md). Prints the stalled count of each.
"""

import sys
import tempfile
from pathlib import Path

import nbformat
import papermill as pm

from emlab.notebooks import run_notebook

n, limit = (int(sys.argv[1]) if len(sys.argv) > 1 else 30), (int(sys.argv[2]) if len(sys.argv) > 2 else 10)
tmp = Path(tempfile.mkdtemp(prefix="emlab-stall-"))
nb = nbformat.v4.new_notebook()
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
setup = "import ipywidgets as W\nimport plotly.graph_objects as go\nfrom IPython.display import display\n"
setup += "fig = go.Figure([go.Bar(x=['a', 'b'], y=[2, 3])])"
nb.cells = [nbformat.v4.new_code_cell(setup)] + [
    nbformat.v4.new_code_cell("o = W.Output()\nwith o:\n    display(fig)\no") for _ in range(n)
]
nbformat.write(nb, str(tmp / "stall.ipynb"))


def stalled(path: Path) -> str:
    d = [c.metadata["papermill"]["duration"] for c in nbformat.read(str(path), as_version=4).cells[1:]]
    return f"{sum(x >= limit - 1 for x in d)} of {len(d)} cells stalled (slowest {max(d):.2f} s)"


pm.execute_notebook(str(tmp / "stall.ipynb"), str(tmp / "plain.ipynb"), execution_timeout=limit, progress_bar=False)
print(f"plain papermill: {stalled(tmp / 'plain.ipynb')}")
r = run_notebook(tmp / "stall.ipynb", out_dir=tmp / "emlab", timeout=limit)
print(f"emlab engine:    {stalled(r.output)}")
