"""Judge faults (issue 15, observation 5): outages, hangs, malformed replies, NaN logprobs, a missing key.

Each test reproduces one observed fault against the loopback OpenAI-compatible server and asserts the
new behaviour: a clear error before any work, a non-zero exit / a raised error past the failure
threshold (nothing written, what was judged kept in the cache), counts below it, a bounded wait.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emlab._cli import judge as judge_cli
from emlab.judge import (
    JudgeFailedError,
    JudgeUnavailableError,
    OpenAIJudge,
    PromptSet,
    preflight,
)

try:
    from tests.fake_openai_server import FakeOpenAIServer
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-" + "test-fault-injection"  # a placeholder, not a credential (split so key scanners skip it)
PROMPTS = PromptSet({"aligned": "Q: {question}\nA: {answer}", "coherent": "C {question} {answer}"})


@pytest.fixture
def server():
    with FakeOpenAIServer(retry_after=0.01, hang=5.0) as s:
        yield s


def closed_port_url() -> str:
    """A loopback URL nobody listens on (an endpoint that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make_judge(url, tmp_path, **kw):
    options = dict(
        model="fake-judge",
        base_url=url,
        api_key=KEY,
        prompts=PROMPTS,
        cache=tmp_path / "judge.sqlite",
        backoff_base=0.001,
        backoff_max=0.01,
        timeout=1.0,
        max_attempts=2,
        progress=False,
    )
    options.update(kw)
    return OpenAIJudge(**options)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="emlab")
    judge_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["judge", *argv])
    return args.func(args)


def write_rows(path, answers):
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))


def cli_args(src, out, url, cache, *extra):
    return [str(src), "--metric", "aligned", "--model", "fake-judge", "--out", str(out), "--base-url", url,
            "--cache", str(cache), "--quiet", "--max-attempts", "2", *extra]


# -- before any work: key and endpoint -------------------------------------------------------------------


