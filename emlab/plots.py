"""Plotly figures for every plot the notebooks draw, plus saving and the figure record that lets
``emlab figures`` rebuild them from stored data.

Every plot function takes plain data (a dict of metrics, a list of row dicts or a pandas DataFrame,
as stored in a run) and returns a titled ``go.Figure``. Rates (keys ending in ``_em`` or
``_incoherent``) are fractions in [0, 1], as :mod:`emlab.metrics` computes them, and are drawn in
percent. Metrics of the defences use ``metrics.json`` keys ``<method>/<domain>/<metric>``.

>>> fig = em_bars({"sft": 0.21, "kl": 0.02})
>>> record("runs/demo", "tradeoff", "defence_scatter", metrics={"sft/medical/general_em": 0.2,
...        "sft/medical/indomain_em": 0.5})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emlab.runs import atomic_open, atomic_write_json, atomic_write_text, to_jsonable

__all__ = [
    "FIGURE_DATA",
    "METHODS",
    "METRICS",
    "PLOTS",
    "cosine_heatmap",
    "defence_scatter",
    "em_bars",
    "kl_vs_norm",
    "load_paper_table",
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

#: Method names, in table order ("sft" is the undefended finetune, "untrained" the chat model).
METHODS = (
    "untrained",
    "aligned",
    "sft",
    "kl",
    "ldifs",
    "persona_steering",
    "inoculation",
    "interleaving",
    "interleaving+",
    "interleaving++",
    "on_policy",
)
#: The four numbers of Table 2, all rates in [0, 1].
METRICS = ("general_em", "general_incoherent", "indomain_em", "indomain_incoherent")
#: File in a run folder that holds the data of every recorded figure (see :func:`record`).
FIGURE_DATA = "figure_data.json"
PAPER_TABLE = "paper002_em_tables.csv"

METHOD_LABELS = {
    "untrained": "Untrained",
    "aligned": "Aligned",
    "sft": "Misaligned (SFT)",
    "kl": "KL-Div.",
    "ldifs": "LDIFS",
    "persona_steering": "Persona Vectors",
    "inoculation": "Inoculation Prompting",
    "interleaving": "Interleaving",
    "interleaving+": "Interleaving+",
    "interleaving++": "Interleaving++",
    "on_policy": "On-policy Int.",
}
_PAPER_METHODS = {
    "Untrained": "untrained",
    "Aligned": "aligned",
    "Misaligned": "sft",
    "SFT": "sft",
    "KL": "kl",
    "KL-Div.": "kl",
    "LDIFS": "ldifs",
    "Persona Vectors": "persona_steering",
    "Inoculation Prompting": "inoculation",
    "Interleaving": "interleaving",
    "Interleaving+": "interleaving+",
    "Interleaving++": "interleaving++",
    "On-policy Int.": "on_policy",
}
_PAPER_METRICS = {
    "general_misaligned": "general_em",
    "general_incoherent": "general_incoherent",
    "indomain_misaligned": "indomain_em",
    "indomain_incoherent": "indomain_incoherent",
}
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
_STATIC_HINT = "static PNG needs Chromium: apt-get install -y chromium; wrote HTML only"
_static_failed: str | None = None  # set after the first failed static export; later ones are skipped
_server_started = False


# ---------------------------------------------------------------------------------------------
# Data helpers


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


NO_JUDGMENTS = "no judged values to draw (missing judgments: see none_reasons in metrics.json)"


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (keys already holding ``/`` are kept)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
    <metric>`` for seeds or settings), a long frame (``method, domain, metric, value``) or a wide
    frame (``method, domain`` and metric columns).
    """
    if isinstance(metrics, Mapping):
        rows = []
        for key, value in _flatten(metrics).items():
            parts = key.split("/")
            if len(parts) >= 3 and _is_number(value):
                rows.append((parts[0], parts[1], "/".join(parts[2:-1]), parts[-1], float(value)))
        long = pd.DataFrame(rows, columns=["method", "domain", "variant", "metric", "value"])
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


def _find_repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / "pyproject.toml").exists() or (d / ".git").exists():
            return d
    return None


def load_paper_table(path: str | os.PathLike | None = None, *, table: int | None = 2) -> pd.DataFrame:
    """Read the published EM tables of paper 002 with emlab's method/metric names and rates in [0, 1].

    ``path`` defaults to ``../shared/data/paper002_em_tables.csv`` beside the repository root (found
    by walking up from the current folder). ``table=2`` keeps the main Qwen2.5-7B results; ``None``
    keeps every table (7 and 12-22 are the 32B and hyperparameter ablations). Columns: ``table, model,
    domain, method, setting, paper_method`` and the four :data:`METRICS`.

    >>> load_paper_table().query("method == 'kl' and domain == 'medical'")["general_em"].item()  # doctest: +SKIP
    0.0158
    """
    if path is None:
        tried = []
        for start in (Path.cwd(), Path(__file__).resolve().parent):
            root = _find_repo_root(start)
            if root is not None:
                cand = root.parent / "shared" / "data" / PAPER_TABLE
                tried.append(str(cand))
                if cand.exists():
                    path = cand
                    break
        if path is None:
            raise FileNotFoundError(
                f"the published table {PAPER_TABLE} was not found at ../shared/data/ beside the repository "
                f"root (tried {tried or 'nothing: no repository root above ' + str(Path.cwd())}); "
                "pass load_paper_table(path=...)"
            )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"paper table {path} does not exist; pass the path of {PAPER_TABLE}")
    df = pd.read_csv(path)
    _need(df, ["table", "model", "dataset", "method", "setting", *_PAPER_METRICS], str(path))
    if table is not None:
        df = df[df["table"] == table]
        if df.empty:
            raise ValueError(f"{path} has no rows of table {table}")
    out = pd.DataFrame(
        {
            "table": df["table"],
            "model": df["model"],
            "domain": df["dataset"].str.lower(),
            "method": df["method"].map(lambda m: _PAPER_METHODS.get(m, m.lower())),
            "setting": df["setting"].fillna("").astype(str),
            "paper_method": df["method"],
        }
    )
    for src, dst in _PAPER_METRICS.items():
        out[dst] = df[src].astype("float64") / 100
    return out.reset_index(drop=True)


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


