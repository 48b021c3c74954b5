"""Local sweep throughput: 2 workers against 1 (serial) on the same cells of a tiny CPU-bound notebook,
and the per-cell overhead of the sweep machinery. Both in one run, so they share the machine's load.

    PYTHONPATH=$PWD python bench/bench_sweep.py [--cells 8] [--work 3000000] [--workers 2]

Prints wall times, throughputs (cells per minute), their ratio, and two overheads per cell:
  in-worker:  a cell's wall time in its worker minus the notebook's execution time (papermill, kernel
              start included) -- what run_cell adds around run_notebook;
  amortized:  (sweep wall time x workers / cells) minus the mean notebook execution time -- everything
              the sweep adds per cell: worker start-up (imports), dispatch, polling, manifest, aggregation.
The machine may be shared: the load average is printed before and after; rerun for a second sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from emlab import sweeps

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "params",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "source": ["out_dir = None\n", "seed = 0\n", "work = 1000"],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "body",
            "metadata": {},
            "outputs": [],
            "source": [
                "import json, time\n",
                "from pathlib import Path\n",
                "t0 = time.process_time()\n",
                "acc = 0\n",
                "for i in range(work):\n",
                "    acc = (acc + i * i + seed) % 1000003\n",
                "(Path(out_dir) / 'metrics.json').write_text(json.dumps({'acc': acc, 'cpu_s': time.process_time() - t0}))",
            ],
        },
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def one(nb: Path, cells: list[dict], folder: Path, workers: int) -> dict:
    ex = sweeps.LocalExecutor(workers=workers)
    t0 = time.perf_counter()
    res = sweeps.run_sweep(nb, cells, sweep_dir=folder, executor=ex, log=None)
    wall = time.perf_counter() - t0
    if not res.ok:
        raise SystemExit(f"bench cells failed: {res.describe()}")
    recs = [json.loads((c.run_dir / sweeps.CELL_FILE).read_text()) for c in res.cells]
    nb_s = [r["notebook_seconds"] for r in recs]
    inworker = [r["seconds"] - r["notebook_seconds"] for r in recs]
    return {
        "workers": workers,
        "threads": ex.threads,
        "wall_s": wall,
        "cells_per_min": 60 * len(cells) / wall,
        "notebook_s_mean": statistics.mean(nb_s),
        "overhead_inworker_s_mean": statistics.mean(inworker),
        "overhead_inworker_s_max": max(inworker),
        "overhead_amortized_s": wall * workers / len(cells) - statistics.mean(nb_s),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--work", type=int, default=3_000_000, help="loop iterations per notebook (CPU-bound)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        nb = Path(tmp) / "cpu.ipynb"
        nb.write_text(json.dumps(NOTEBOOK))
        cells = [{"seed": s, "work": args.work} for s in range(args.cells)]
        print(f"cores {len(os.sched_getaffinity(0))}; load average before {os.getloadavg()}", flush=True)
        serial = one(nb, cells, Path(tmp) / "serial", 1)
        parallel = one(nb, cells, Path(tmp) / "parallel", args.workers)
        print(f"load average after {os.getloadavg()}")
    for r in (serial, parallel):
        print(
            f"workers={r['workers']} threads={r['threads']}: wall {r['wall_s']:.1f} s, {r['cells_per_min']:.1f} cells/min, "
            f"notebook {r['notebook_s_mean']:.2f} s/cell, overhead in-worker {r['overhead_inworker_s_mean']:.2f} s "
            f"(max {r['overhead_inworker_s_max']:.2f}), amortized {r['overhead_amortized_s']:.2f} s/cell"
        )
    ratio = parallel["cells_per_min"] / serial["cells_per_min"]
    print(f"throughput ratio {args.workers} workers / serial: {ratio:.2f}x ({args.cells} cells, work={args.work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
