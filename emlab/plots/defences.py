"""The defences paper's figures: Figure 1's scatters (:func:`defence_scatter`) and Table 2 (:func:`table2`,
:func:`table2_markdown`), from ``<method>/<domain>[/<setting>]/<metric>`` rates as fractions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emlab.plots._common import (
    _METRIC_LABELS,
    _SYMBOLS,
    _TEMPLATE,
    METRICS,
    NO_JUDGMENTS,
    _axis_title,
    _axis_values,
    _color,
    _label,
    _natural_key,
    _need,
    _order,
    _paper_wide,
    _short,
    _wide,
)

__all__ = ["defence_scatter", "table2", "table2_markdown"]


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

