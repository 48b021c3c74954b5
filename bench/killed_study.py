"""A study SIGKILLed during a finetune and run again ends as an uninterrupted run: same weights, same metrics.

Runs study 00 (``em_organism``) three times into ``OUT``: ``OUT/straight`` uninterrupted; ``OUT/killed``
SIGKILLed as soon as a file matching ``--kill-at`` (a glob in the run folder) exists, then run again into
the same folder. The rerun loads the finetunes that had finished, resumes the killed one from its
newest complete checkpoint, and must end with byte-identical adapters, per-sample records and
metrics. It prints what the rerun said (loaded / skipped / resumed) and the comparison.

The rerun continues in the killed run's folder: ``start_run`` resumes a run that did not finish when
its config is the same (see :mod:`emlab.runs`).

Usage: ``python bench/killed_study.py [--out runs/bench_killed_study] [--smoke] [--rows N]
[--kill-at 'ft_aligned/checkpoint-*/trainer_state.json']`` (the default: right after the first
complete checkpoint of the second finetune).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LIMIT_S = 3600  # one study run; the kill watch has the same limit


def _child(out: str, smoke: bool, rows: int | None) -> None:
    from emlab.studies import em_organism

    metrics = em_organism(model="toy", smoke=smoke, out_dir=out, seed=0, rows=rows)
    print("METRICS " + json.dumps(metrics, sort_keys=True), flush=True)


def _run(out: Path, args: argparse.Namespace, log: Path, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", str(out)] + (["--smoke"] if args.smoke else []) \
        + (["--rows", str(args.rows)] if args.rows else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + LIMIT_S
    try:
        if kill_at is None:
            proc.wait(timeout=LIMIT_S)
            if proc.returncode != 0:
                sys.exit(f"{out}: the study failed (rc {proc.returncode}); see {log}")
            return proc
        while not any(out.glob(kill_at)):
            if proc.poll() is not None:
                sys.exit(f"{out}: the study ended (rc {proc.returncode}) before {kill_at} appeared; see {log}")
            if time.monotonic() > deadline:
                sys.exit(f"{out}: {kill_at} did not appear within {LIMIT_S} s; see {log}")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _metrics(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("METRICS ")]
    return json.loads(lines[-1][len("METRICS "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_killed_study")
    ap.add_argument("--smoke", action="store_true", help="the micro organism and smoke sizes (about a minute a run)")
    ap.add_argument("--rows", type=int, help="finetuning rows (default: the organism's preset)")
    ap.add_argument("--kill-at", default="ft_aligned/checkpoint-*/trainer_state.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child, args.smoke, args.rows)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    _run(out / "straight", args, out / "straight.log")
    t1 = time.monotonic()
    _run(out / "killed", args, out / "killed.log", kill_at=args.kill_at)
    hit = next((out / "killed").glob(args.kill_at)).relative_to(out / "killed")
    left = sorted(p.name for p in (out / "killed" / hit.parts[0]).iterdir())
    print(f"killed when {hit} appeared; that finetune's folder held: {', '.join(left)}")
    _run(out / "killed", args, out / "rerun.log")
    t2 = time.monotonic()
    said = [line for line in (out / "rerun.log").read_text().splitlines()
            if line.startswith("emlab:") or "skipped incomplete" in line]
    print("the rerun said:\n  " + "\n  ".join(said))
    a, b = out / "straight", out / "killed"
    same_metrics = _metrics(out / "straight.log") == _metrics(out / "rerun.log")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.suffix in (".safetensors", ".jsonl"))
    differ = [f for f in files if not filecmp.cmp(a / f, b / f, shallow=False)]
    print(f"metrics identical: {same_metrics}; {len(files) - len(differ)} of {len(files)} adapters and sample "
          f"files byte-identical{': differ ' + ', '.join(differ) if differ else ''}")
    print(f"uninterrupted run {t1 - t0:.0f} s; killed run + rerun {t2 - t1:.0f} s")
    if not same_metrics or differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
