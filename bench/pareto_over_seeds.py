"""The Pareto view over seeds: study 06's methods with every method of study 02 and study 03's interleaving
share sweep, per seed from finished sweeps, summarised by emlab.pareto.pareto_seeds into a Markdown page
and a figure (the means, the front of the means starred).

    PYTHONPATH=$PWD python bench/pareto_over_seeds.py SWEEP06 --with SWEEP02 SWEEP03 \
        --out docs/results/pareto_3seeds.md [--png]

Cells are matched by their ``seed`` parameter; a seed counts when the 06 sweep has it (the 02/03 sweeps add
their points where they have the same seed). Only public emlab names are used.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from emlab.aggregate import sweep_runs
from emlab.pareto import beyond_points, defences_points, pareto_figure, pareto_seeds, run_prefix
from emlab.plots import save


def cells_by_seed(sweep: str) -> dict[str, Path]:
    return {str(params.get("seed")): run_dir for run_dir, params in sweep_runs(sweep)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep06")
    p.add_argument("--with", dest="others", nargs="*", default=[], help="02 / 03 sweeps whose cells join by seed")
    p.add_argument("--out", default="docs/results/pareto_3seeds.md")
    p.add_argument("--png", action="store_true")
    args = p.parse_args(argv)

    per_seed: dict[str, dict[str, tuple[float, float]]] = {}
    others = [cells_by_seed(s) for s in args.others]
    for seed, run_dir in sorted(cells_by_seed(args.sweep06).items()):
        pts = beyond_points(json.loads((run_dir / "metrics.json").read_text()))
        for cells in others:
            if seed in cells:
                # the 06 cell may already hold the same 02 points (its defences_run): same names, same values
                pts.update(defences_points(cells[seed], prefix=run_prefix(cells[seed])))
        per_seed[seed] = pts
    if not per_seed:
        print("no finished 06 cell", file=sys.stderr)
        return 2
    rows = pareto_seeds(per_seed)
    out = Path(args.out)
    fig = pareto_figure({r["name"]: (r["general_em"], r["kept"]) for r in rows if r["n"] == len(per_seed)},
                        title=f"General EM against in-domain EM kept: mean over {len(per_seed)} seeds (toy, medical)")
    files = save(fig, out.with_name(out.stem + "_figure"), ("html", "png") if args.png else ("html",))
    fmt = lambda x: "–" if isinstance(x, float) and math.isnan(x) else f"{x:.1f}"  # noqa: E731
    lines = [f"# The Pareto view over {len(per_seed)} seeds (toy organism, medical)", "",
             "Made by:", "", "```bash", shlex.join(["python", "bench/pareto_over_seeds.py", *(argv or sys.argv[1:])]), "```",
             "", f"Seeds {', '.join(sorted(per_seed))}. Study 06's methods (`{args.sweep06}`) with, per seed, every method "
             "of study 02 (`02:`) and study 03's interleaving variants at each share (`03:`, their hyperparameter "
             "sweep). General EM in percent (lower is better); in-domain EM kept = the method's in-domain EM over "
             "SFT's of the same run, in percent (higher is better). Mean ± sd over the seeds that have the "
             "method; *front*: on the Pareto front of the means (no other method has lower or equal mean EM and "
             "higher or equal mean kept, one strictly); *seed fronts*: on how many seeds' own fronts it is.", ""]
    png = next((f.name for f in files if f.suffix == ".png"), None)
    if png:
        lines += [f"![Pareto view over seeds]({png})", ""]
    lines += ["| method | n | general EM % | in-domain EM kept % | front | seed fronts |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['n']} | {fmt(r['general_em'])} ± {fmt(r['general_em_sd'])} | "
                     f"{fmt(r['kept'])} ± {fmt(r['kept_sd'])} | {'**yes**' if r['front'] else ''} | "
                     f"{r['on_seed_fronts']} of {r['n']} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {', '.join(str(f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