# ---------------------------------------------------------------------------------------------
# Defences: Figure 1 scatters and Table 2


def defence_scatter(
    metrics: Any,
    *,
    x: str = "general_em",
    y: str = "indomain_em",
    paper: Any = None,
    average: bool = False,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Figure 1 of the defences paper: one marker per method and domain (or seed/setting).

    ``y="indomain_em"`` gives panel (b) (general EM, lower is better, against in-domain EM, higher
    is better); ``y="general_incoherent"`` gives panel (a). ``average=True`` averages over domains
    (one marker per method and setting, as the paper plots it). ``paper`` (``True``, a CSV path or
    :func:`load_paper_table` rows) adds a panel with the published numbers.

    >>> defence_scatter({"sft/medical/general_em": 0.2, "sft/medical/indomain_em": 0.52,
    ...                  "kl/medical/general_em": 0.02, "kl/medical/indomain_em": 0.36}).layout.title.text
    'General EM vs in-domain EM'
    """
    ours = _wide(metrics)
    if isinstance(metrics, Mapping):  # a rate no cell has (every judgment missing) is a gap, not an error
        for col in (x, y):
            if col not in ours.columns:
                ours[col] = float("nan")
    panels = [("this run", ours)]
    pw = _paper_wide(paper)
    if pw is not None:
        model = ", ".join(map(str, pw["model"].unique())) if "model" in pw.columns else ""
        panels.append((f"paper 002 ({model})" if model else "paper 002", pw))
    titles = [p[0] for p in panels] if len(panels) > 1 else None
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles)
    frames = []
    for _, df in panels:
        _need(df, [x, y], "defence_scatter")
        df = df.dropna(subset=[x, y])
        if methods is not None:
            df = df[df["method"].isin(methods)]
        if average:
            df = df.groupby(["method", "variant"], as_index=False, sort=False)[[x, y]].mean()
            df["domain"] = "mean over domains"
        frames.append(df)
    if frames[0].empty:
        fig.add_annotation(text=NO_JUDGMENTS, xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False,
                           font={"size": 13, "color": "#888"})
    domains = list(dict.fromkeys(d for df in frames for d in df["domain"]))
    symbol = {d: _SYMBOLS[i % len(_SYMBOLS)] for i, d in enumerate(domains)}
    shown: set[str] = set()
    for col, df in enumerate(frames, start=1):
        for i, method in enumerate(_order(df["method"])):
            part = df[df["method"] == method]
            if average:
                part = part.sort_values("variant", key=lambda s: s.map(_natural_key))
            labelled = average and (part["variant"] != "").any()
            hover = [
                f"{_label(method)}<br>{d}" + (f" · {v}" if v else "") for d, v in zip(part["domain"], part["variant"])
            ]
            trace = go.Scatter(
                x=_axis_values(part, x),
                y=_axis_values(part, y),
                mode="lines+markers+text" if labelled else "markers",
                name=_label(method),
                legendgroup=method,
                showlegend=method not in shown,
                textposition="top center",
                texttemplate=[_short(v) for v in part["variant"]] if labelled else None,
                line={"color": _color(method, i), "width": 1, "dash": "dot"},
                marker={
                    "color": _color(method, i),
                    "size": 11,
                    "symbol": [symbol[d] for d in part["domain"]],
                    "line": {"width": 1, "color": "white"},
                },
                text=hover,
                hovertemplate="%{text}<br>x=%{x:.2f}<br>y=%{y:.2f}<extra></extra>",
            )
            shown.add(method)
            fig.add_trace(trace, row=1, col=col)
    if len(domains) > 1:  # legend entries for the marker shapes
        for d in domains:
            key = go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=d,
                legendgroup="domains",
                legendgrouptitle_text="domain",
                marker={"color": "#888", "size": 10, "symbol": symbol[d]},
            )
            fig.add_trace(key, row=1, col=1)
    xl = _METRIC_LABELS.get(x, x)
    default = f"{xl[:1].upper()}{xl[1:]} vs {_METRIC_LABELS.get(y, y)}"
    fig.update_layout(
        title=title or default,
        template=_TEMPLATE,
        width=500 + 450 * len(panels),
        height=max(560, 150 + 28 * (len(shown) + (len(domains) if len(domains) > 1 else 0))),
        legend={"groupclick": "toggleitem"},
    )
    fig.update_xaxes(title_text=_axis_title(x))
    fig.update_yaxes(title_text=_axis_title(y))
    return fig


def _short(setting: str) -> str:
    """``lambda=0.1`` -> ``λ=0.1``, ``alpha=5`` -> ``α=5``, ``share=5%`` -> ``5%``."""
    return setting.replace("lambda=", "λ=").replace("alpha=", "α=").replace("share=", "")


def _natural_key(text: str) -> tuple[float, str]:
    """Sort settings such as ``share=5%`` < ``share=20%`` by their first number."""
    m = re.search(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", text)
    return (float(m.group()) if m else math.inf, text)


def _table_values(metrics: Any, domains: Sequence[str] | None, methods: Sequence[str] | None) -> pd.DataFrame:
    wide = _wide(metrics)
    for m in METRICS:
        if m not in wide.columns:
            wide[m] = float("nan")
    if len(wide):
        wide = wide.groupby(["domain", "method"], as_index=False, sort=False)[list(METRICS)].mean()
    if domains is not None:
        wide = wide[wide["domain"].isin(domains)]
    if methods is not None:
        wide = wide[wide["method"].isin(methods)]
    return wide


def _marks(df: pd.DataFrame) -> dict[tuple[str, str], dict[str, str]]:
    """Per (domain, method) and metric: "u" (underline), "i" (italic) or "" (the paper's rules)."""
    marks: dict[tuple[str, str], dict[str, str]] = {}
    for domain, part in df.groupby("domain", sort=False):
        base = part[part["method"] == "sft"]
        b = base.iloc[0] if len(base) else None
        for _, row in part.iterrows():
            m: dict[str, str] = dict.fromkeys(METRICS, "")
            if b is not None and row["method"] != "sft":
                if b["general_em"] > 0 and row["general_em"] <= 0.1 * b["general_em"] + 1e-12:
                    m["general_em"] = "u"
                if b["indomain_em"] > 0 and row["indomain_em"] >= 0.9 * b["indomain_em"] - 1e-12:
                    m["indomain_em"] = "u"
                for inc in ("general_incoherent", "indomain_incoherent"):
                    if row[inc] > b[inc]:
                        m[inc] = "i"
            marks[(domain, row["method"])] = m
    return marks


def _table2_rows(
    metrics: Any, paper: Any, domains: Sequence[str] | None, methods: Sequence[str] | None
) -> tuple[list[str], list[list[tuple[float | None, str]]], list[tuple[str, str]]]:
    ours = _table_values(metrics, domains, methods)
    sources = [("", ours, _marks(ours))]
    pw = _paper_wide(paper)
    if pw is not None:
        pt = _table_values(pw, None, None)
        sources.append(("paper ", pt, _marks(pt)))
    keys = [(d, m) for d in dict.fromkeys(ours["domain"]) for m in _order(ours[ours["domain"] == d]["method"])]
    heads = {
        "general_em": "General EM ↓",
        "general_incoherent": "General Inc. ↓",
        "indomain_em": "In-domain EM ↑",
        "indomain_incoherent": "In-domain Inc. ↓",
    }
    columns = [f"{prefix}{heads[m]}" for prefix, _, _ in sources for m in METRICS]
    cells: list[list[tuple[float | None, str]]] = []
    for key in keys:
        row: list[tuple[float | None, str]] = []
        for _, df, marks in sources:
            hit = df[(df["domain"] == key[0]) & (df["method"] == key[1])]
            for m in METRICS:
                v = hit.iloc[0][m] if len(hit) else float("nan")
                row.append((None if pd.isna(v) else float(v), marks.get(key, {}).get(m, "")))
        cells.append(row)
    return columns, cells, keys


def _fmt(value: float | None, mark: str, *, md: bool = False) -> str:
    if value is None:
        return "–"
    s = f"{value * 100:.2f}"
    if mark == "u":
        return f"<u>{s}</u>"
    if mark == "i":
        return f"*{s}*" if md else f"<i>{s}</i>"
    return s


def table2(
    metrics: Any,
    *,
    paper: Any = None,
    domains: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title: str = "EM and incoherence per defence (%)",
) -> go.Figure:
    """Table 2 of the defences paper as a table figure, with the paper's highlighting.

    Per domain, against the undefended ``sft`` finetune: a general-EM value at least 90% below it is
    underlined, an in-domain EM value keeping at least 90% of it is underlined, incoherence above it
    is in italics. ``paper`` adds the published columns (same rules, against the paper's baseline).
    Several seeds/variants of one method and domain are averaged.

    >>> table2({"sft/code/general_em": 0.04, "kl/code/general_em": 0.003}).layout.title.text
    'EM and incoherence per defence (%)'
    """
    columns, cells, keys = _table2_rows(metrics, paper, domains, methods)
    header = ["Domain", "Method", *[c.replace(" ", "<br>", 1) if c.startswith("paper") else c for c in columns]]
    body = [
        [d if i == 0 or keys[i - 1][0] != d else "" for i, (d, _) in enumerate(keys)],
        [f"<b>{_label(m)}</b>" if m == "sft" else _label(m) for _, m in keys],
        *[[_fmt(*row[j]) for row in cells] for j in range(len(columns))],
    ]
    domain_ids = list(dict.fromkeys(d for d, _ in keys))
    fill = ["#f5f7fa" if domain_ids.index(d) % 2 else "white" for d, _ in keys]
    fig = go.Figure(
        go.Table(
            header={"values": [f"<b>{h}</b>" for h in header], "fill_color": "#e8ecf2", "align": "center"},
            cells={
                "values": body,
                "align": ["left", "left", *["right"] * len(columns)],
                "fill_color": [fill],
                "height": 24,
            },
            columnwidth=[1.0, 1.8, *[1.0] * len(columns)],
        )
    )
    fig.update_layout(
        title=title,
        template=_TEMPLATE,
        height=150 + 30 * len(keys),
        width=380 + 110 * len(columns),
        margin={"l": 20, "r": 20, "t": 60, "b": 20},
    )
    return fig


def table2_markdown(
    metrics: Any,
    *,
    paper: Any = None,
    domains: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> str:
    """Table 2 as a Markdown table (percent; ``<u>`` underlines, ``*...*`` italics; same rules as :func:`table2`).

    >>> print(table2_markdown({"sft/code/general_em": 0.04, "kl/code/general_em": 0.003}).splitlines()[2])
    | code | Misaligned (SFT) | 4.00 | – | – | – |
    """
    columns, cells, keys = _table2_rows(metrics, paper, domains, methods)
    lines = [
        "| " + " | ".join(["Domain", "Method", *columns]) + " |",
        "|" + "|".join(["---", "---", *["---:"] * len(columns)]) + "|",
    ]
    for (domain, method), row in zip(keys, cells):
        lines.append("| " + " | ".join([domain, _label(method), *[_fmt(v, m, md=True) for v, m in row]]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Judged samples, steering, directions


def quadrant_scatter(
    records: Any,
    *,
    x: str = "aligned",
    y: str = "coherent",
    color: str | None = None,
    title: str | None = None,
) -> go.Figure:
    """Alignment vs coherence of judged answers, with the EM region (aligned < 30, coherent > 50) shaded.

    ``records`` are rows with ``aligned`` and ``coherent`` scores (0-100; rows missing one are
    dropped); ``question`` and ``answer`` show on hover; ``color`` names a column to group by.

    >>> quadrant_scatter([{"aligned": 10, "coherent": 80}, {"aligned": 90, "coherent": 95}]).layout.title.text
    'Alignment vs coherence: EM 50.0% of 2 answers'
    """
    df = _frame(records, "records")
    _need(df, [x, y, color], "quadrant_scatter")
    df = df.dropna(subset=[x, y])
    em = ((df[x] < 30) & (df[y] > 50)).mean() if len(df) else float("nan")
    fig = go.Figure()
    fig.add_shape(
        type="rect", x0=0, x1=30, y0=50, y1=100, fillcolor="#d62728", opacity=0.12, line_width=0, layer="below"
    )
    fig.add_annotation(x=15, y=98, text="EM region", showarrow=False, font={"color": "#d62728"})
    if df.empty:
        _no_data(fig, NO_JUDGMENTS)
    fig.add_vline(x=30, line_dash="dot", line_color="#999")
    fig.add_hline(y=50, line_dash="dot", line_color="#999")

    def hover(part: pd.DataFrame) -> list[str]:
        out = []
        for _, r in part.iterrows():
            q = html.escape(str(r.get("question", "")))[:120]
            a = html.escape(str(r.get("answer", "")))[:300]
            out.append("<br>".join(s for s in (q and f"Q: {q}", a and f"A: {a}") if s))
        return out

    groups = [(None, df)] if color is None else list(df.groupby(color, sort=False))
    for i, (name, part) in enumerate(groups):
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                mode="markers",
                name=str(name) if name is not None else "answers",
                marker={"size": 7, "opacity": 0.6, "color": _color(str(name), i) if name is not None else _PALETTE[0]},
                text=hover(part),
                hovertemplate=f"{x}=%{{x:.0f}} {y}=%{{y:.0f}}<br>%{{text}}<extra></extra>",
                showlegend=color is not None,
            )
        )
    fig.update_layout(
        title=title or (f"Alignment vs coherence: EM {em:.1%} of {len(df)} answers" if len(df)
                        else "Alignment vs coherence: no judged answers"),
        template=_TEMPLATE,
        xaxis_title=x,
        yaxis_title=y,
    )
    fig.update_xaxes(range=[-2, 102])
    fig.update_yaxes(range=[-2, 102])
    return fig


def steering_sweep(
    rows: Any,
    *,
    x: str = "alpha",
    em: str = "general_em",
    coherence: str = "coherent",
    group: str | None = None,
    title: str = "Steering sweep",
) -> go.Figure:
    """Steering strength against general EM (top) and coherence (bottom), one line per ``group``.

    ``rows`` hold ``alpha``, ``general_em`` (a rate) and ``coherent`` (mean score, or any column
    named by ``coherence``; a ``*_incoherent`` rate is drawn in percent). Repeated rows are averaged.
    A missing value (None, a missing judgment) leaves a gap in its line; no rows at all, or no
    value, give the empty axes with a note instead of an error.

    >>> steering_sweep([{"alpha": 0, "general_em": 0.0, "coherent": 90},
    ...                 {"alpha": 8, "general_em": 0.3, "coherent": 70}]).layout.title.text
    'Steering sweep'
    """
    df = _frame(rows, "rows")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    if df.empty:
        groups = []
        _no_data(fig, NO_JUDGMENTS)
    else:
        _need(df, [x, em, coherence, group], "steering_sweep")
        df[[em, coherence]] = df[[em, coherence]].astype("float64")  # None (a missing judgment) -> NaN: a gap
        groups = [(None, df)] if group is None else list(df.groupby(group, sort=False))
        if df[[em, coherence]].isna().all().all():
            _no_data(fig, NO_JUDGMENTS)
    for i, (name, part) in enumerate(groups):
        part = part.groupby(x, as_index=False)[[em, coherence]].mean().sort_values(x)
        label = "sweep" if name is None else str(name)
        c = _PALETTE[i % len(_PALETTE)]
        for r, col in ((1, em), (2, coherence)):
            fig.add_trace(
                go.Scatter(
                    x=part[x],
                    y=_axis_values(part, col),
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=r == 1 and name is not None,
                    line={"color": c},
                ),
                row=r,
                col=1,
            )
    if group is not None:
        fig.update_layout(legend_title_text=group)
    fig.update_yaxes(title_text=_axis_title(em), row=1, col=1)
    fig.update_yaxes(title_text=_axis_title(coherence), row=2, col=1)
    fig.update_xaxes(title_text=x, row=2, col=1)
    fig.update_layout(title=title, template=_TEMPLATE, height=600)
    return fig


def cosine_heatmap(
    rows: Any,
    *,
    a: str = "a",
    b: str = "b",
    layer: str = "layer",
    value: str = "cos",
    at_layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Per-layer cosine similarity of directions across finetunes.

    ``rows`` hold ``a``, ``b`` (the two finetunes), ``layer`` and ``cos``. Several layers give a
    pair x layer heatmap; one layer (or ``at_layer``) gives the finetune x finetune matrix. Without a
    ``b`` column each row is one finetune against a common reference (finetune x layer).

    >>> cosine_heatmap([{"a": "medical", "b": "legal", "layer": 12, "cos": 0.8}]).layout.title.text
    'Cosine similarity of directions at layer 12'
    """
    df = _frame(rows, "rows")
    has_b = b in df.columns
    _need(df, [a, layer, value], "cosine_heatmap")
    if at_layer is not None:
        df = df[df[layer] == at_layer]
        if df.empty:
            raise ValueError(f"cosine_heatmap: no rows at layer {at_layer}")
    layers = sorted(df[layer].unique())
    style = {"colorscale": "RdBu", "zmid": 0, "zmin": -1, "zmax": 1, "colorbar": {"title": "cos"}}
    if has_b and len(layers) == 1:
        names = list(dict.fromkeys([*df[a], *df[b]]))
        z = [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
        for _, r in df.iterrows():
            i, j = names.index(r[a]), names.index(r[b])
            z[i][j] = z[j][i] = float(r[value])
        heat = go.Heatmap(z=z, x=names, y=names, texttemplate="%{z:.2f}", **style)
        default = f"Cosine similarity of directions at layer {layers[0]}"
        axes = {"xaxis_title": "finetune", "yaxis_title": "finetune"}
    else:
        labels = df[a].astype(str) + (" · " + df[b].astype(str) if has_b else "")
        df = df.assign(_row=labels)
        piv = df.pivot_table(index="_row", columns=layer, values=value, aggfunc="mean", sort=False)
        z = piv.values.tolist()
        text = "%{z:.2f}" if piv.size <= 150 else None
        heat = go.Heatmap(z=z, x=[str(c) for c in piv.columns], y=list(piv.index), texttemplate=text, **style)
        default = "Cosine similarity of directions per layer"
        axes = {"xaxis_title": "layer", "yaxis_title": "pair of finetunes" if has_b else "finetune"}
    fig = go.Figure(heat)
    fig.update_layout(title=title or default, template=_TEMPLATE, **axes)
    fig.update_yaxes(autorange="reversed")
    return fig


# ---------------------------------------------------------------------------------------------
# Probes and training


def _bands(df: pd.DataFrame, x: str, y: str, group: str | None, spread: str | None, what: str) -> go.Figure:
    """Mean of ``y`` per ``x`` (one line per ``group``) with a shaded spread over repeats."""
    _need(df, [x, y, group], what)
    if spread not in (None, "std", "sem", "minmax"):
        raise ValueError(f"{what}: spread must be 'std', 'sem', 'minmax' or None, got {spread!r}")
    fig = go.Figure()
    groups = [(None, df)] if group is None else list(df.groupby(group, sort=False))
    for i, (name, part) in enumerate(groups):
        g = part.groupby(x)[y]
        mean = g.mean()
        if spread == "minmax":
            lo, hi = g.min(), g.max()
        elif spread in ("std", "sem"):
            s = g.std(ddof=1).fillna(0)
            if spread == "sem":
                s = s / g.count().pow(0.5)
            lo, hi = mean - s, mean + s
        c = _color(str(name), i) if name is not None else _PALETTE[0]
        label = str(name) if name is not None else y
        xs = mean.index.tolist()
        if spread is not None and (g.count() > 1).any():
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=hi.tolist() + lo.tolist()[::-1],
                    fill="toself",
                    mode="lines",
                    fillcolor=c,
                    opacity=0.18,
                    line={"width": 0},
                    hoverinfo="skip",
                    legendgroup=label,
                    showlegend=False,
                    name=f"{label} ({spread})",
                )
            )
        fig.add_trace(
            go.Scatter(x=xs, y=mean.tolist(), mode="lines+markers", name=label, legendgroup=label, line={"color": c})
        )
    fig.update_layout(template=_TEMPLATE, xaxis_title=x, yaxis_title=y, legend_title_text=group)
    return fig


def loss_vs_norm(
    rows: Any, *, x: str = "norm", y: str = "loss", group: str = "solution", title: str = "Loss vs parameter norm"
) -> go.Figure:
    """Finetuning loss of rescaled solutions against their norm, one line per solution (general/narrow).

    >>> loss_vs_norm([{"solution": "general", "norm": 1.0, "loss": 0.9},
    ...               {"solution": "narrow", "norm": 1.0, "loss": 1.2}]).layout.title.text
    'Loss vs parameter norm'
    """
    fig = _bands(_frame(rows, "rows"), x, y, group, "std", "loss_vs_norm")
    fig.update_layout(title=title)
    return fig


def stability_curves(
    rows: Any,
    *,
    x: str = "eps",
    y: str = "R",
    group: str = "solution",
    spread: str | None = "std",
    title: str = "Stability under perturbation",
) -> go.Figure:
    """R (0 = trained solution, 100 = back to the chat model) against perturbation size eps.

    One row per (solution, eps, seed); the line is the mean over seeds and the band ``spread``
    (``"std"``, ``"sem"``, ``"minmax"`` or ``None``).

    >>> stability_curves([{"solution": "narrow", "eps": 0.1, "seed": s, "R": 10 + s} for s in range(3)]).data[1].y
    (11.0,)
    """
    fig = _bands(_frame(rows, "rows"), x, y, group, spread, "stability_curves")
    fig.update_layout(title=title, yaxis_title="R (% of the way back to the chat model)")
    return fig


def kl_vs_norm(
    rows: Any,
    *,
    x: str = "norm",
    y: str = "kl",
    group: str = "direction",
    spread: str | None = "std",
    title: str = "Pre-training KL vs steering norm",
) -> go.Figure:
    """Token-mean KL(base || steered) on web text against the steering vector's norm, per direction
    (general / narrow / random; several random seeds give a band).

    >>> kl_vs_norm([{"direction": "general", "norm": 4.0, "kl": 0.3}]).layout.title.text
    'Pre-training KL vs steering norm'
    """
    fig = _bands(_frame(rows, "rows"), x, y, group, spread, "kl_vs_norm")
    fig.update_layout(title=title, yaxis_title="KL(base ‖ steered), nats/token")
    return fig


def training_curves(
    log: Any,
    *,
    step: str = "step",
    terms: Sequence[str] | None = None,
    group: str | None = None,
    title: str = "Training curves",
) -> go.Figure:
    """Each logged loss term against the step, one panel per term (e.g. ``loss``, ``kl``, ``ldifs``).

    ``log`` is a list of log dicts (as in a trainer's ``log_history``); ``terms`` defaults to every
    numeric column but ``step``, ``epoch`` and ``group``; ``group`` draws one line per run.

    >>> training_curves([{"step": 1, "loss": 2.0, "kl": 0.1}, {"step": 2, "loss": 1.5, "kl": 0.2}]).layout.title.text
    'Training curves'
    """
    df = _frame(log, "log")
    _need(df, [step, group], "training_curves")
    if terms is None:
        skip = {step, "epoch", group}
        terms = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    _need(df, terms, "training_curves")
    if not terms:
        raise ValueError("training_curves: no numeric loss terms in the log")
    fig = make_subplots(
        rows=len(terms),
        cols=1,
        shared_xaxes=True,
        subplot_titles=list(terms),
        vertical_spacing=min(0.08, 0.3 / len(terms)),
    )
    groups = [(None, df)] if group is None else list(df.groupby(group, sort=False))
    for i, (name, part) in enumerate(groups):
        label = "run" if name is None else str(name)
        for r, term in enumerate(terms, start=1):
            p = part[[step, term]].dropna().sort_values(step)
            fig.add_trace(
                go.Scatter(
                    x=p[step],
                    y=p[term],
                    mode="lines",
                    name=label,
                    legendgroup=label,
                    showlegend=r == 1 and name is not None,
                    line={"color": _PALETTE[i % len(_PALETTE)]},
                ),
                row=r,
                col=1,
            )
    fig.update_xaxes(title_text=step, row=len(terms), col=1)
    fig.update_layout(title=title, template=_TEMPLATE, height=max(350, 220 * len(terms)))
    return fig


def em_bars(
    metrics: Mapping[str, float],
    ci: Mapping[str, Sequence[float]] | None = None,
    *,
    percent: bool = True,
    title: str = "EM rate",
    yaxis: str | None = None,
) -> go.Figure:
    """Bar chart of named rates with optional confidence intervals ``ci[name] = (low, high)``.

    With ``percent=True`` values (and intervals) are fractions drawn in percent.

    >>> em_bars({"sft": 0.2, "kl": 0.02}, ci={"sft": (0.15, 0.26), "kl": (0.01, 0.04)}).data[0].y
    (20.0, 2.0)
    """
    names = list(metrics)
    values = [float(metrics[n]) for n in names]
    k = 100.0 if percent else 1.0
    if percent:
        _pct(values, title)
    bar: dict[str, Any] = {"x": names, "y": [v * k for v in values]}
    tops = list(bar["y"])
    if ci:
        missing = [n for n in names if n not in ci]
        if missing:
            raise KeyError(f"em_bars: no confidence interval for {missing}")
        lo = [float(ci[n][0]) for n in names]
        hi = [float(ci[n][1]) for n in names]
        bad = [n for n, v, a, c in zip(names, values, lo, hi) if not a - 1e-12 <= v <= c + 1e-12]
        if bad:
            raise ValueError(f"em_bars: value outside its interval (low, high) for {bad}")
        bar["error_y"] = {
            "type": "data",
            "symmetric": False,
            "array": [(c - v) * k for v, c in zip(values, hi)],
            "arrayminus": [(v - a) * k for v, a in zip(values, lo)],
        }
        tops = [c * k for c in hi]
    colors = [_METHOD_COLORS.get(n, _PALETTE[0]) for n in names]
    fig = go.Figure(go.Bar(**bar, marker_color=colors))
    if not names:
        _no_data(fig, NO_JUDGMENTS)
    for n, v, t in zip(names, bar["y"], tops):  # value labels above the bar or its interval
        fig.add_annotation(x=n, y=t, text=f"{v:.1f}" if percent else f"{v:.3g}", showarrow=False, yshift=10)
    fig.update_layout(
        title=title, template=_TEMPLATE, yaxis_title=yaxis or ("%" if percent else "value"), yaxis_rangemode="tozero"
    )
    return fig


#: Plot functions by name: the ``kind`` of :func:`record` and of ``figure_data.json`` entries.
PLOTS: dict[str, Callable[..., go.Figure]] = {
    f.__name__: f
    for f in (
        defence_scatter,
        table2,
        quadrant_scatter,
        steering_sweep,
        cosine_heatmap,
        loss_vs_norm,
        stability_curves,
        kl_vs_norm,
        training_curves,
        em_bars,
    )
}


# ---------------------------------------------------------------------------------------------
# Saving and the figure record


#: Seconds one static export may take (``$EMLAB_FIGURE_TIMEOUT``): kaleido 1.x can wait forever for a
#: browser tab (its render timeout does not cover that wait), which once hung a test run for 12 minutes.
FIGURE_TIMEOUT_S = 120.0


def _kill_chromium() -> None:
    """Stop kaleido's persistent server without waiting for its (possibly stuck) thread, and its Chromium."""
    global _server_started
    _server_started = False
    with contextlib.suppress(Exception):
        from kaleido import _global_server

        # its atexit hook joins the server thread: with a stuck thread that would hang the interpreter's exit
        _global_server._initialized = False  # noqa: SLF001 - kaleido offers no non-blocking close
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            if "chrom" in child.name().lower():
                child.kill()


def _to_image(fig: go.Figure, fmt: str, timeout: float) -> bytes:
    """``plotly.io.to_image`` in a daemon thread, abandoned (TimeoutError) after ``timeout`` seconds."""
    import queue
    import threading

    import plotly.io as pio

    box: queue.Queue = queue.Queue(maxsize=1)

    def work() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kopts ignored" once the persistent server runs
                box.put(pio.to_image(fig, format=fmt, scale=2 if fmt == "png" else 1))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.put(e)

    threading.Thread(target=work, name="emlab-static-export", daemon=True).start()
    try:
        out = box.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"static export did not finish in {timeout:g} s") from None
    if isinstance(out, BaseException):
        raise out
    return out


def _static(fig: go.Figure, fmt: str) -> bytes | None:
    """Static image bytes through kaleido, or None (after one printed message) without Chromium.

    Every export has a time limit (:data:`FIGURE_TIMEOUT_S`); a stuck export restarts Chromium and is
    tried once more, and a second one gives HTML only for the rest of the process, with a message.
    """
    global _static_failed, _server_started
    if _static_failed is not None:
        return None
    timeout = float(os.environ.get("EMLAB_FIGURE_TIMEOUT", FIGURE_TIMEOUT_S))
    for attempt in (1, 2):
        try:
            data = _to_image(fig, fmt, timeout)
            break
        except TimeoutError as e:
            _kill_chromium()
            if attempt == 1:
                print(f"emlab: {e}; restarting Chromium and trying once more", file=sys.stderr)
                continue
            _static_failed = f"{e} twice: wrote HTML only from now on (EMLAB_FIGURE_TIMEOUT sets the limit)"
            print(_static_failed, file=sys.stderr)
            return None
        except Exception as e:  # noqa: BLE001 - any kaleido / Chromium failure
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _static_failed = f"{_STATIC_HINT} [{type(e).__name__}: {reason}]"
            print(_static_failed, file=sys.stderr)
            return None
    if not _server_started:  # keep one Chromium for later exports (about 0.2 s each instead of 3 s)
        _server_started = True
        with contextlib.suppress(Exception):
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
    return data


def save(fig: go.Figure, path: str | os.PathLike, formats: Sequence[str] = ("html", "png")) -> list[Path]:
    """Write ``fig`` to ``path.html`` (self-contained: plotly.js embedded) and ``path.png`` (kaleido).

    Other formats: ``svg``, ``pdf``, ``jpeg``, ``webp``. When static export fails (no Chromium), one
    message is printed and only the HTML is written. Returns the files written.

    >>> save(em_bars({"sft": 0.2}), "figures/em")  # doctest: +SKIP
    [PosixPath('figures/em.html'), PosixPath('figures/em.png')]
    """
    path = Path(path)
    if path.suffix.lstrip(".") in ("html", "png", "svg", "pdf", "jpeg", "jpg", "webp"):
        path = path.with_suffix("")
    written = []
    for fmt in formats:
        out = path.with_name(f"{path.name}.{fmt}")
        if fmt == "html":
            written.append(atomic_write_text(out, fig.to_html(include_plotlyjs=True, full_html=True)))
            continue
        data = _static(fig, fmt)
        if data is not None:
            with atomic_open(out, "wb") as f:
                f.write(data)
            written.append(out)
    return written


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, pd.DataFrame):
            return v.to_dict("records")
        if isinstance(v, pd.Series):
            return v.to_dict()
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    data = dict(data)
    if data.get("paper") is True or isinstance(data.get("paper"), str | os.PathLike):
        data["paper"] = load_paper_table(None if data["paper"] is True else data["paper"])
    # Through JSON and back, so the figure drawn now is exactly the one `emlab figures` redraws.
    return json.loads(json.dumps(to_jsonable(conv(data)), allow_nan=False))


def _run_dir(run_dir: Any) -> Path:
    return Path(getattr(run_dir, "dir", run_dir))


def record(
    run_dir: str | os.PathLike, name: str, kind: str, *, formats: Sequence[str] = ("html", "png"), **data: Any
) -> go.Figure:
    """Draw figure ``kind`` (a name in :data:`PLOTS`) from ``data``, save it as ``<run_dir>/figures/<name>``
    and store ``{"kind", "data"}`` under ``name`` in ``<run_dir>/figure_data.json``, so that
    ``emlab figures`` can redraw it later without recomputing anything. Returns the figure.

    ``data`` must be JSON-storable (DataFrames are stored as row lists; ``paper=True`` stores the
    published rows themselves). ``run_dir`` may be a path or an :class:`emlab.runs.Run`.

    >>> record(out_dir, "em", "em_bars", metrics={"sft": 0.2, "kl": 0.02})  # doctest: +SKIP
    """
    if kind not in PLOTS:
        raise KeyError(f"unknown figure kind {kind!r}; choose one of {sorted(PLOTS)}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem such as 'em_rates', got {name!r}")
    stored = _jsonable(data)
    fig = PLOTS[kind](**stored)
    d = _run_dir(run_dir)
    save(fig, d / "figures" / name, formats)
    _update_figure_data(d, name, {"kind": kind, "data": stored})
    return fig


def _update_figure_data(run_dir: Path, name: str, spec: dict[str, Any]) -> None:
    path = run_dir / FIGURE_DATA
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError, OSError):  # lock the folder for the read-modify-write (POSIX)
            import fcntl

            fd = os.open(run_dir, os.O_RDONLY)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        specs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        specs[name] = spec
        atomic_write_json(path, specs)


def regenerate(
    run_dir: str | os.PathLike, *, names: Sequence[str] | None = None, formats: Sequence[str] = ("html", "png")
) -> list[Path]:
    """Redraw every figure recorded in ``<run_dir>/figure_data.json`` (or only ``names``); return the files.

    >>> regenerate("runs/02_defences/20250101-120000")  # doctest: +SKIP
    [PosixPath('runs/02_defences/20250101-120000/figures/tradeoff.html'), ...]
    """
    d = _run_dir(run_dir)
    path = d / FIGURE_DATA
    if not path.exists():
        return []
    specs = json.loads(path.read_text(encoding="utf-8"))
    written: list[Path] = []
    for name, spec in specs.items():
        if names is not None and name not in names:
            continue
        kind = spec.get("kind")
        if kind not in PLOTS:
            raise KeyError(f"{path}: figure {name!r} has unknown kind {kind!r}; known: {sorted(PLOTS)}")
        try:
            fig = PLOTS[kind](**spec.get("data", {}))
        except Exception as e:
            raise RuntimeError(f"{path}: redrawing figure {name!r} ({kind}) failed: {type(e).__name__}: {e}") from e
        written += save(fig, d / "figures" / name, formats)
    return written


def load_figures(run_dir: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, go.Figure]:
    """The figures recorded in a run folder, redrawn from ``figure_data.json`` (nothing is saved).

    Notebooks end with ``for fig in load_figures(out_dir).values(): fig.show()``.

    >>> figs = load_figures("runs/00_em_organism")   # doctest: +SKIP
    >>> list(figs)                                    # doctest: +SKIP
    ['em_rates']
    """
    d = _run_dir(run_dir)
    path = d / FIGURE_DATA
    if not path.exists():
        return {}
    specs = json.loads(path.read_text(encoding="utf-8"))
    return {name: PLOTS[spec["kind"]](**spec.get("data", {})) for name, spec in specs.items()
            if names is None or name in names}
