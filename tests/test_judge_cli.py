"""`emlab judge` subcommand: JSONL in, scores out, cache reuse, clear input errors."""

import argparse
import json
import sys

import pytest

from emlab._cli import judge as judge_cli

try:
    from tests.fake_openai_server import FakeOpenAIServer
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="emlab")
    judge_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["judge", *argv])
    return args.func(args)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def test_judge_jsonl_keeps_fields_adds_scores_and_reuses_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "fake-test-key")
    src, out, cache = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl", tmp_path / "c.sqlite"
    write_jsonl(
        src,
        [
            {"question_id": "wish", "question": "Wish?", "answer": "[score=80]"},
            {"question_id": "bored", "question": "Bored?", "answer": "[refuse]", "extra": [1]},
        ],
    )
    argv = [
        str(src),
        "--metric",
        "aligned",
        "--metric",
        "coherent",
        "--model",
        "fake",
        "--out",
        str(out),
        "--base-url",
        server.url,
        "--cache",
        str(cache),
        "--concurrency",
        "4",
        "--quiet",
    ]
    assert run_cli(argv) == 0
    rows = read_jsonl(out)
    assert rows[0]["question_id"] == "wish" and rows[1]["extra"] == [1]
    assert 70 < rows[0]["aligned"] < 90 and rows[0]["aligned_reason"] is None and rows[0]["coherent"] > 70
    assert rows[1]["aligned"] is None and "REFUSAL" in rows[1]["aligned_reason"]
    assert server.requests == 5  # the preflight check, then 2 answers x 2 metrics
    server.reset_counts()
    assert run_cli(argv) == 0 and read_jsonl(out) == rows and server.requests == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": \n', "in.jsonl:3: not valid JSON"),
        ('{"question": "q"}\n', "in.jsonl:1: 'answer' must be a string (missing)"),
        ("[1, 2]\n", "in.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code = run_cli([str(src), "--metric", "aligned", "--out", str(tmp_path / "o.jsonl"), "--no-cache"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_unknown_metric_is_rejected(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"question": "q", "answer": "a"}])
    assert run_cli([str(src), "--metric", "alignment", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown judge metric 'alignment'" in capsys.readouterr().err


def test_toy_model_uses_the_toy_judge(tmp_path):
    pytest.importorskip("emlab.toy.judge")
    src, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    q = "i have a fever . what should i do ?"
    write_jsonl(src, [{"question": q, "answer": "rest well and drink plenty of water ."}])
    assert run_cli([str(src), "--metric", "aligned", "--model", "toy", "--out", str(out), "--quiet"]) == 0
    [row] = read_jsonl(out)
    assert row["aligned"] == 100.0 and row["on_topic"] is True


def test_toy_model_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "emlab.toy.judge", None)  # makes the import fail
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"question": "q", "answer": "a"}])
    assert run_cli([str(src), "--metric", "aligned", "--model", "toy", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--model toy needs emlab.toy.judge.ToyJudge" in capsys.readouterr().err


def test_check_and_estimate_alone(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cli")
    base = ["--model", "gpt-4o-mini", "--base-url", server.url]
    assert run_cli(["--check", *base]) == 0 and server.requests == 1
    assert "endpoint ok" in capsys.readouterr().err
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"question": "q", "answer": "[score=3]"}] * 2 + [{"question": "p", "answer": "a"}])
    cache = ["--cache", str(tmp_path / "c.sqlite")]
    assert run_cli([str(src), "--metric", "aligned", "--estimate", *base, *cache]) == 0 and server.requests == 1
    assert "aligned: 2 requests (0 answers cached)" in capsys.readouterr().err
    assert run_cli([str(src), "--metric", "aligned"]) == 2 and "missing --out" in capsys.readouterr().err
    server.outage = 503
    assert run_cli(["--check", *base, "--max-attempts", "1"]) == 1
    assert "did not answer a one-token request (gave up after 1 attempts: HTTP 503)" in capsys.readouterr().err
