"""Issue 17's "results unchanged" check: the metrics.json values of two sweeps of the same notebook cells
(before and after a change), compared cell by cell (matched by their parameters).

    PYTHONPATH=$PWD python bench/results_unchanged.py BEFORE_SWEEP AFTER_SWEEP

Prints, per cell, how many numbers are identical and every key that differs or exists on one side only;
training wall times (``*runtime*``, ``*_per_second``, ``*seconds*``, ``*_s``; at any depth) are left out, and
the ``metrics.json`` of runs nested in a cell's folder (05's ``technical/``) are compared too. Exit code 0
when every cell is identical, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import sys

from emlab.aggregate import sweep_runs
from emlab.metrics import TIMING_KEYS, flatten, untimed

_TIMING = re.compile(TIMING_KEYS)


def cells(sweep: str) -> list[tuple[dict, dict]]:
    out = []
    for run_dir, params in sweep_runs(sweep):
        metrics = {}
        for path in sorted(run_dir.rglob("metrics.json")):  # nested runs too (notebook 05's technical/)
            prefix = "" if path.parent == run_dir else f"{path.parent.relative_to(run_dir).as_posix()}:"
            metrics.update({prefix + k: v for k, v in flatten(untimed(json.loads(path.read_text()))).items()
                            if not _TIMING.search(k)})
        out.append(({k: v for k, v in params.items() if k != "out_dir"}, metrics))
    return out


def keyed(cells_: list[tuple[dict, dict]], names: set[str]) -> dict[str, dict]:
    return {json.dumps({k: v for k, v in p.items() if k in names}, sort_keys=True): m for p, m in cells_}


def main(before: str, after: str) -> int:
    ca, cb = cells(before), cells(after)
    # cells match on the parameters both sweeps set (a parameter one sweep leaves at its default is not compared)
    names = set.intersection(*[set(p) for p, _ in ca + cb]) if ca and cb else set()
    a, b = keyed(ca, names), keyed(cb, names)
    same_all = True
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"{key}: only in {'after' if key not in a else 'before'}")
            same_all = False
            continue
        ma, mb = a[key], b[key]
        diff = sorted(k for k in set(ma) | set(mb) if ma.get(k, "<missing>") != mb.get(k, "<missing>"))
        print(f"{key}: {len(set(ma) & set(mb)) - len(diff)} values identical, {len(diff)} differ")
        for k in diff[:20]:
            print(f"  {k}: {ma.get(k, '<missing>')} -> {mb.get(k, '<missing>')}")
        same_all &= not diff
    return 0 if same_all else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
