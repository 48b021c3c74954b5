"""The claims scorecard: the registry's claims (:mod:`emlab.claims`) scored on finished sweeps, the page
``docs/claims.md``, its figure and table (``emlab claims``).

A run's effect is averaged per seed (runs of one seed pooled across sweeps), and the scorecard shows the
mean over seeds, the percentile bootstrap 95% interval of that mean (:func:`emlab.aggregate.summarize`),
n seeds and the verdict of :func:`emlab.claims.verdict`, beside the paper's number.

>>> card = scorecard(["runs/sweeps/02_defences-1a2b3c4d"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from emlab.aggregate import SWEEP_FILE, load_table, summarize, sweep_runs
from emlab.claims import MARGIN_PP, PAPER_MODEL, Claim, default_claims, verdict
from emlab.runs import atomic_write_text

__all__ = ["PLAN_FILE", "claims_markdown", "effect_table", "expand_sweeps", "plan_commands", "plan_sweep_dirs",
           "read_plan", "scorecard", "sweep_provenance", "write_claims"]


# ------------------------------------------------------------------------------------------------
# Scoring


#: The file in a scorecard folder (``emlab claims-sweeps --out-dir``) naming the commands that made it and its sweeps.
PLAN_FILE = "claims_sweeps.json"


def read_plan(folder: Path) -> dict[str, Any] | None:
    """A scorecard folder's ``claims_sweeps.json`` (None when it has none)."""
    try:
        info = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{folder / PLAN_FILE}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{folder / PLAN_FILE}: not a JSON object")
    return info


def plan_sweep_dirs(folder: str | os.PathLike) -> list[Path] | None:
    """The sweep folders of a scorecard folder made by :func:`emlab.claims_sweeps.run_scorecard_sweeps` (those that exist, in the
    order first run); None when ``folder`` has no ``claims_sweeps.json``."""
    root = Path(folder)
    info = read_plan(root)
    if info is None:
        return None
    return [root / s["name"] for s in info.get("sweeps", []) if (root / s["name"] / "sweep.json").exists()]


def plan_commands(folder: str | os.PathLike) -> list[str]:
    """The commands recorded in a scorecard folder's ``claims_sweeps.json``, oldest first (none without one)."""
    info = read_plan(Path(folder)) or {}
    return [str(c) for c in info.get("commands", [])]


