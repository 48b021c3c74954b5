"""What the figure modules of :mod:`emlab.plots` share: method names, labels and colours, the data
checks, percent axes and the metrics-to-rows reshaping (private to the package)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from emlab.metrics import results_table
from emlab.published import load_paper_table
from emlab.training.methods import EXTRA_METHODS, method_names
from emlab.training.methods import METHODS as TABLE2_METHODS

#: Method names, in table order: the training registry's (:func:`emlab.training.methods.method_names`; "sft" is
#: the undefended finetune, "untrained" the chat model).
METHODS = tuple(method_names())
#: The four numbers of Table 2, all rates in [0, 1].
METRICS = ("general_em", "general_incoherent", "indomain_em", "indomain_incoherent")

#: Display label of each method: the registry's (Table 2's wording, then the extra methods').
METHOD_LABELS = {m.name: m.label for m in (*TABLE2_METHODS, *EXTRA_METHODS)}
_METRIC_LABELS = {
    "general_em": "general EM",
    "general_incoherent": "general incoherence",
    "indomain_em": "in-domain EM",
    "indomain_incoherent": "in-domain incoherence",
}
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
)
_METHOD_COLORS = dict(zip(("sft", *[m for m in METHODS if m != "sft"]), ("#d62728", *_PALETTE[:3], *_PALETTE[4:])))
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon", "pentagon")
_TEMPLATE = "plotly_white"
NO_JUDGMENTS = "no judged values to draw (missing judgments: see none_reasons in metrics.json)"


def _frame(data: Any, what: str = "data") -> pd.DataFrame:
    """A DataFrame from a DataFrame, a list of row dicts, or a dict of columns."""
    if isinstance(data, pd.DataFrame):
        return data.copy()
    if isinstance(data, Mapping):
        return pd.DataFrame(dict(data))
    if isinstance(data, Iterable) and not isinstance(data, str | bytes):
        return pd.DataFrame(list(data))
    raise TypeError(f"{what} must be a DataFrame, a list of row dicts or a dict of columns, got {type(data).__name__}")


def _need(df: pd.DataFrame, cols: Iterable[str | None], what: str) -> None:
    missing = [c for c in cols if c is not None and c not in df.columns]
    if missing:
        raise KeyError(f"{what}: missing column(s) {missing}; the data has {list(df.columns)}")


def _no_data(fig: go.Figure, why: str) -> go.Figure:
    """Write ``why`` across an empty figure (a study whose judge returned no scores still gets its figure)."""
    fig.add_annotation(text=why, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font={"size": 14, "color": "#888"})
    return fig


def _is_rate(name: str) -> bool:
    return name.endswith(("_em", "_incoherent")) or name in ("em", "em_rate", "incoherent")


def _pct(values: Any, name: str) -> Any:
    """Fractions -> percent, refusing values that are already percentages."""
    s = pd.Series(values, dtype="float64")
    big = s[s > 1 + 1e-9]
    if len(big):
        raise ValueError(
            f"{name}: rates must be fractions in [0, 1] (as emlab.metrics returns them), got {big.iloc[0]:g}; "
            "divide percentages by 100"
        )
    return (s * 100).tolist()


def _axis_values(df: pd.DataFrame, col: str) -> list[float]:
    return _pct(df[col], col) if _is_rate(col) else df[col].astype("float64").tolist()


def _axis_title(col: str) -> str:
    label = _METRIC_LABELS.get(col, col.replace("_", " "))
    return f"{label} (%)" if _is_rate(col) else label


def _order(values: Iterable[str], preferred: Sequence[str] = METHODS) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [m for m in preferred if m in seen] + [m for m in seen if m not in preferred]


def _color(method: str, i: int = 0) -> str:
    return _METHOD_COLORS.get(method, _PALETTE[i % len(_PALETTE)])


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _wide(metrics: Any) -> pd.DataFrame:
    """Metrics as one row per (method, domain, variant) with a column per metric.

    Accepts a ``<method>/<domain>/<metric>`` dict (flat or nested; ``<method>/<domain>/<variant>/
    <metric>`` for seeds or settings: read by :func:`emlab.metrics.results_table`, values as given), a
    long frame (``method, domain, metric, value``) or a wide frame (``method, domain`` and metric columns).
    """
    if isinstance(metrics, Mapping):
        table = results_table(metrics)
        table = table[table["method"].notna()]
        cols = ["method", "domain", "setting", "metric", "value"]
        long = table[cols].rename(columns={"setting": "variant"}).reset_index(drop=True)
    else:
        long = _frame(metrics, "metrics")
        if "variant" not in long.columns:
            long["variant"] = long["setting"].fillna("").astype(str) if "setting" in long.columns else ""
        if not {"metric", "value"} <= set(long.columns):
            _need(long, ["method", "domain"], "metrics")
            long["variant"] = long["variant"].fillna("").astype(str)
            return long.reset_index(drop=True)
    _need(long, ["method", "domain", "metric", "value"], "metrics")
    if long.empty:
        return pd.DataFrame(columns=["method", "domain", "variant"])
    long["variant"] = long["variant"].fillna("").astype(str)
    wide = long.pivot_table(index=["method", "domain", "variant"], columns="metric", values="value", aggfunc="mean")
    return wide.reset_index().rename_axis(columns=None)


def _paper_wide(paper: Any) -> pd.DataFrame | None:
    if paper is None or paper is False:
        return None
    if paper is True:
        paper = load_paper_table()
    elif isinstance(paper, str | os.PathLike):
        paper = load_paper_table(paper)
    df = _frame(paper, "paper")
    if "variant" not in df.columns:
        df["variant"] = df["setting"].fillna("").astype(str) if "setting" in df.columns else ""
    _need(df, ["method", "domain"], "paper")
    return df


def _short(setting: str) -> str:
    """``lambda=0.1`` -> ``λ=0.1``, ``alpha=5`` -> ``α=5``, ``share=5%`` -> ``5%``."""
    return setting.replace("lambda=", "λ=").replace("alpha=", "α=").replace("share=", "")


def _natural_key(text: str) -> tuple[float, str]:
    """Sort settings such as ``share=5%`` < ``share=20%`` by their first number."""
    m = re.search(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", text)
    return (float(m.group()) if m else math.inf, text)

