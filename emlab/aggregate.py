"""Aggregate runs: a sweep's (or any run folders') ``metrics.json`` files as one long table, summaries
over seeds (mean, standard deviation, bootstrap 95% interval) and ``mean ± sd (n)`` tables.

>>> table = load_table("runs/sweeps/02_defences-1a2b3c4d")  # doctest: +SKIP
>>> summarize(table, by=["domain"])  # doctest: +SKIP
    domain               metric  n   mean     sd  ci_low  ci_high
0  medical  sft/medical/general_em  3  0.21  0.03    0.18     0.24
>>> mean_sd(0.2134, 0.0312, 3)
'0.213 ± 0.0312 (3)'
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emlab.runs import atomic_write_text, to_jsonable

__all__ = ["load_table", "mean_sd", "metric_rows", "summarize", "summary_markdown", "sweep_runs", "write_sweep_tables"]

SWEEP_FILE = "sweep.json"
CELL_FILE = "sweep_cell.json"
RUN_INFO = "notebook.json"
#: Columns of the long table besides the cell parameters.
COLUMNS = ("run", "metric", "value", "n")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def metric_rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float, float]]:
    """``(metric, value, n)`` for every number in a nested ``metrics.json`` (keys joined by ``/``).

    ``n`` is the integer ``n`` stored beside the value (or in the nearest enclosing object): how many
    samples a rate was measured on; NaN where the metrics give none. Lists of numbers are indexed
    (``.../ci/0``); strings, booleans and lists of objects (logs, tables) are left out.

    >>> metric_rows({"general": {"n": 20, "em": {"percent": 10.0, "n": 18}}, "sft/toy/general_em": 0.25})
    [('general/n', 20.0, 20.0), ('general/em/percent', 10.0, 18.0), ('general/em/n', 18.0, 18.0), ('sft/toy/general_em', 0.25, nan)]
    """
    rows: list[tuple[str, float, float]] = []

    def walk(obj: Mapping[str, Any], key: str, n: float) -> None:
        if _number(obj.get("n")):
            n = float(obj["n"])
        for k, v in obj.items():
            name = f"{key}/{k}" if key else str(k)
            if isinstance(v, Mapping):
                walk(v, name, n)
            elif _number(v):
                rows.append((name, float(v), n))
            elif isinstance(v, list | tuple) and v and all(_number(x) for x in v):
                rows.extend((f"{name}/{i}", float(x), n) for i, x in enumerate(v))

    walk(metrics, prefix, math.nan)
    return rows


def _cell_value(v: Any) -> Any:
    """Parameters as table cells: lists and dicts as JSON text (hashable, groupable)."""
    if isinstance(v, list | tuple | dict):
        return json.dumps(to_jsonable(v), sort_keys=True)
    return v


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sweep_runs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[Path, dict[str, Any]]]:
    """``(run folder, parameters)`` of the ok runs of a sweep folder (from its ``sweep.json``, in cell order)
    or of a list of run folders.

    >>> sweep_runs("runs/sweeps/02_defences-1a2b3c4d")[0][1]   # doctest: +SKIP
    {'seed': 0}
    """
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        manifest = _read_json(root / SWEEP_FILE)
        if manifest is None:
            if (root / RUN_INFO).exists() or (root / "metrics.json").exists():
                return sweep_runs([root])
            raise FileNotFoundError(f"{root} is neither a sweep folder (no {SWEEP_FILE}) nor a run folder")
        out = []
        for cell in manifest.get("cells", []):
            if cell.get("status") == "ok":
                out.append((root / cell["run_dir"], dict(cell.get("parameters") or {})))
        return out
    out = []
    for d in map(Path, source):
        if not d.is_dir():
            raise FileNotFoundError(f"run folder {d} does not exist")
        info = _read_json(d / RUN_INFO) or {}
        if info.get("status", "ok") != "ok":
            continue
        record = _read_json(d / CELL_FILE) or {}
        params = record.get("parameters")
        if params is None:
            params = {k: v for k, v in (info.get("parameters") or {}).items() if k != "out_dir"}
        out.append((d, dict(params)))
    return out


def load_table(source: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per (run, metric): the run's parameters, ``run``, ``metric``, ``value`` and ``n``.

    ``source`` is a sweep folder (its ok cells, from ``sweep.json``) or a list of run folders (their
    parameters from ``sweep_cell.json`` or ``notebook.json``; failed runs are left out). Runs without
    ``metrics.json`` add no rows. ``table.attrs["parameters"]`` lists the parameter columns.

    >>> load_table(["runs/a", "runs/b"]).columns.tolist()  # doctest: +SKIP
    ['seed', 'run', 'metric', 'value', 'n']
    """
    runs = sweep_runs(source)
    names: list[str] = []
    for _, params in runs:
        names += [k for k in params if k not in names]
    clash = [k for k in names if k in COLUMNS]
    if clash:
        raise ValueError(f"parameter name(s) {clash} clash with the table's own columns {list(COLUMNS)}")
    records = []
    for run_dir, params in runs:
        path = run_dir / "metrics.json"
        if not path.exists():
            continue
        metrics = _read_json(path)
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{path}: not a JSON object of metrics")
        base = {k: _cell_value(params.get(k)) for k in names}
        for metric, value, n in metric_rows(metrics):
            records.append({**base, "run": run_dir.name, "metric": metric, "value": value, "n": n})
    table = pd.DataFrame(records, columns=[*names, *COLUMNS])
    table.attrs["parameters"] = names
    return table


