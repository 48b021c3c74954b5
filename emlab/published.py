"""The published numbers: paper 002's EM tables (``../shared/data/paper002_em_tables.csv``) with emlab's
method and metric names, rates as fractions in [0, 1] (the CSV holds percent).

>>> load_paper_table().query("method == 'kl' and domain == 'medical'")["general_em"].item()  # doctest: +SKIP
0.0158
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

__all__ = ["PAPER_TABLE", "find_repo_root", "load_paper_table"]

#: File name of the published tables, looked for in ``../shared/data/`` beside the repository root.
PAPER_TABLE = "paper002_em_tables.csv"

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


def find_repo_root(start: Path) -> Path | None:
    """The first of ``start`` and its parents holding ``pyproject.toml`` or ``.git``, or None.

    >>> (find_repo_root(Path.cwd()) / "pyproject.toml").exists()  # doctest: +SKIP
    True
    """
    for d in (start, *start.parents):
        if (d / "pyproject.toml").exists() or (d / ".git").exists():
            return d
    return None



def load_paper_table(path: str | os.PathLike | None = None, *, table: int | None = 2) -> pd.DataFrame:
    """Read the published EM tables of paper 002 with emlab's method/metric names and rates in [0, 1].

    ``path`` defaults to ``../shared/data/paper002_em_tables.csv`` beside the repository root (found
    by walking up from the current folder). ``table=2`` keeps the main Qwen2.5-7B results; ``None``
    keeps every table (7 and 12-22 are the 32B and hyperparameter ablations). Columns: ``table, model,
    domain, method, setting, paper_method`` and the four rates of :data:`emlab.plots.METRICS`.

    >>> load_paper_table().query("method == 'kl' and domain == 'medical'")["general_em"].item()  # doctest: +SKIP
    0.0158
    """
    if path is None:
        tried = []
        for start in (Path.cwd(), Path(__file__).resolve().parent):
            root = find_repo_root(start)
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
    missing = [c for c in ("table", "model", "dataset", "method", "setting", *_PAPER_METRICS) if c not in df.columns]
    if missing:
        raise KeyError(f"{path}: missing column(s) {missing}; the data has {list(df.columns)}")
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

