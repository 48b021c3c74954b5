"""Pool inoculation-prompt sweeps of several seeds (bench/inoculation_sweep_toy.py --seed S --out DIR):
per prompt the mean general cut and in-domain EM over seeds, Spearman of elicitation against them (bootstrap
95% interval, emlab.training.monitor.spearman_interval, bootstrap seed 0), and each seed's own rho.

    PYTHONPATH=$PWD python bench/inoculation_seeds.py DIR_SEED0 DIR_SEED1 DIR_SEED2

Elicitation scores are the chat model's (the same for every seed but for the paraphrase set, whose prompt
per row is drawn with the seed); the table shows their mean.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from emlab.training.monitor import spearman_interval


def main(dirs: list[str]) -> int:
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in dirs]
    n = sum(1 for k in runs[0] if k.endswith("/label"))
    labels = [runs[0][f"prompts/{i}/label"] for i in range(n)]
    if any([r[f"prompts/{i}/label"] for i in range(n)] != labels for r in runs):
        print("the runs swept different prompts", file=sys.stderr)
        return 2
    mean = lambda key: [statistics.fmean(r[f"prompts/{i}/{key}"] for r in runs) for i in range(n)]  # noqa: E731
    el, cut, ind = mean("elicitation"), mean("general_cut"), mean("indomain_em")
    print(f"{len(runs)} seeds; SFT general / in-domain EM per seed: "
          + ", ".join(f"{r['sft/general_em']:.1f} / {r['sft/indomain_em']:.1f}" for r in runs))
    print("| prompt | elicitation (nats/token) | general cut % (mean) | in-domain EM % (mean) |")
    print("|---|---|---|---|")
    for row in zip(labels, el, cut, ind):
        print(f"| {row[0]} | {row[1]:.3f} | {row[2]:.1f} | {row[3]:.1f} |")
    for name, ys in (("general cut", cut), ("in-domain EM", ind)):
        s = spearman_interval(el, ys)
        print(f"pooled Spearman, elicitation vs {name}: {s['spearman']:.2f} "
              f"[{s['spearman_ci'][0]:.2f}, {s['spearman_ci'][1]:.2f}] (n {s['n']})")
    for d, r in zip(dirs, runs):
        print(f"{d}: rho {r['elicitation_vs_cut/spearman']:.2f} "
              f"[{r['elicitation_vs_cut/spearman_ci'][0]:.2f}, {r['elicitation_vs_cut/spearman_ci'][1]:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
