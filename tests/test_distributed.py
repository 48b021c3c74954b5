"""Data-parallel training: two CPU processes (torchrun, gloo) end every method with identical weights.

Runs ``bench/check_distributed.py`` (its wrapper launches itself under torchrun) for a few
representative methods and reads its per-method lines; see that script for what each line checks.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "check_distributed.py"
# KL on separate rows (each rank draws its own rows), LDIFS (reference pass), preventive steering (hooks on the
# unwrapped model) and the learned steering vector (a submodule DDP must sync, base frozen)
METHODS = ("kl_rows", "ldifs", "preventive", "steering_vector")
LINE = re.compile(r"^(?P<method>\S+)\s+(?P<steps>\d+)/(?P<expected>\d+)\s+(?P<agree>yes|NO)\s+(?P<moved>\d+)/(?P<trainable>\d+)"
                  r"\s+(?P<terms>yes|NO)\s+(?P<logs>yes|NO)\s+\S+\s+[\d.]+\s+(?P<ok>ok|FAIL)", re.M)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_two_ranks_end_with_identical_weights():
    cmd = [sys.executable, str(SCRIPT), "--methods", ",".join(METHODS), "--timeout", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    rows = {m["method"]: m for m in LINE.finditer(proc.stdout)}
    assert set(rows) == set(METHODS), out[-4000:]
    for name, row in rows.items():
        assert row["agree"] == "yes", f"{name}: the ranks diverged\n{out[-4000:]}"
        assert row["logs"] == "yes" and row["terms"] == "yes", f"{name}: logged terms\n{out[-4000:]}"
        assert row["steps"] == row["expected"], f"{name}: rows not split between the ranks\n{out[-4000:]}"
        assert row["moved"] == row["trainable"] != "0", f"{name}: weights did not train\n{out[-4000:]}"
        assert row["ok"] == "ok", out[-4000:]
    assert "one-ulp change on rank 1 detected: yes" in proc.stdout, out[-4000:]  # the comparison can fail
    assert "distributed check: PASS" in proc.stdout and proc.returncode == 0, out[-4000:]