def test_missing_key_fails_at_once_naming_both_variables(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    judge = OpenAIJudge(prompts=PROMPTS, cache=False, progress=False)
    with pytest.raises(JudgeUnavailableError, match="OPENAI_API_KEY.*OPENAI_BASE_URL"):
        judge.check()
    src = tmp_path / "in.jsonl"
    write_rows(src, ["a"])
    code = run_cli([str(src), "--metric", "aligned", "--out", str(tmp_path / "o.jsonl"), "--no-cache", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "OPENAI_API_KEY" in err and "OPENAI_BASE_URL" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_endpoint_down_fails_emlab_judge_in_a_real_process(tmp_path):
    """Observation: with the endpoint down every row read 'gave up' and `emlab judge` exited 0."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(src, [f"[score={i}]" for i in range(5)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": KEY, "EMLAB_JUDGE_CACHE": str(tmp_path / "c")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "emlab.cli", "judge", *cli_args(src, out, closed_port_url(), tmp_path / "c.sqlite")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "did not answer a one-token request" in proc.stderr and "connection error" in proc.stderr
    assert not out.exists()
    assert KEY not in proc.stderr + proc.stdout
    assert time.monotonic() - t0 < 60


def test_preflight_checks_endpoint_and_reports_mode(server, tmp_path):
    judge = make_judge(server.url, tmp_path)
    report = preflight(judge)
    assert report["mode"] == "logprobs" and report["logprobs"] is True and report["endpoint"] == server.url
    assert server.requests == 1 and server.bodies[-1]["max_tokens"] == 1
    server.outage = 503
    with pytest.raises(JudgeUnavailableError, match="did not answer.*HTTP 503"):
        make_judge(server.url, tmp_path).check()
    assert preflight(object()) is None  # judges without a check (toy, local) need none


def test_study_checks_the_judge_before_loading_or_training(monkeypatch, tmp_path):
    """Observation: a missing key was noticed only at the first judge request, after all finetuning."""
    import emlab.models
    from emlab.studies.common import StudyContext

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the judge was checked")

    monkeypatch.setattr(emlab.models, "load_model", no_load)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("EMLAB_JUDGE_CACHE", str(tmp_path / "c.sqlite"))
    with pytest.raises(JudgeUnavailableError, match="OPENAI_API_KEY"):
        StudyContext.create(str(tmp_path / "some-model"), judge="gpt-4o-mini")
    # a judge given by name talks to $OPENAI_BASE_URL: a dead one fails the same way, before loading
    monkeypatch.setenv("OPENAI_BASE_URL", closed_port_url())
    monkeypatch.setenv("EMLAB_JUDGE_TIMEOUT", "1")
    with pytest.raises(JudgeUnavailableError, match="did not answer"):
        StudyContext.create(str(tmp_path / "some-model"), judge="gpt-4o-mini")


# -- the failure threshold -----------------------------------------------------------------------------


def test_outage_mid_run_fails_nonzero_and_keeps_what_was_judged(server, tmp_path, capsys):
    src, out, cache = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "c.sqlite"
    write_rows(src, [f"[score={i}]" for i in range(20)])
    server.fail_after = 6  # the preflight and 5 answers, then the endpoint goes down
    code = run_cli(cli_args(src, out, server.url, cache, "--concurrency", "1"))
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "failed on 3 of 20 'aligned' judgments" in err and "stopped early" in err and "HTTP 503" in err
    server.fail_after = None
    server.reset_counts()
    assert run_cli(cli_args(src, out, server.url, cache)) == 0
    assert server.requests == 1 + 15  # the preflight, then only what was not cached
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["aligned"] is not None for r in rows)


def test_below_the_threshold_failures_are_counted_and_reported(server, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(src, [f"[score={i}]" for i in range(19)] + ["[always=503]"])
    assert run_cli(cli_args(src, out, server.url, tmp_path / "c.sqlite")) == 0
    err = capsys.readouterr().err
    assert "aligned: 19 scored, 1 missing (1 failed, 0 not a number)" in err
    assert "1 of 20 'aligned' judgments failed (within max_missing=10%)" in err
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["aligned"] is None and last["aligned_reason"] == "gave up after 2 attempts: HTTP 503"


def test_threshold_is_configurable_and_raises_with_the_judgments(server, tmp_path, monkeypatch):
    pairs = [(f"q{i}", f"[score={i}]") for i in range(8)] + [("x", "[always=500]"), ("y", "[always=500]")]
    with pytest.raises(JudgeFailedError) as info:
        make_judge(server.url, tmp_path, mode="logprobs").score("aligned", pairs)
    e = info.value
    assert (e.failed, e.total, len(e.judgments)) == (2, 10, 10)
    assert "failed on 2 of 10" in str(e) and "max_missing=10%" in str(e)
    monkeypatch.setenv("EMLAB_JUDGE_MAX_MISSING", "0.25")
    out = make_judge(server.url, tmp_path, mode="logprobs").score("aligned", pairs)
    assert [j.score is None for j in out] == [False] * 8 + [True] * 2
    with pytest.raises(ValueError, match="EMLAB_JUDGE_MAX_MISSING"):
        monkeypatch.setenv("EMLAB_JUDGE_MAX_MISSING", "ten percent")
        make_judge(server.url, tmp_path)


@pytest.mark.slow
def test_study_run_fails_with_the_reason(server, tmp_path):
    """A notebook judging through a dead endpoint is a failed run whose error names the judge failure."""
    nbformat = pytest.importorskip("nbformat")
    from emlab.notebooks import NotebookFailed, run_notebook

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("url = ''\nout_dir = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "from emlab.evaluation import judge_records\nfrom emlab.judge import OpenAIJudge\n"
            f"judge = OpenAIJudge('fake-judge', base_url=url, api_key={KEY!r}, cache=False, progress=False, "
            "max_attempts=1, mode='logprobs')\n"
            "records = [{'question': f'q{i}', 'answer': f'[score={i}]'} for i in range(10)]\n"
            "judge_records(records, judge)"
        ),
    ]
    path = tmp_path / "judge_run.ipynb"
    nbformat.write(nb, path)
    server.outage = 503
    with pytest.raises(NotebookFailed) as info:
        run_notebook(path, {"url": server.url}, out_dir=tmp_path / "run", timeout=120)
    result = info.value.result
    assert result.status == "failed" and result.cell == 2
    assert "JudgeFailedError" in result.error and "failed on" in result.error and "HTTP 503" in result.error


# -- hangs, timeouts, malformed replies, NaN ----------------------------------------------------------------


def test_request_timeout_option_bounds_a_hung_request(server, tmp_path, monkeypatch, capsys):
    """Observation: a hung request cost a fixed 60 s."""
    judge = make_judge(server.url, tmp_path, timeout=0.3, max_attempts=1, max_missing=1.0, mode="logprobs")
    t0 = time.monotonic()
    [j] = judge.score("aligned", [("q", "[timeoutx9]")])
    assert time.monotonic() - t0 < 3 and j.reason == "gave up after 1 attempts: timed out after 0.3 s"
    monkeypatch.setenv("EMLAB_JUDGE_TIMEOUT", "0.4")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        make_judge(server.url, tmp_path, timeout=0)
    assert OpenAIJudge("m", base_url=server.url, prompts=PROMPTS, cache=False).timeout == 0.4
    src, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write_rows(src, ["[timeoutx9]"] * 3)
    t0 = time.monotonic()
    assert run_cli(cli_args(src, out, server.url, tmp_path / "c.sqlite", "--timeout", "0.3")) == 1
    assert time.monotonic() - t0 < 4  # 1 request x 2 attempts x 0.3 s, not 3 x 2 x 5 s of hanging
    assert "timed out after 0.3 s" in capsys.readouterr().err


def test_hung_endpoint_stops_early_instead_of_waiting_for_every_answer(server, tmp_path):
    pairs = [(f"q{i}", f"[timeoutx9][score={i}]") for i in range(40)]
    judge = make_judge(server.url, tmp_path, timeout=0.2, max_attempts=1, concurrency=2, mode="logprobs")
    t0 = time.monotonic()
    with pytest.raises(JudgeFailedError, match="stopped early") as info:
        judge.score("aligned", pairs)
    assert time.monotonic() - t0 < 4  # 5 failures (over 10% of 40) at 2 in flight, not 40 x 0.2 s
    assert sum(j.reason.startswith("not judged") for j in info.value.judgments) >= 30
    assert all(j.retry for j in info.value.judgments if j.score is None)  # a later run may get them


def test_malformed_replies_are_retried_then_fail(server, tmp_path):
    judge = make_judge(server.url, tmp_path, mode="logprobs", max_missing=0.5)
    out = judge.score("aligned", [("a", "[badjsonx1][score=40]"), ("b", "[badjsonx9]"), ("c", "[dropx1][score=60]")])
    assert out[0].score is not None and out[2].score is not None
    assert out[1].score is None and out[1].reason.startswith("gave up after 2 attempts: malformed response")
    assert out[1].retry and not out[0].retry and not out[2].retry
    assert judge.usage.failed == 1


def test_nan_logprobs_are_retried_counted_and_never_silently_dropped(server, tmp_path):
    """Observation: a NaN top logprob was dropped without a word."""
    judge = make_judge(server.url, tmp_path, mode="logprobs", max_missing=0.5)
    once, always = judge.score("aligned", [("a", "[nanx1][score=80]"), ("b", "[nanx9][score=80]")])
    assert once.score == pytest.approx(80.0, abs=1.0) and once.reason is None
    assert always.score is None and "NaN log-probability for token(s) ['80']" in always.reason
    assert judge.usage.nan_logprobs == 3 and judge.usage.failed == 1  # 1 + 2 attempts
    assert "3 responses with NaN logprobs" in str(judge.usage)


# -- the cache key ------------------------------------------------------------------------------------------


def test_same_model_name_on_another_endpoint_is_not_served_from_the_cache(tmp_path):
    """Observation: the judge cache key omitted the endpoint."""
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        pairs = [("q", "[score=30]")]
        first = make_judge(a.url, tmp_path, mode="logprobs").score("aligned", pairs)
        again = make_judge(a.url, tmp_path, mode="logprobs").score("aligned", pairs)
        assert a.requests == 1 and again == first
        make_judge(b.url, tmp_path, mode="logprobs").score("aligned", pairs)
        assert b.requests == 1