def _bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n_boot: int, confidence: float) -> tuple[float, float]:
    if len(values) < 2:
        return math.nan, math.nan
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarize(
    table: pd.DataFrame,
    by: Sequence[str] | None = None,
    *,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean, sample standard deviation and a bootstrap interval of each metric over the runs of each group.

    ``by`` names the grouping columns (default: every parameter column except ``seed``, so the runs of a
    group are its seeds). ``n`` is the number of runs averaged. The interval is the percentile bootstrap
    of the mean (``n_boot`` resamples from a generator seeded by ``seed`` and the group's key, so a group's
    interval depends on its own values only: the same values give the same interval whatever other groups
    the table holds); ``sd`` and the interval are NaN for a single run.

    >>> t = pd.DataFrame({"seed": [0, 1, 2], "metric": "em", "value": [0.1, 0.2, 0.3], "n": 20})
    >>> s = summarize(t, by=[])
    >>> s[["metric", "n", "mean", "sd"]].round(3).values.tolist()
    [['em', 3, 0.2, 0.1]]
    """
    if "metric" not in table.columns or "value" not in table.columns:
        raise KeyError(
            f"summarize needs the long table of load_table (metric, value); got columns {list(table.columns)}"
        )
    if by is None:
        params = table.attrs.get("parameters") or [c for c in table.columns if c not in COLUMNS]
        by = [c for c in params if c != "seed"]
    by = list(by)
    missing = [c for c in by if c not in table.columns]
    if missing:
        raise KeyError(f"cannot group by {missing}: the table has columns {list(table.columns)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = table if metrics is None else table[table["metric"].isin(list(metrics))]
    rows = []
    keys = [*by, "metric"]
    for key, group in data.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rng = np.random.default_rng([seed, zlib.crc32(repr(tuple(map(str, key))).encode())])
        values = group["value"].to_numpy(dtype="float64")
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        lo, hi = _bootstrap_ci(values, rng, n_boot, confidence)
        rows.append(
            {
                **dict(zip(keys, key)),
                "n": len(values),
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "n", "mean", "sd", "ci_low", "ci_high"])


def _fmt(x: float, digits: int) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}g}"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def mean_sd(mean: float, sd: float | None, n: int, digits: int = 3) -> str:
    """``"mean ± sd (n)"`` with ``digits`` significant digits; ``"mean (1)"`` without a spread.

    >>> mean_sd(0.2134, 0.0312, 3), mean_sd(12.5, float("nan"), 1)
    ('0.213 ± 0.0312 (3)', '12.5 (1)')
    """
    if sd is None or not math.isfinite(sd):
        return f"{_fmt(mean, digits)} ({n})"
    return f"{_fmt(mean, digits)} ± {_fmt(sd, digits)} ({n})"


def summary_markdown(summary: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown table of :func:`summarize`'s output: the group columns, metric, ``mean ± sd (n)`` and the interval."""
    keys = [c for c in summary.columns if c not in ("n", "mean", "sd", "ci_low", "ci_high")]
    lines = ["| " + " | ".join([*keys, "mean ± sd (n)", "95% CI"]) + " |", "|" + "---|" * len(keys) + "---:|---:|"]
    for row in summary.itertuples(index=False):
        r = dict(zip(summary.columns, row))
        ci = "–" if not math.isfinite(r["ci_low"]) else f"[{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]"
        cells = ["" if _missing(r[k]) else str(r[k]).replace("|", "\\|") for k in keys]
        lines.append("| " + " | ".join([*cells, mean_sd(r["mean"], r["sd"], int(r["n"]), digits), ci]) + " |")
    return "\n".join(lines) + "\n"


def _bookkeeping(metric: str) -> bool:
    """Sample counts and per-run interval ends: in summary.csv, not in the page."""
    parts = metric.split("/")
    return parts[-1] in ("n", "n_missing", "count") or (len(parts) > 1 and parts[-2] == "ci")


def write_sweep_tables(sweep_dir: str | os.PathLike) -> list[Path]:
    """Write ``table.csv`` (the long table), ``summary.csv`` and ``summary.md`` into a sweep folder.

    Returns the files written (none when no ok cell wrote metrics).
    """
    root = Path(sweep_dir)
    table = load_table(root)
    if table.empty:
        return []
    summary = summarize(table)
    shown = summary[~summary["metric"].map(_bookkeeping)]
    by = [c for c in summary.columns if c not in ("metric", "n", "mean", "sd", "ci_low", "ci_high")]
    manifest = _read_json(root / SWEEP_FILE) or {}
    n_ok = sum(c.get("status") == "ok" for c in manifest.get("cells", []))
    n_all = len(manifest.get("cells", []))
    page = [
        f"# Sweep of {Path(manifest.get('notebook', '?')).name}",
        "",
        f"{n_ok} of {n_all} cells ok; grouped by {', '.join(by) or 'nothing'} "
        f"(mean ± sample sd over the runs of a group, n runs, percentile bootstrap 95% interval of the mean, "
        f"2000 resamples, seed 0). Sample counts (n, n_missing, count) and per-run intervals (ci/0, ci/1) "
        f"are left out here: summary.csv has every metric, table.csv every value.",
        "",
        summary_markdown(shown),
    ]
    failed = [c for c in manifest.get("cells", []) if c.get("status") == "failed"]
    if failed:
        page += ["## Failed cells", ""]
        page += [
            f"- {c['name']}: {(c.get('error') or '').strip().splitlines()[0] if c.get('error') else 'no error recorded'}"
            for c in failed
        ]
        page.append("")
    table_path, summary_path, md_path = root / "table.csv", root / "summary.csv", root / "summary.md"
    atomic_write_text(table_path, table.to_csv(index=False))
    atomic_write_text(summary_path, summary.to_csv(index=False))
    atomic_write_text(md_path, "\n".join(page))
    return [table_path, summary_path, md_path]
