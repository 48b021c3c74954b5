"""The other figures: judged samples (:func:`quadrant_scatter`, :func:`em_bars`), steering and directions
(:func:`steering_sweep`, :func:`cosine_heatmap`), probes (:func:`loss_vs_norm`, :func:`stability_curves`,
:func:`kl_vs_norm`) and :func:`training_curves`."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emlab.plots._common import (
    _METHOD_COLORS,
    _PALETTE,
    _TEMPLATE,
    NO_JUDGMENTS,
    _axis_title,
    _axis_values,
    _color,
    _frame,
    _need,
    _no_data,
    _pct,
)

__all__ = [
    "cosine_heatmap",
    "em_bars",
    "kl_vs_norm",
    "loss_vs_norm",
    "quadrant_scatter",
    "stability_curves",
    "steering_sweep",
    "training_curves",
]


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

