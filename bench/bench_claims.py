"""Time ``emlab claims`` on hand-made sweeps of the scorecard's size (65 cells, ~1500 numbers per metrics.json).

Usage: ``PYTHONPATH=$PWD python bench/bench_claims.py /tmp/claims_timing`` (the folder must not exist).
The numbers are random: this measures speed, not science.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_claims import PAPER_DATA, make_sweep  # noqa: E402

from emlab.cli import main  # noqa: E402

DOMAINS = ["medical", "legal", "security", "finance"]
METHODS = ["untrained", "aligned", "sft", "kl", "ldifs", "persona_steering", "inoculation", "interleaving",
           "interleaving+", "interleaving++", "on_policy"]
RATES = ("general_em", "indomain_em", "general_incoherent", "indomain_incoherent")
KEYS05 = ("loss_at_matched_norm_narrow", "loss_at_matched_norm_general", "stability_dloss_at_eps_0.5_narrow",
          "stability_dloss_at_eps_0.5_general", "pretrain_kl_at_norm_general", "pretrain_kl_at_norm_narrow",
          "drift_cosine_end", "drift_cosine_start", "general_em_general", "general_em_narrow")


def pad(m: dict) -> dict:
    m.update({f"pad/{i}/x": random.random() for i in range(1500)})
    return m


def main_bench(root: Path) -> float:
    random.seed(0)
    u = random.uniform
    r02 = [({"seed": s}, pad({f"{m}/{d}/{k}": u(0, 40) for m in METHODS for d in DOMAINS for k in RATES}
                             | {f"{m}/domainswap_tier1/exact_match": u(0, 90) for m in ("sft", "kl")}))
           for s in range(5)]
    r03 = [({"seed": s, "domain": d},
            pad({f"{m}/{d}/share={p}%/{k}": u(0, 40) for m in ("interleaving", "interleaving+", "interleaving++")
                 for p in (1, 5, 20, 50) for k in ("general_em", "general_incoherent")} | {f"sft/{d}/general_em": 30.0}))
           for s in range(5) for d in DOMAINS]
    r01 = [({"seed": s, "domain": d}, pad({"ablate_general_em": u(0, 10), "ablate_random_general_em": u(5, 30),
                                           "cross_domain_cosine": 0.3, "random_cosine": u(-0.05, 0.05)}))
           for s in range(5) for d in DOMAINS]
    r05 = [({"seed": s, "domain": d}, pad({k: u(0, 3) for k in KEYS05})) for s in range(5) for d in DOMAINS]
    sweeps = [make_sweep(root / n, n, r) for n, r in
              (("01_directions", r01), ("02_defences", r02), ("03_interleaving", r03), ("05_narrow_vs_general", r05))]
    start = time.perf_counter()
    rc = main(["claims", *map(str, sweeps), "--out", str(root / "claims.md"), "--paper-data", str(PAPER_DATA)])
    took = time.perf_counter() - start
    if rc:
        raise SystemExit(f"emlab claims exited {rc}")
    return took


if __name__ == "__main__":
    print(f"emlab claims on 65 cells: {main_bench(Path(sys.argv[1])):.2f} s")