def _sweep_info(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / SWEEP_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a sweep folder (no {SWEEP_FILE}): pass folders made by `emlab sweep`") from None
    except ValueError as e:
        raise ValueError(f"{path / SWEEP_FILE}: not valid JSON ({e})") from None


def expand_sweeps(sweeps: Iterable[str | os.PathLike]) -> list[Path]:
    """Sweep folders, with each scorecard folder (one with ``claims_sweeps.json``) replaced by its sweeps."""
    out: list[Path] = []
    for s in map(Path, sweeps):
        inner = plan_sweep_dirs(s)
        out += [s] if inner is None else inner
    return out


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def effect_table(sweeps: Iterable[str | os.PathLike], claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per (claim, seed): the effect averaged over that seed's runs, in every sweep given.

    Columns ``claim, sweep, seed, value, runs`` (``sweep``: the sweeps holding the seed's runs, joined by
    ``, ``). Runs of one seed are pooled across sweeps, so a scorecard may combine, say, a sweep of the
    medical domain and one of the other domains (one seed, one unit). A run without a seed parameter is
    its own unit. A claim with ``where`` reads only the runs whose settings (the run's ``config.json``,
    else its sweep parameters) have those values. Scorecard folders are expanded (:func:`expand_sweeps`).
    """
    rows = []
    for sweep in expand_sweeps(sweeps):
        info = _sweep_info(sweep)
        stem = info.get("notebook_stem") or Path(info.get("notebook", "")).stem
        mine = [c for c in claims if c.notebook == stem]
        if not mine:
            continue
        table = load_table(sweep)
        if table.empty:
            continue
        params = table.attrs.get("parameters") or []
        run_dirs = {d.name: d for d, _ in sweep_runs(sweep)}
        for run, group in table.groupby("run", sort=False):
            metrics = dict(zip(group["metric"], group["value"].astype(float)))
            seed = group["seed"].iloc[0] if "seed" in group.columns else run
            settings = {**{k: group[k].iloc[0] for k in params}, **_run_config(run_dirs.get(run, sweep / str(run)))}
            for c in mine:
                if not c.applies_to(settings):
                    continue
                v = c.run_effect(metrics)
                if v is not None:
                    rows.append({"claim": c.id, "sweep": str(sweep), "seed": str(seed), "value": v})
    df = pd.DataFrame(rows, columns=["claim", "sweep", "seed", "value"])
    if df.empty:
        return df.assign(runs=pd.Series(dtype=int))
    joined = lambda s: ", ".join(dict.fromkeys(s))  # noqa: E731  (sweeps in the order given, once each)
    return (df.groupby(["claim", "seed"], sort=False)
            .agg(sweep=("sweep", joined), value=("value", "mean"), runs=("value", "size")).reset_index()
            [["claim", "sweep", "seed", "value", "runs"]])


def scorecard(sweeps: Iterable[str | os.PathLike], claims: Sequence[Claim] | None = None, *,
              n_boot: int = 2000, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every claim with the paper's number, emlab's mean, sd, bootstrap 95% interval, n seeds and verdict.

    A seed is one unit however many sweeps and runs hold it (:func:`effect_table`).
    Claims no sweep measured have n = 0 and verdict ``not measured``.
    """
    claims = list(default_claims(data_dir) if claims is None else claims)
    eff = effect_table(sweeps, claims)
    summary = pd.DataFrame(columns=["claim", "n", "mean", "sd", "ci_low", "ci_high"])
    if not eff.empty:
        long = eff.assign(metric="effect")
        summary = summarize(long, by=["claim"], n_boot=n_boot)
    by_id = {r["claim"]: r for r in summary.to_dict("records")}
    rows = []
    for c in claims:
        s = by_id.get(c.id)
        n = int(s["n"]) if s else 0
        lo, hi = (s["ci_low"], s["ci_high"]) if s else (math.nan, math.nan)
        v = verdict(lo, hi, c.direction, c.margin) if n else "not measured"
        rows.append({"claim": c.id, "source": c.source, "text": c.text, "notebook": c.notebook,
                     "effect": f"{c.a} - {c.b}", "unit": c.unit, "direction": c.direction, "paper": c.paper,
                     "paper_source": c.paper_source, "n": n, "mean": s["mean"] if s else math.nan,
                     "sd": s["sd"] if s else math.nan, "ci_low": lo, "ci_high": hi, "verdict": v,
                     "hypotheses": " | ".join(c.hypotheses) if v in ("opposite", "inconclusive") else ""})
    return pd.DataFrame(rows)


def sweep_provenance(sweeps: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per sweep scored (scorecard folders expanded): ``sweep`` (its folder name), ``notebook``,
    ``cells``, ``ok``, ``commit`` (12 hex digits, ``+dirty`` for uncommitted changes) and ``code`` (the
    code key that decides reuse): what the page's numbers were computed from, from each ``sweep.json``."""
    rows = []
    for sweep in expand_sweeps(sweeps):
        info = _sweep_info(sweep)
        code = info.get("code") or {}
        cells = info.get("cells") or []
        commit = str(code.get("git_commit") or "?")[:12] + ("+dirty" if code.get("git_dirty") else "")
        rows.append({"sweep": sweep.name, "notebook": info.get("notebook_stem") or Path(info.get("notebook", "?")).stem,
                     "cells": len(cells), "ok": sum(c.get("status") == "ok" for c in cells),
                     "commit": commit, "code": str(code.get("key") or "?")})
    return pd.DataFrame(rows, columns=["sweep", "notebook", "cells", "ok", "commit", "code"])


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def claims_markdown(card: pd.DataFrame, commands: Sequence[str] = (), figure: str | None = None,
                    image: str | None = None, provenance: pd.DataFrame | None = None) -> str:
    """The scorecard page: commands at the top, the sweeps scored (``provenance``, from
    :func:`sweep_provenance`), the rule, the table, then the disagreements with hypotheses."""
    counts = card["verdict"].value_counts().to_dict()
    lines = ["# Claims scorecard: papers 001 and 002 on emlab's toy organism", ""]
    if commands:
        lines += ["Made by:", "", "```bash", *commands, "```", ""]
    if provenance is not None and not provenance.empty:
        lines += ["Sweeps scored (from each `sweep.json`; cells ok of cells, the git commit and the code key of "
                  "the emlab package and notebook that ran them):", "",
                  "| sweep | notebook | cells ok | commit | code key |", "|---|---|---:|---|---|"]
        lines += [f"| {r['sweep']} | {r['notebook']} | {r['ok']} of {r['cells']} | `{r['commit']}` | `{r['code']}` |"
                  for r in provenance.to_dict("records")]
        lines.append("")
    lines += [
        "Effect = `a - b` of two `metrics.json` keys of one run (`{domain}`/`{task}` averaged over the "
        "domains/tasks the run has), averaged per seed; mean, sd and percentile bootstrap 95% interval of the "
        "mean over seeds (2000 resamples, seed 0), n seeds. Verdict: **holds** when the interval excludes 0 on "
        "the paper's side, **opposite** when it excludes 0 on the other side, **inconclusive** otherwise (and "
        f"with fewer than 2 seeds). \"No effect\" claims (direction 0): holds when the interval lies inside "
        f"±{MARGIN_PP:g} pp, opposite when it lies entirely outside, inconclusive otherwise. The paper's number "
        f"is the same difference in paper 002's tables ({PAPER_MODEL}, mean over its 4 domains, percentage "
        f"points); a Table 2 effect smaller than {MARGIN_PP:g} pp there is a \"no effect\" claim. Paper 001 "
        "states its results in figures: no number is transcribed (–).",
        "",
        "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
    ]
    if figure:
        lines += [f"Figure: [{figure}]({figure}) (effect and interval per claim).", ""]
    if image:  # the static copy, shown where the page is read (the HTML may not be kept beside it)
        lines += [f"![effect and interval per claim]({image})", ""]
    lines += ["| claim | paper | expected | paper's number | emlab mean ± sd | 95% CI | n seeds | verdict |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    sign = {1: "> 0", -1: "< 0", 0: "≈ 0"}
    for r in card.to_dict("records"):
        ci = "–" if not math.isfinite(r["ci_low"]) else f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]"
        ms = "–" if not r["n"] else (f"{_f(r['mean'])} ± {_f(r['sd'])}" if math.isfinite(r["sd"]) else _f(r["mean"]))
        text = r["text"].replace("|", "\\|")
        lines.append(f"| `{r['claim']}`: {text} | {r['source']} | {sign[r['direction']]} {r['unit']} | "
                     f"{_f(r['paper'])} | {ms} | {ci} | {r['n']} | {r['verdict']} |")
    lines += ["", "## Effects as measured", ""]
    lines += [f"- `{r['claim']}`: `{r['effect']}` ({r['notebook']}; paper: {r['paper_source'] or '–'})"
              for r in card.to_dict("records")]
    bad = card[card["verdict"].isin(["opposite", "inconclusive"])]
    if not bad.empty:
        lines += ["", "## Where the toy disagrees or cannot tell: hypotheses", ""]
        for r in bad.to_dict("records"):
            lines.append(f"- `{r['claim']}` ({r['verdict']}):")
            lines += [f"  - {h}" for h in r["hypotheses"].split(" | ") if h]
    missing = card[card["verdict"] == "not measured"]
    if not missing.empty:
        lines += ["", "## Not measured by these sweeps", "",
                  ", ".join(f"`{c}` ({nb})" for c, nb in zip(missing["claim"], missing["notebook"]))]
    return "\n".join(lines) + "\n"


def _figure(card: pd.DataFrame):
    import plotly.graph_objects as go

    shown = card[card["n"] > 0]
    colors = {"holds": "#2ca02c", "opposite": "#d62728", "inconclusive": "#7f7f7f"}
    fig = go.Figure()
    for v, part in shown.groupby("verdict"):
        err_hi = (part["ci_high"] - part["mean"]).fillna(0)
        err_lo = (part["mean"] - part["ci_low"]).fillna(0)
        fig.add_trace(go.Scatter(x=part["mean"], y=part["claim"], mode="markers", name=v,
                                 marker={"color": colors.get(v, "#1f77b4"), "size": 9},
                                 error_x={"type": "data", "symmetric": False, "array": err_hi, "arrayminus": err_lo}))
    fig.add_vline(x=0, line_dash="dot")
    fig.update_layout(title="Claims: emlab's effect (mean and bootstrap 95% interval over seeds)",
                      xaxis_title="effect (units per claim: pp, nats or cosine)", template="plotly_white",
                      height=max(300, 28 * len(shown) + 120))
    return fig


def _sweep_command(sweep: Path) -> str:
    info = _sweep_info(sweep)
    values: dict[str, list[Any]] = {}
    for cell in info.get("cells", []):
        for k, v in (cell.get("parameters") or {}).items():
            if v not in values.setdefault(k, []):
                values[k].append(v)
    args = ["emlab", "sweep", str(info.get("notebook", "?"))]
    for k, vs in values.items():
        args += ["-p", k, ",".join(json.dumps(v) if isinstance(v, list | dict) else str(v).lower()
                                   if isinstance(v, bool) else str(v) for v in vs)]
    args += ["--out-dir", str(sweep)]
    return shlex.join(args) + "   # reconstructed from sweep.json"


def write_claims(sweeps: Sequence[str | os.PathLike], out: str | os.PathLike = "docs/claims.md", *,
                 command: str | None = None, figure: bool = True, data_dir: str | os.PathLike | None = None,
                 figure_formats: Sequence[str] = ("html",)) -> tuple[pd.DataFrame, list[Path]]:
    """Score ``sweeps`` and write the page ``out`` (and ``<out stem>_figure.html`` beside it); returns (card, files)."""
    from emlab.plots import save

    sweeps = [Path(s) for s in sweeps]
    card = scorecard(sweeps, data_dir=data_dir)
    out = Path(out)
    commands = []
    for s in sweeps:
        made_by = plan_commands(s) if plan_sweep_dirs(s) is not None else [_sweep_command(s)]
        commands += [c for c in made_by if c not in commands]
    commands += [command] if command else []
    files: list[Path] = []
    fig_name = None
    if figure and (card["n"] > 0).any():
        files += save(_figure(card), out.with_name(f"{out.stem}_figure"), formats=figure_formats)
        fig_name = files[0].name
    png = next((f.name for f in files if f.suffix == ".png"), None)
    page = claims_markdown(card, commands, fig_name, png, provenance=sweep_provenance(sweeps))
    files.insert(0, atomic_write_text(out, page))
    atomic_write_text(out.with_suffix(".csv"), card.to_csv(index=False))
    files.append(out.with_suffix(".csv"))
    return card, files
