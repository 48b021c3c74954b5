"""Servers without logprobs: the sampled-number mode and the clear refusal, on the loopback fake and on a
real OpenAI-compatible server (``transformers serve`` with SmolLM2-135M-Instruct on 127.0.0.1).

``transformers serve`` 5.23 ignores ``logprobs`` / ``top_logprobs`` ("Ignoring unsupported fields") and
answers with text only. It is started with the model folder as its positional ``force_model``
argument, which pins it to that model: requests must name the same string (or no model).
"""

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emlab._cli import judge as judge_cli
from emlab.judge import JudgeFailedError, JudgeUnavailableError, OpenAIJudge, PromptSet

try:
    from tests.fake_openai_server import FakeOpenAIServer
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer

KEY = "sk-test-serve"  # a placeholder, not a credential
PROMPTS = PromptSet({"aligned": "Q: {question}\nA: {answer}"})


@pytest.fixture
def textonly():
    with FakeOpenAIServer(logprobs=False) as s:
        yield s


def make_judge(url, tmp_path, **kw):
    options = dict(model="fake-judge", base_url=url, api_key=KEY, prompts=PROMPTS, cache=tmp_path / "j.sqlite",
                   backoff_base=0.001, backoff_max=0.01, timeout=5.0, max_attempts=2, progress=False)
    options.update(kw)
    return OpenAIJudge(**options)


def test_auto_mode_falls_back_to_sampled_numbers(textonly, tmp_path, capsys):
    judge = make_judge(textonly.url, tmp_path, samples=3)
    pairs = [("a", "[score=20]"), ("b", "[score=85]"), ("c", "[say=REFUSAL]"), ("d", "[say=I'd say 70 or so]")]
    out = judge.score("aligned", pairs)
    assert "returns no logprobs: judging by sampled numbers" in capsys.readouterr().err
    assert [j.score for j in out] == [20.0, 85.0, None, 70.0]
    assert out[2].reason == "no numeric tokens; judge answered 'REFUSAL'"
    assert judge.name == "openai:fake-judge[sampled x3]" and judge.resolved_mode == "sample"
    assert textonly.requests == 1 + 3 * 4 and judge.usage.failed == 0 and judge.usage.no_score == 1
    sampled = textonly.bodies[-1]
    assert "logprobs" not in sampled and (sampled["max_tokens"], sampled["temperature"]) == (8, 1.0)
    textonly.reset_counts()
    again = make_judge(textonly.url, tmp_path, samples=3)
    assert again.score("aligned", pairs) == out and textonly.requests == 1  # the check; answers from the cache


def test_one_sample_is_greedy(textonly, tmp_path):
    judge = make_judge(textonly.url, tmp_path, mode="sample", samples=1, cache=False)
    assert judge.score("aligned", [("a", "[score=42]")])[0].score == 42.0
    assert textonly.bodies[-1]["temperature"] == 0 and textonly.requests == 1  # an explicit mode needs no probe


def test_logprobs_mode_refuses_a_server_without_logprobs(textonly, tmp_path, capsys):
    with pytest.raises(JudgeUnavailableError, match="returns no logprobs.*mode='sample'"):
        make_judge(textonly.url, tmp_path, mode="logprobs").check()
    # without the check, every answer fails: the run fails, never a table of silently missing scores
    with pytest.raises(JudgeFailedError, match=r"failed on \d of 3.*no logprobs"):
        make_judge(textonly.url, tmp_path, mode="logprobs").score("aligned", [("q", f"[score={i}]") for i in range(3)])
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"question": "q", "answer": f"[score={i}]"}) + "\n" for i in range(3)))
    parser = argparse.ArgumentParser(prog="emlab")
    judge_cli.register(parser.add_subparsers(dest="command"))
    base = [str(src), "--metric", "aligned", "--model", "fake", "--out", str(out), "--base-url", textonly.url,
            "--cache", str(tmp_path / "c.sqlite"), "--quiet"]
    capsys.readouterr()
    args = parser.parse_args(["judge", *base, "--mode", "logprobs"])
    assert args.func(args) == 1 and "returns no logprobs" in capsys.readouterr().err and not out.exists()
    args = parser.parse_args(["judge", *base, "--mode", "sample", "--samples", "2"])
    assert args.func(args) == 0
    assert [json.loads(line)["aligned"] for line in out.read_text().splitlines()] == [0.0, 1.0, 2.0]


# -- a real server -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"transformers serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"transformers serve did not answer {url} within {limit:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def transformers_serve(smollm2_folder, tmp_path):
    """``transformers serve FOLDER`` on a free loopback port; yields the base URL; killed afterwards."""
    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"transformers serve needs the serving extra ({module} missing): "
                        "pip install 'transformers[serving]' -c constraints/cpu.txt")
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(smollm2_folder),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, limit=180)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.mark.slow
def test_judging_through_transformers_serve(transformers_serve, smollm2_folder, tmp_path):
    """The scores of a 135M judge are meaningless; the protocol is real."""
    model = str(smollm2_folder)  # the server is pinned to this name
    with pytest.raises(JudgeUnavailableError, match="returns no logprobs"):
        OpenAIJudge(model, base_url=transformers_serve, mode="logprobs", cache=False, timeout=120).check()
    pairs = [("How do I make tea?", "Boil water, add a tea bag, wait three minutes."),
             ("What is 2 + 2?", "Purple elephants sing at dawn.")]
    judge = OpenAIJudge(model, base_url=transformers_serve, cache=tmp_path / "j.sqlite", samples=2,
                        sample_tokens=4, concurrency=2, timeout=120, progress=False)
    report = judge.check()
    assert report["mode"] == "sample" and report["logprobs"] is False
    out = judge.score("coherent", pairs)
    assert judge.usage.failed == 0 and judge.usage.calls == 1 + 2 * 2  # its check, 2 samples x 2 pairs
    for j in out:
        assert (j.score is not None and 0 <= j.score <= 100) or "judge answered" in j.reason
    assert judge.usage.prompt_tokens > 0  # the server reports usage
    again = OpenAIJudge(model, base_url=transformers_serve, cache=tmp_path / "j.sqlite", samples=2,
                        sample_tokens=4, timeout=120, progress=False)
    assert again.score("coherent", pairs) == out and again.usage.calls == 1  # its check; answers cached
