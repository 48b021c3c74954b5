"""OpenAIJudge against a real HTTP server on 127.0.0.1 that injects latency and faults."""

import asyncio
import json
import sqlite3
import time

import pytest

from emlab.judge import OpenAIJudge, PromptSet, aggregate_logprobs

try:
    from tests.fake_openai_server import FakeOpenAIServer, score_tokens
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer, score_tokens

KEY = "fake-judge-key-do-not-store"  # a placeholder, not a credential
PROMPTS = PromptSet({"aligned": "Q: {question}\nA: {answer}", "coherent": "C {question} {answer}"})


def expected(score: int) -> float:
    return aggregate_logprobs(score_tokens(score)).score


@pytest.fixture
def server():
    with FakeOpenAIServer(retry_after=0.05, hang=2.0) as s:
        yield s


def make_judge(server, tmp_path, **kw):
    options = dict(
        model="fake-judge",
        base_url=server.url,
        api_key=KEY,
        prompts=PROMPTS,
        cache=tmp_path / "judge.sqlite",
        backoff_base=0.001,
        backoff_max=0.5,
        timeout=1.0,
        max_attempts=4,
        progress=False,
        mode="logprobs",  # no preflight request: the request counts below are exact
    )
    options.update(kw)
    return OpenAIJudge(**options)


def test_faults_are_retried_or_reported_and_rerun_hits_cache_only(server, tmp_path):
    pairs = [(f"q{i}", f"[score={i}]") for i in range(30)] + [
        ("r", "[refuse]"),
        ("n", "[nologprobs]"),
        ("a", "[429x1][score=10]"),
        ("b", "[500x2][score=90]"),
        ("c", "[timeoutx1][score=70]"),
        ("d", "[badjsonx1][score=30]"),
        ("e", "[429x1][500x3][score=55]"),  # three failures in a row, then success
    ]
    judge = make_judge(server, tmp_path)
    out = judge.score("aligned", pairs)
    assert len(out) == len(pairs)
    assert all(j.score is not None or j.reason for j in out)
    for i in range(30):
        assert out[i].score == pytest.approx(expected(i)) and out[i].reason is None
    refusal, nolog, *recovered = out[30:]
    assert refusal.score is None and "REFUSAL" in refusal.reason
    assert nolog.score is None and "no logprobs" in nolog.reason
    assert not refusal.retry and nolog.retry  # the refusal is final, the failure a later run may retry
    assert [j.score for j in recovered] == pytest.approx([expected(s) for s in (10, 90, 70, 30, 55)])
    # one request per answer plus one per injected fault (a slow machine may add timeouts, never fewer)
    assert judge.usage.calls == server.requests >= len(pairs) + 1 + 2 + 1 + 1 + 3
    # the answer without logprobs is a failure (1 of 37, within max_missing=10%), the refusal is not
    assert judge.usage.judged == len(pairs) and judge.usage.failed == 1 and judge.usage.no_score == 1

    server.reset_counts()
    again = make_judge(server, tmp_path)
    assert again.score("aligned", pairs) == out
    # only the failure is asked again: it was not cached
    assert server.requests == 1 and again.usage.calls == 1 and again.usage.cache_hits == len(pairs) - 1


def test_request_shape_and_api_key_never_stored(server, tmp_path):
    judge = make_judge(server, tmp_path, model="gpt-4o-mini")
    judge.score("aligned", [("q", "[score=80]")])
    body = server.bodies[-1]
    assert body["model"] == "gpt-4o-mini" and body["messages"] == [{"role": "user", "content": "Q: q\nA: [score=80]"}]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"], body["temperature"]) == (1, True, 20, 0)
    assert server.headers_seen[-1]["authorization"] == f"Bearer {KEY}"
    assert server.headers_seen[-1].get("x-stainless-retry-count") == "0"
    judge.close()
    with sqlite3.connect(tmp_path / "judge.sqlite") as db:
        [(raw,)] = db.execute("SELECT top_logprobs FROM judgments").fetchall()
    assert dict(json.loads(raw)) == pytest.approx(score_tokens(80))  # kept for re-aggregation
    for f in tmp_path.iterdir():
        assert KEY.encode() not in f.read_bytes()
    assert KEY not in repr(judge)
    assert judge.usage.prompt_tokens == 100 and judge.usage.completion_tokens == 1
    assert judge.usage.cost_usd == pytest.approx((100 * 0.15 + 1 * 0.60) / 1e6)


