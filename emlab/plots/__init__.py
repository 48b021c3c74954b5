"""Plotly figures for every plot the notebooks draw, plus saving and the figure record that lets
``emlab figures`` rebuild them from stored data.

Every plot function takes plain data (a dict of metrics, a list of row dicts or a pandas DataFrame,
as stored in a run) and returns a titled ``go.Figure``. Rates (keys ending in ``_em`` or
``_incoherent``) are fractions in [0, 1] and are drawn in percent; ``metrics.json`` stores them in
percent (the units are said once, in :mod:`emlab.metrics`): ``results_table(metrics, to_fraction=True)``
converts. Metrics of the defences use ``metrics.json`` keys ``<method>/<domain>[/<setting>]/<metric>``.

The package: :mod:`emlab.plots.defences` (Figure 1 and Table 2 of the defences paper),
:mod:`emlab.plots.figures` (every other figure), :mod:`emlab.plots.storage` (:func:`save`, static
export, :func:`record`, :func:`regenerate`, :func:`load_figures`, ``figure_data.json``),
:mod:`emlab.plots.sweep` (every figure of a sweep's runs on one figure: ``emlab figures --sweep``); the published
numbers are in :mod:`emlab.published`. Every public name is importable from ``emlab.plots``.

>>> fig = em_bars({"sft": 0.21, "kl": 0.02})
>>> record("runs/demo", "tradeoff", "defence_scatter", metrics={"sft/medical/general_em": 0.2,
...        "sft/medical/indomain_em": 0.5})  # doctest: +SKIP
"""

from emlab.plots._common import METHOD_LABELS, METHODS, METRICS, NO_JUDGMENTS
from emlab.plots.defences import defence_scatter, table2, table2_markdown
from emlab.plots.figures import (
    cosine_heatmap,
    em_bars,
    kl_vs_norm,
    loss_vs_norm,
    quadrant_scatter,
    stability_curves,
    steering_sweep,
    training_curves,
)
from emlab.plots.storage import FIGURE_DATA, FIGURE_TIMEOUT_S, PLOTS, load_figures, record, regenerate, save
from emlab.published import PAPER_TABLE, load_paper_table

__all__ = [
    "FIGURE_DATA",
    "FIGURE_TIMEOUT_S",
    "METHODS",
    "METHOD_LABELS",
    "METRICS",
    "NO_JUDGMENTS",
    "PAPER_TABLE",
    "PLOTS",
    "cosine_heatmap",
    "defence_scatter",
    "em_bars",
    "kl_vs_norm",
    "load_paper_table",
    "load_figures",
    "loss_vs_norm",
    "quadrant_scatter",
    "record",
    "regenerate",
    "save",
    "stability_curves",
    "steering_sweep",
    "table2",
    "table2_markdown",
    "training_curves",
]
