"""Issue 15 obs. 4 end to end: a study SIGKILLed inside a finetune, rerun into the same folder, resumes
(start_run keeps a killed run's folder; finetunes resume from their newest complete checkpoint) and ends
with the metrics, adapters and samples of an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "killed_study.py"


@pytest.mark.slow
def test_killed_study_rerun_matches_an_uninterrupted_run(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path / "ks")],
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "resuming" in out and "from checkpoint-" in out, out[-3000:]
    assert "loaded the finished finetune" in out, out[-3000:]
    assert "metrics identical: True" in out, out[-3000:]
    assert ": differ" not in out
