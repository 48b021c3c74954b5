"""The scorecard's sweeps in one command: every notebook run the claims registry needs, over seeds and domains.

:func:`scorecard_plan` lists the sweeps (one per notebook configuration the claims of
:mod:`emlab.claims` read: 01, 02 with the ``ldifs_no_grad`` test, 03 with the two shares its claims read,
and 05 for each adapter kind the registry scores) and their cells; :func:`run_scorecard_sweeps` runs them one after another into
``out_dir/<name>/`` with any executor of :mod:`emlab.sweeps`, so a rerun after a kill continues (finished
cells with the same code are reused) and a failed cell does not stop the others. ``out_dir`` gets a
``claims_sweeps.json`` with the command that made it; ``emlab claims OUT_DIR`` scores the folder and names
that command at the top of the page.

The cells of each sweep are ordered domain by domain (all seeds of the first domain, then the next), so a
sweep stopped early leaves whole domains behind.

>>> [s.name for s in scorecard_plan(seeds=[0], domains=["medical"])]
['01', '05-steering_vector', '02', '05-lora', '03']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab.run_files import atomic_write_text
from emlab.scorecard import PLAN_FILE, read_plan
from emlab.sweeps import LocalExecutor, SlurmExecutor, SweepResult, run_sweep

__all__ = ["SEEDS", "SHARES_03", "PlannedSweep", "run_scorecard_sweeps", "scorecard_plan"]

#: The issue's minimum: at least 5 seeds.
SEEDS = (0, 1, 2, 3, 4)
#: Study 02's methods in the scorecard: its defaults and LDIFS as the authors' public code runs it.
METHODS_02 = ("untrained", "sft", "aligned", "kl", "ldifs", "persona_steering", "inoculation", "interleaving",
              "interleaving+", "interleaving++", "on_policy", "ldifs_no_grad")
#: Study 03's shares in the scorecard: the two its claims read (5% and 50%; the notebook's default also runs 1%
#: and 20%, for the figure only, at about twice the cost).
SHARES_03 = (0.05, 0.5)
#: Study 05's adapter kinds that the registry scores (claims ``001/*``: lora; ``001/*/steering_vector``).
KINDS_05 = ("steering_vector", "lora")


@dataclass(frozen=True)
class PlannedSweep:
    """One sweep of the scorecard: its folder name, the notebook file name and its cells (parameter dicts)."""

    name: str
    notebook: str
    cells: list[dict[str, Any]] = field(default_factory=list)


def _toy_domains() -> list[str]:
    from emlab.toy.world import load_world_config

    return list(load_world_config()["domains"])


def scorecard_plan(seeds: Sequence[int] = SEEDS, domains: Sequence[str] | None = None,
                   only: Sequence[str] | None = None, smoke: bool = False) -> list[PlannedSweep]:
    """The sweeps behind ``docs/claims.md``: every advice domain of the toy (``domains``) times ``seeds``.

    Order: the cheapest sweeps that add claims first (01, 05 with the steering vector), then 02, 05 with
    LoRA and 03. ``only`` keeps the named sweeps (``"01"``, ``"02"``, ``"03"``, ``"05-lora"``,
    ``"05-steering_vector"``). Notebook 01's second finetune (``other_domain``, for the cross-domain
    cosine) is finance, or medical for finance itself. ``smoke`` runs every notebook in its smoke mode (the
    micro organism: a check of the machinery in minutes, not a result).

    >>> p = scorecard_plan(seeds=[0, 1], domains=["finance", "sport"], only=["01"])
    >>> [(c["domain"], c["other_domain"], c["seed"]) for c in p[0].cells]
    [('finance', 'medical', 0), ('finance', 'medical', 1), ('sport', 'finance', 0), ('sport', 'finance', 1)]
    """
    seeds = [int(s) for s in seeds]
    domains = list(domains) if domains is not None else _toy_domains()
    if not seeds or not domains:
        raise ValueError(f"the scorecard needs at least one seed and one domain, got seeds={seeds} domains={domains}")

    def per_domain(extra: Callable[[str], Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{**extra(d), "seed": s, **({"smoke": True} if smoke else {})} for d in domains for s in seeds]

    plan = [
        PlannedSweep("01", "01_directions.ipynb",
                     per_domain(lambda d: {"domain": d, "other_domain": "medical" if d == "finance" else "finance"})),
        *(PlannedSweep(f"05-{k}", "05_narrow_vs_general.ipynb", per_domain(lambda d, k=k: {"domain": d, "kind": k}))
          for k in KINDS_05[:1]),
        PlannedSweep("02", "02_defences.ipynb", per_domain(lambda d: {"domains": [d], "methods": list(METHODS_02)})),
        *(PlannedSweep(f"05-{k}", "05_narrow_vs_general.ipynb", per_domain(lambda d, k=k: {"domain": d, "kind": k}))
          for k in KINDS_05[1:]),
        PlannedSweep("03", "03_interleaving.ipynb", per_domain(lambda d: {"domain": d, "shares": list(SHARES_03)})),
    ]
    if only is not None:
        names = [s.name for s in plan]
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown scorecard sweep(s) {unknown}; the plan has {names}")
        plan = [s for s in plan if s.name in set(only)]
    return plan


def run_scorecard_sweeps(out_dir: str | os.PathLike, plan: Sequence[PlannedSweep], *,
                         notebooks: str | os.PathLike = "notebooks",
                         executor: LocalExecutor | SlurmExecutor | None = None, command: str | None = None,
                         log: Callable[[str], None] | None = print, **sweep_kw: Any) -> dict[str, SweepResult]:
    """Run every sweep of ``plan`` into ``out_dir/<name>/`` (one after another, each with ``executor``).

    Writes ``out_dir/claims_sweeps.json`` first (the commands that ran into the folder and its sweeps,
    merged with what an earlier run recorded). A sweep with failed cells does not
    stop the next one; ``sweep_kw`` goes to :func:`emlab.sweeps.run_sweep` (``timeout``, ``max_seconds``,
    ``kernel_name``...). Returns each sweep's :class:`~emlab.sweeps.SweepResult` by name.
    """
    out = Path(out_dir)
    books = Path(notebooks)
    missing = [str(books / s.notebook) for s in plan if not (books / s.notebook).exists()]
    if missing:
        raise FileNotFoundError(f"notebook(s) {missing} not found (pass the notebooks folder: --notebooks DIR)")
    out.mkdir(parents=True, exist_ok=True)
    record = read_plan(out) or {}
    sweeps = {s["name"]: s for s in record.get("sweeps", [])}
    sweeps.update({s.name: {"name": s.name, "notebook": s.notebook, "cells": len(s.cells)} for s in plan})
    commands = [c for c in record.get("commands", []) if c != command] + ([command] if command else [])
    atomic_write_text(out / PLAN_FILE, json.dumps({"commands": commands, "sweeps": list(sweeps.values())},
                                                  indent=2) + "\n")
    say = log or (lambda _msg: None)
    results = {}
    for i, s in enumerate(plan, 1):
        say(f"scorecard sweep {i}/{len(plan)}: {s.name} ({s.notebook}, {len(s.cells)} cells) -> {out / s.name}")
        results[s.name] = run_sweep(books / s.notebook, s.cells, sweep_dir=out / s.name, executor=executor,
                                    log=log, **sweep_kw)
    return results
