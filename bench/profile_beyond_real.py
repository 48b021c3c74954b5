"""Where the time of study 06's smoke run on a real model goes: SmolLM2, the tests' loopback judge and data.

Runs ``beyond_study(smoke=True)`` in-process exactly as ``tests/test_notebooks_real.py`` runs notebook
06 (SmolLM2-135M-Instruct from emlab's cache, ``judge="gpt-4o-mini"`` against
``tests/fake_openai_server.py``, the datasets of ``tests/data/smollm2``, domain plants) and prints
the total wall time, the judge requests and the time in each phase: every ``generate`` call (prompts,
new tokens, seconds), the finetunes and the trait monitor's measurements. Extra ``key=value``
arguments go to ``beyond_study`` (numbers read as YAML).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/profile_beyond_real.py
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/profile_beyond_real.py schedules='[constant]'
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_openai_server import FakeOpenAIServer  # noqa: E402

import emlab.generation as generation  # noqa: E402
import emlab.studies.beyond as beyond  # noqa: E402
import emlab.training as training  # noqa: E402
import emlab.training.monitor as monitor  # noqa: E402
from emlab.packaged import packaged_model_path  # noqa: E402
from tests.test_notebooks_real import smollm2_files  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])


def timed(module, name: str, label: str, show: bool = False) -> None:
    """Wrap ``module.name`` so that its calls and seconds add up under ``label`` (each call printed with ``show``)."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            TIMES[label][0] += 1
            TIMES[label][1] += took
            if show:
                n = len(args[2]) if len(args) > 2 else len(kwargs.get("prompts", ()))
                print(f"  {label}: {n} prompts, {kwargs.get('max_new_tokens')} new tokens, {took:.2f} s")

    setattr(module, name, wrapper)


def main(argv: list[str]) -> None:
    extra = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in argv)}
    timed(generation, "generate", "generate", show=True)
    timed(training, "finetune", "finetune")
    timed(monitor, "measure", "trait monitor (inside the finetunes)")
    path = packaged_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    with FakeOpenAIServer() as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(OPENAI_BASE_URL=server.url, OPENAI_API_KEY="loopback-server-needs-no-key",
                          EMLAB_JUDGE_CACHE=str(Path(tmp) / "judge.sqlite"))
        start = time.perf_counter()
        beyond.beyond_study(model=str(path), domain="plants", smoke=True, judge="gpt-4o-mini",
                            files=smollm2_files(), out_dir=Path(tmp) / "run", **extra)
        total = time.perf_counter() - start
        print(f"total {total:.1f} s wall, {server.requests} judge requests")
    for label, (calls, seconds) in TIMES.items():
        print(f"{label}: {calls} calls, {seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
