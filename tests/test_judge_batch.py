"""The Batch API judge against the loopback server's /v1/files and /v1/batches: upload, poll, download,
cache, resume after a kill, the wait limit, per-request and whole-batch failures, the cost estimate."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emlab.judge import JudgeBatchPendingError, JudgeFailedError, JudgeUnavailableError, OpenAIJudge, PromptSet
from emlab.judge.llm import CostEstimate, estimate_cost

try:
    from tests.fake_openai_server import FakeOpenAIServer, score_tokens
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer, score_tokens

from emlab.judge import aggregate_logprobs

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-batch"  # a placeholder, not a credential
PROMPTS = PromptSet({"aligned": "Q: {question}\nA: {answer}"})


def expected(score: int) -> float:
    return aggregate_logprobs(score_tokens(score)).score


@pytest.fixture
def server():
    with FakeOpenAIServer(batch_polls=2) as s:
        yield s


def make_judge(server, tmp_path, **kw):
    options = dict(
        model="gpt-4o-mini",
        base_url=server.url,
        api_key=KEY,
        prompts=PROMPTS,
        cache=tmp_path / "judge.sqlite",
        backoff_base=0.001,
        backoff_max=0.01,
        max_attempts=2,
        progress=False,
        timeout=5.0,
        batch=True,
        batch_poll=0.01,
        batch_wait=30,
        mode="logprobs",
    )
    options.update(kw)
    return OpenAIJudge(**options)


def count(server, what):
    return sum(r == what for r in server.batch_requests)


def test_batch_upload_poll_download_cache(server, tmp_path):
    pairs = [(f"q{i}", f"[score={10 * i}]") for i in range(6)] + [("r", "[refuse]"), ("q0", "[score=0]")]
    judge = make_judge(server, tmp_path)
    out = judge.score("aligned", pairs)
    assert [j.score for j in out[:6]] == pytest.approx([expected(10 * i) for i in range(6)])
    assert out[6].score is None and "REFUSAL" in out[6].reason and out[7] == out[0]
    assert server.requests == 0  # nothing went to /chat/completions
    assert count(server, "POST /v1/files") == 1 and count(server, "POST /v1/batches") == 1
    [batch] = server.batches.values()
    lines = server.files[batch["input_file_id"]].decode().splitlines()
    assert len(lines) == 7  # the duplicate pair is asked once
    assert '"url": "/v1/chat/completions"' in lines[0] and '"top_logprobs": 20' in lines[0]
    assert count(server, f"GET /v1/batches/{batch['id']}") == 3  # in progress twice, then completed
    assert judge.usage.batch_requests == 7 and judge.usage.batch_prompt_tokens == 700
    assert judge.usage.cost_usd == pytest.approx(estimate_cost("gpt-4o-mini", 700, 7, batch=True))
    before = list(server.batch_requests)
    again = make_judge(server, tmp_path).score("aligned", pairs)
    assert again == out and server.batch_requests == before  # all from the cache


def test_failed_requests_in_a_batch_are_failures_with_reasons(server, tmp_path):
    pairs = [(f"q{i}", f"[score={i}]") for i in range(6)] + [
        ("e", "[batcherr]"), ("b", "[badline]"), ("n", "[nologprobs]"), ("x", "[nanx1]")]
    judge = make_judge(server, tmp_path, max_missing=0.5)
    out = judge.score("aligned", pairs)
    err, bad, nolog, nan = out[6:]
    assert err.score is None and err.reason == "batch request failed (HTTP 500): injected request failure"
    assert bad.score is None and "ended 'completed' without a result for this request" in bad.reason
    assert nolog.score is None and "no logprobs" in nolog.reason
    assert nan.score is None and "NaN log-probability" in nan.reason and judge.usage.nan_logprobs == 1
    assert judge.usage.failed == 4
    # failures are not cached: a rerun submits a batch of just those four
    make_judge(server, tmp_path, max_missing=1.0).score("aligned", pairs)
    last = list(server.batches.values())[-1]
    assert len(server.files[last["input_file_id"]].decode().splitlines()) == 4


def test_failed_batch_raises_and_expired_batch_keeps_half(server, tmp_path):
    pairs = [(f"q{i}", f"[score={i}]") for i in range(10)]
    server.batch_outcome = "failed"
    with pytest.raises(JudgeFailedError, match="ended 'failed'.*injected batch failure"):
        make_judge(server, tmp_path).score("aligned", pairs)
    server.batch_outcome = "expired"
    with pytest.raises(JudgeFailedError, match="failed on 5 of 10"):
        make_judge(server, tmp_path).score("aligned", pairs)
    server.batch_outcome = "completed"
    out = make_judge(server, tmp_path).score("aligned", pairs)
    assert all(j.score is not None for j in out)
    last = list(server.batches.values())[-1]
    assert len(server.files[last["input_file_id"]].decode().splitlines()) == 5  # only what expired


def test_wait_limit_then_rerun_resumes_the_same_batch(server, tmp_path):
    pairs = [(f"q{i}", f"[score={i}]") for i in range(4)]
    server.batch_polls = 10**6  # never finishes
    t0 = time.monotonic()
    with pytest.raises(JudgeBatchPendingError, match="batch_1 \\(in_progress\\) not finished.*rerun") as info:
        make_judge(server, tmp_path, batch_wait=0.3).score("aligned", pairs)
    assert time.monotonic() - t0 < 5 and info.value.batch_ids == ["batch_1"]
    server.batch_polls = 0
    out = make_judge(server, tmp_path).score("aligned", pairs)
    assert [j.score for j in out] == pytest.approx([expected(i) for i in range(4)])
    assert count(server, "POST /v1/batches") == 1 and count(server, "POST /v1/files") == 1


@pytest.mark.slow
def test_resume_after_the_process_is_killed_while_waiting(server, tmp_path):
    server.batch_polls = 10**6
    script = tmp_path / "judge_batch.py"
    script.write_text(
        "import sys\nfrom emlab.judge import OpenAIJudge, PromptSet\n"
        f"j = OpenAIJudge('gpt-4o-mini', base_url=sys.argv[1], api_key={KEY!r}, cache=sys.argv[2], "
        "prompts=PromptSet({'aligned': 'Q: {question}\\nA: {answer}'}), batch=True, batch_poll=0.05, "
        "batch_wait=600, progress=False, mode='logprobs')\n"
        "j.score('aligned', [(f'q{i}', f'[score={i}]') for i in range(5)])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), server.url, str(tmp_path / "judge.sqlite")], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any("GET /v1/batches/batch_1" == r for r in server.batch_requests):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the judge never polled its batch"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    server.batch_polls = 0
    out = make_judge(server, tmp_path).score("aligned", [(f"q{i}", f"[score={i}]") for i in range(5)])
    assert [j.score for j in out] == pytest.approx([expected(i) for i in range(5)])
    assert count(server, "POST /v1/batches") == 1  # resumed, not resubmitted


def test_batch_mode_preflight_and_options(tmp_path):
    with FakeOpenAIServer(logprobs=False) as s:
        with pytest.raises(JudgeUnavailableError, match="no logprobs"):
            make_judge(s, tmp_path, mode="auto").check()
    with FakeOpenAIServer() as s:
        report = make_judge(s, tmp_path, mode="auto").check()
        assert report["mode"] == "logprobs" and report["batch"] is True and "GET /v1/batches" in s.batch_requests
    with pytest.raises(ValueError, match="needs logprobs"):
        OpenAIJudge(batch=True, mode="sample", cache=False)
    with pytest.raises(ValueError, match="needs a cache"):
        OpenAIJudge(batch=True, cache=False)


def test_cost_estimate_is_printed_before_a_large_job(server, tmp_path, capsys):
    pairs = [(f"question {i}", f"[score={i}]") for i in range(12)]
    judge = make_judge(server, tmp_path, batch=False, cost_notice=5)
    est = judge.estimate("aligned", pairs)
    prompts = [PROMPTS.render("aligned", q, a) for q, a in pairs]
    assert (est.requests, est.cached, est.completion_tokens) == (12, 0, 12)
    assert est.prompt_tokens == sum(len(p) // 4 + 8 for p in prompts)
    judge.score("aligned", pairs[:4])
    assert capsys.readouterr().err == ""  # 4 requests: under the notice threshold
    judge.score("aligned", pairs)
    err = capsys.readouterr().err
    assert "judge gpt-4o-mini, aligned: 8 requests (4 answers cached)" in err and "list prices of 2026-03" in err
    assert judge.estimate("aligned", pairs).requests == 0
    big = CostEstimate("gpt-4o", "aligned", 48_000, 0, 48_000 * 300, 48_000)
    assert big.usd == pytest.approx(48_000 * 300 * 2.5e-6 + 48_000 * 1e-5) and big.usd_batch == pytest.approx(big.usd / 2)
    assert "cost unknown" in str(CostEstimate("my-vllm-model", "aligned", 1, 0, 10, 1))
