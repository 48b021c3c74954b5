"""The Pareto view of defences: general EM (lower is better) against in-domain EM kept (higher is better).

A defence should remove the general (emergent) misalignment while keeping what the finetune was for;
on the EM organisms "what it was for" is the in-domain behaviour, so the cost axis is the share of
SFT's in-domain EM kept. :func:`pareto_front` marks the methods no other method beats on both axes.

>>> pareto_front({"a": (10.0, 90.0), "b": (20.0, 80.0), "c": (5.0, 50.0)})
['c', 'a']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emlab.metrics import results_table

__all__ = ["defences_points", "beyond_points", "pareto_figure", "pareto_front", "pareto_seeds", "run_prefix"]

Point = tuple[float, float]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Mapping[str, Point]) -> list[str]:
    """Names of the points not dominated (another point with general EM <= and kept >=, one strictly), sorted by EM.

    >>> pareto_front({"x": (1.0, 1.0), "y": (1.0, 1.0)})   # ties dominate neither
    ['x', 'y']
    """
    for name, p in points.items():
        if len(p) != 2 or not all(_finite(v) for v in p):
            raise ValueError(f"point {name!r} must be two finite numbers (general EM, in-domain kept), got {p!r}")
    front = [n for n, (x, y) in points.items()
             if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for m, (x2, y2) in points.items() if m != n)]
    return sorted(front, key=lambda n: (points[n][0], -points[n][1], n))


def beyond_points(metrics: Mapping[str, Any]) -> dict[str, Point]:
    """(general EM, in-domain EM kept %) of every method in a 06 metrics dict (those with both numbers).

    >>> beyond_points({"baseline/sft/general_em": 30.0, "baseline/sft/indomain_em": 50.0,
    ...                "caft/pca/general_em": 10.0, "caft/pca/indomain_kept": 80.0})
    {'sft': (30.0, 100.0), 'caft/pca': (10.0, 80.0)}
    """
    out: dict[str, Point] = {}
    sft_g, sft_i = metrics.get("baseline/sft/general_em"), metrics.get("baseline/sft/indomain_em")
    if _finite(sft_g) and _finite(sft_i) and sft_i > 0:
        out["sft"] = (float(sft_g), 100.0)
        chat_g, chat_i = metrics.get("baseline/chat/general_em"), metrics.get("baseline/chat/indomain_em")
        if _finite(chat_g) and _finite(chat_i):
            out["chat"] = (float(chat_g), 100 * chat_i / sft_i)
    for key, kept in metrics.items():
        if not key.endswith("/indomain_kept") or not _finite(kept):
            continue
        prefix = key.removesuffix("/indomain_kept")
        if prefix.startswith("conditional/sft"):
            continue  # the same finetune as baseline/sft
        general = metrics.get(f"{prefix}/general_em", metrics.get(f"{prefix}/none/general_em"))
        if _finite(general):
            out[prefix] = (float(general), float(kept))
    return out


def defences_points(metrics: Mapping[str, Any] | str | os.PathLike, prefix: str = "02:") -> dict[str, Point]:
    """(general EM, in-domain EM kept %) of every method and domain of a 02 (defences) or 03 (interleaving) run:
    its metrics or its folder.

    Kept = the method's in-domain EM over SFT's on the same domain; names are ``<prefix><method>/<domain>[/...]``.

    >>> defences_points({"sft/medical/general_em": 40.0, "sft/medical/indomain_em": 60.0,
    ...                  "kl/medical/general_em": 20.0, "kl/medical/indomain_em": 30.0})
    {'02:sft/medical': (40.0, 100.0), '02:kl/medical': (20.0, 50.0)}
    """
    if not isinstance(metrics, Mapping):
        path = Path(metrics) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give the folder of a finished 02 (defences) or 03 run")
        metrics = json.loads(path.read_text(encoding="utf-8"))
    table = results_table(metrics)
    table = table[table["method"].notna()]
    value = dict(zip(table["key"], table["value"].tolist()))
    out: dict[str, Point] = {}
    general = table[table["metric"] == "general_em"]
    for key, domain in zip(general["key"], general["domain"]):
        name = key.removesuffix("/general_em")
        indomain, sft_i = value.get(f"{name}/indomain_em"), value.get(f"sft/{domain}/indomain_em")
        if indomain is not None and sft_i is not None and sft_i > 0:
            out[prefix + name] = (value[key], 100 * indomain / sft_i)
    return out


def run_prefix(folder: str | os.PathLike) -> str:
    """``"02:"``, ``"03:"``, ...: the notebook number of a run folder (from its ``notebook.json``), for point names;
    ``"02:"`` for a run made without a notebook (a study function's folder).

    >>> run_prefix("/nonexistent")
    '02:'
    """
    try:
        stem = Path(json.loads((Path(folder) / "notebook.json").read_text(encoding="utf-8"))["notebook"]).stem
    except (OSError, ValueError, KeyError, TypeError):
        return "02:"
    number = stem.split("_", 1)[0]
    return f"{number}:" if number.isdigit() else "02:"


def pareto_figure(points: Mapping[str, Point], *, title: str = "General EM against in-domain EM kept"):
    """A plotly scatter of ``points`` with the Pareto front joined and marked (a star per front method).

    >>> pareto_figure({"sft": (30.0, 100.0), "kl": (10.0, 60.0)}).data[1].name
    'Pareto front'
    """
    import plotly.graph_objects as go

    if not points:
        raise ValueError("no method has both a general EM and an in-domain EM kept: nothing to draw")
    front = pareto_front(points)
    names = list(points)
    # names written beside the front's points only (the rest overlap where many methods cluster); every point
    # names itself on hover
    fig = go.Figure(go.Scatter(x=[points[n][0] for n in names], y=[points[n][1] for n in names], mode="markers+text",
                               text=[n if n in front else "" for n in names], hovertext=names,
                               textposition="top center", name="methods",
                               marker={"size": 9, "color": ["crimson" if n in front else "grey" for n in names]}))
    fig.add_trace(go.Scatter(x=[points[n][0] for n in front], y=[points[n][1] for n in front], mode="lines+markers",
                             name="Pareto front", line={"color": "crimson", "dash": "dash"},
                             marker={"symbol": "star", "size": 14, "color": "crimson"}, text=front))
    fig.update_layout(title=title, xaxis_title="general EM (%) - lower is better",
                      yaxis_title="in-domain EM kept (% of SFT's) - higher is better", template="plotly_white")
    return fig


def pareto_seeds(points_per_seed: Mapping[str, Mapping[str, Point]]) -> list[dict[str, Any]]:
    """Pareto points over seeds: per name, n seeds, mean and sd of general EM and of in-domain EM kept, whether
    the name is on the front of the means, and on how many seeds' own fronts it is. Sorted by mean general EM.

    >>> rows = pareto_seeds({"0": {"a": (10.0, 90.0), "b": (20.0, 80.0)}, "1": {"a": (12.0, 70.0), "b": (8.0, 85.0)}})
    >>> [(r["name"], r["general_em"], r["kept"], r["front"], r["on_seed_fronts"]) for r in rows]
    [('a', 11.0, 80.0, True, 1), ('b', 14.0, 82.5, True, 1)]
    """
    import statistics

    fronts = {seed: set(pareto_front(pts)) for seed, pts in points_per_seed.items()}
    names = list(dict.fromkeys(n for pts in points_per_seed.values() for n in pts))
    rows = []
    for name in names:
        vals = [pts[name] for pts in points_per_seed.values() if name in pts]
        xs, ys = [v[0] for v in vals], [v[1] for v in vals]
        rows.append({"name": name, "n": len(vals), "general_em": statistics.fmean(xs), "kept": statistics.fmean(ys),
                     "general_em_sd": statistics.stdev(xs) if len(xs) > 1 else math.nan,
                     "kept_sd": statistics.stdev(ys) if len(ys) > 1 else math.nan,
                     "on_seed_fronts": sum(name in f for f in fronts.values())})
    front = set(pareto_front({r["name"]: (r["general_em"], r["kept"]) for r in rows}))
    for r in rows:
        r["front"] = r["name"] in front
    return sorted(rows, key=lambda r: r["general_em"])