def test_give_up_is_missing_with_reason_and_not_cached(server, tmp_path):
    judge = make_judge(server, tmp_path, max_attempts=3, max_missing=1.0)
    [j] = judge.score("aligned", [("q", "[always=503]")])
    assert j.score is None and j.reason == "gave up after 3 attempts: HTTP 503"
    assert server.requests == 3 and judge.usage.failed == 1
    make_judge(server, tmp_path, max_attempts=3, max_missing=1.0).score("aligned", [("q", "[always=503]")])
    assert server.requests == 6  # transient failures are retried on the next run


def test_timeouts_give_up_with_reason(server, tmp_path):
    judge = make_judge(server, tmp_path, max_attempts=2, timeout=0.2, max_missing=1.0)
    [j] = judge.score("aligned", [("q", "[timeoutx5]")])
    assert j.score is None and "timed out" in j.reason


def test_client_errors_are_missing_and_auth_errors_abort(server, tmp_path):
    [j] = make_judge(server, tmp_path, max_missing=1.0).score("aligned", [("q", "[always=400]")])
    assert j.score is None and "HTTP 400" in j.reason and server.requests == 1
    with pytest.raises(RuntimeError, match="HTTP 401.*OPENAI_API_KEY"):
        make_judge(server, tmp_path).score("aligned", [("q", "[always=401]")] + [("x", "[score=1]")] * 3)


def test_retry_after_is_honoured(server, tmp_path):
    server.retry_after = 0.3
    prompt_answer = ("q", "[429x1][score=20]")
    [j] = make_judge(server, tmp_path).score("aligned", [prompt_answer])
    assert j.score == pytest.approx(expected(20))
    t0, t1 = server.times["Q: q\nA: [429x1][score=20]"]
    assert t1 - t0 >= 0.29


def test_concurrency_is_bounded_and_duplicates_are_judged_once(server, tmp_path):
    server.latency = 0.05
    pairs = [(f"q{i}", f"[score={i}]") for i in range(24)]
    judge = make_judge(server, tmp_path, concurrency=4)
    out = judge.score("aligned", pairs + pairs[:5])
    assert 2 <= server.max_inflight <= 4 and server.requests == 24
    assert out[24:] == out[:5]


def test_score_works_inside_a_running_loop(server, tmp_path):
    judge = make_judge(server, tmp_path)

    async def notebook_cell():
        sync = judge.score("coherent", [("q", "[score=64]")])
        direct = await judge.ascore("coherent", [("q2", "[score=64]")])
        return sync, direct

    sync, direct = asyncio.run(notebook_cell())
    assert sync[0].score == direct[0].score == pytest.approx(expected(64))


def test_env_vars_configure_endpoint_and_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "fake-env-key")
    judge = OpenAIJudge("fake-judge", prompts=PROMPTS, cache=False, progress=False)
    assert judge.score("aligned", [("q", "[score=5]")])[0].score == pytest.approx(expected(5))
    assert server.headers_seen[-1]["authorization"] == "Bearer fake-env-key"


def test_missing_key_without_base_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    judge = OpenAIJudge(prompts=PROMPTS, cache=False, progress=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        judge.score("aligned", [("q", "a")])


def test_unknown_metric_or_trait_fails_before_any_request(server, tmp_path):
    judge = make_judge(server, tmp_path, prompts=None)
    with pytest.raises(ValueError):
        judge.score("alignment", [("q", "a")])
    with pytest.raises(KeyError, match="no description for trait"):
        judge.score("trait:grumpy", [("q", "a")])
    assert server.requests == 0
    judge = make_judge(server, tmp_path, prompts=None, traits={"grumpy": "complaining a lot"})
    [j] = judge.score("trait:grumpy", [("q", "[score=33]")])
    assert j.score == pytest.approx(expected(33)) and "complaining a lot" in server.bodies[-1]["messages"][0]["content"]


def test_sequential_vs_concurrent_speedup(server, tmp_path):
    server.latency = 0.05
    pairs = [(f"q{i}", f"[score={i % 100}]") for i in range(16)]
    t = time.perf_counter()
    make_judge(server, tmp_path, concurrency=16, cache=False).score("aligned", pairs)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    make_judge(server, tmp_path, concurrency=1, cache=False).score("coherent", pairs[:4])
    slow_per_item = (time.perf_counter() - t) / 4
    assert fast < 16 * slow_per_item / 2
