"""bench/check_gpu.py runs end to end: --tiny on CPU (the real check needs a GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_check_gpu_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EMLAB_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "check_gpu.py"), "--tiny", "--device", "cpu",
                           "--steps", "2", "--new-tokens", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["bf16_losses_agree"] and set(res["models"]) == {"smollm2", "qwen2.5-7b-random"}
    for model in res["models"].values():
        assert set(model) == {"sft", "kl", "ldifs", "preventive", "generation"}
        for method in ("sft", "kl", "ldifs", "preventive"):
            r = model[method]
            assert math.isfinite(r["loss_bf16"]) and r["tokens_per_s"] > 0 and r["loss_rel_diff"] < 0.02
        assert model["generation"]["new_tokens"] > 0
