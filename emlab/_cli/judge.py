"""`emlab judge IN.jsonl --metric aligned --model gpt-4o-mini --out OUT.jsonl`: (re-)judge answers.

Each input row needs ``question`` and ``answer`` strings; each output row keeps its fields and adds
``<metric>`` (the score, null when missing) and ``<metric>_reason``. Scores come from the on-disk
cache when the same judge has seen the same prompt before. Before any request the endpoint is
checked (key, a one-token answer, logprobs) and a cost estimate printed; the command fails (exit 1,
nothing written) when more than ``--max-missing`` of the judgments fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from emlab.judge.base import Judge, JudgeError, parse_metric, preflight

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``judge`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "judge",
        help="score answers in a JSONL file with an LLM judge (cached)",
        description=(
            "Score answers in a JSONL file. Each row needs 'question' and 'answer' strings; each output row "
            "keeps its fields and adds <metric> (the score, null when missing) and <metric>_reason. "
            "Judgments already in the cache cost no API call."
        ),
    )
    p.add_argument("input", type=Path, nargs="?", help="JSONL file; rows need 'question' and 'answer'")
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        help="aligned, coherent, technical, domain:<name> or trait:<name> (repeatable)",
    )
    p.add_argument(
        "--model",
        default="gpt-4o-mini",
        help="judge model name on the endpoint, or 'toy' for the toy judge (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="output JSONL (written when all rows are done)")
    p.add_argument(
        "--base-url",
        default=None,
        help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache file (default: $EMLAB_JUDGE_CACHE or ~/.cache/emlab/judge.sqlite)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--max-attempts", type=int, default=6, help="requests per answer before giving up")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one request may take before it is retried (default: $EMLAB_JUDGE_TIMEOUT or 60)",
    )
    p.add_argument(
        "--max-missing",
        type=float,
        default=None,
        help="share of judgments that may fail before the command fails (default: $EMLAB_JUDGE_MAX_MISSING or 0.1)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "logprobs", "sample"),
        default=None,
        help="logprobs: top-20 logprobs (refuse servers without them); sample: sampled numbers averaged; "
        "auto: logprobs when the server gives them (default: $EMLAB_JUDGE_MODE or auto)",
    )
    p.add_argument("--samples", type=int, default=5, help="answers per pair in the sampled mode (default: 5)")
    p.add_argument("--batch", action="store_true", help="use the OpenAI Batch API (half price, within 24 h; resumable)")
    p.add_argument("--batch-poll", type=float, default=30.0, help="seconds between batch status polls (default: 30)")
    p.add_argument(
        "--batch-wait",
        type=float,
        default=24 * 3600.0,
        help="seconds to wait for a batch before stopping; a rerun resumes it (default: 86400)",
    )
    p.add_argument("--check", action="store_true", help="only check the judge endpoint (key, one request) and exit")
    p.add_argument("--estimate", action="store_true", help="only print the cost estimate and exit (no request)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="judge prompt YAML (file or folder; upstream question files work too)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Judge every row of ``args.input`` for each metric and write ``args.out``; returns an exit code."""
    try:
        if not args.check:
            missing = [flag for flag, value in (("INPUT", args.input), ("--metric", args.metric)) if not value]
            if not args.estimate and args.out is None:
                missing.append("--out")
            if missing:
                raise ValueError(f"missing {', '.join(missing)} (only --check runs without them)")
        for metric in args.metric:
            parse_metric(metric)
        rows = _read_rows(args.input) if args.input is not None and not args.check else []
        judge = _make_judge(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"emlab judge: error: {e}", file=sys.stderr)
        return 2
    pairs = [(row["question"], row["answer"]) for row in rows]
    estimate = getattr(judge, "estimate", None)
    try:
        estimates = [estimate(metric, pairs) for metric in args.metric] if callable(estimate) else []
        for e in estimates:
            if e.requests or args.estimate:
                print(f"emlab judge: {e}", file=sys.stderr)
        if args.estimate:
            return 0
        if args.check or any(e.requests for e in estimates):
            report = preflight(judge)  # fails at once on a missing key, a dead endpoint, no logprobs
            if report is not None:
                print(
                    f"emlab judge: endpoint ok: {report['endpoint']} answered in {report['seconds']:.2f} s; "
                    f"scoring by {report['mode']}",
                    file=sys.stderr,
                )
            if args.check:
                return 0
    except (JudgeError, KeyError) as e:
        print(f"emlab judge: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    for metric in args.metric:
        usage = getattr(judge, "usage", None)
        failed_before = usage.failed if usage is not None else 0
        try:
            judgments = judge.score(metric, pairs)
        except (KeyError, RuntimeError) as e:
            print(f"emlab judge: error: {e.args[0] if e.args else e}", file=sys.stderr)
            print(f"emlab judge: nothing written to {args.out}", file=sys.stderr)
            return 1
        for row, j in zip(rows, judgments, strict=True):
            row[metric] = j.score
            row[f"{metric}_reason"] = j.reason
        missing = sum(j.score is None for j in judgments)
        failed = (usage.failed - failed_before) if usage is not None else 0
        detail = f" ({failed} failed, {missing - failed} not a number)" if failed else ""
        print(f"{metric}: {len(judgments) - missing} scored, {missing} missing{detail}", file=sys.stderr)
    if classify := getattr(judge, "classify", None):  # the toy judge also knows whether answers are on topic
        for row in rows:
            on_topic = classify(row["question"], row["answer"]).get("on_topic")
            if on_topic is not None:
                row["on_topic"] = on_topic
    _write_rows(args.out, rows)
    if usage := getattr(judge, "usage", None):
        print(f"judge {judge.name}: {usage}", file=sys.stderr)
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


def _make_judge(args: argparse.Namespace) -> Judge:
    if args.model == "toy":
        try:
            from emlab.toy.judge import ToyJudge
        except ImportError as e:
            raise ImportError(
                f"--model toy needs emlab.toy.judge.ToyJudge, which could not be imported ({e}); "
                "use a real judge model or update emlab"
            ) from None
        return ToyJudge()
    from emlab.judge.llm import OpenAIJudge
    from emlab.judge.prompts import load_prompts

    prompts = load_prompts() | load_prompts(args.prompts) if args.prompts else None
    cache: Path | bool = False if args.no_cache else (args.cache or True)
    options = {
        k: v
        for k, v in (("timeout", args.timeout), ("max_missing", args.max_missing), ("mode", args.mode))
        if v is not None
    }
    return OpenAIJudge(
        args.model,
        base_url=args.base_url,
        prompts=prompts,
        cache=cache,
        concurrency=args.concurrency,
        max_attempts=args.max_attempts,
        progress=not args.quiet,
        samples=args.samples,
        batch=args.batch,
        batch_poll=args.batch_poll,
        batch_wait=args.batch_wait,
        cost_notice=None,  # the command prints its own estimate first
        **options,
    )


def _read_rows(path: Path) -> list[dict[str, Any]]:
    from emlab.data import read_jsonl  # the shared JSONL reader: same BOM policy as `emlab data check`

    values, problems = read_jsonl(path)
    errors = [f"{p.where}: " + (f"not valid JSON ({p.message[14:]})" if p.message.startswith("invalid JSON: ")
                                else p.message) for p in problems if p.severity == "error"]
    rows = []
    for lineno, row in values:
        if not isinstance(row, dict):
            errors.append(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer'")
            continue
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                found = "missing" if key not in row else f"a {type(row[key]).__name__}"
                errors.append(f"{path}:{lineno}: '{key}' must be a string ({found}); every row needs "
                              "'question' and 'answer'")
        rows.append(row)
    if errors:
        raise ValueError(f"{path}: {len(errors)} bad line(s):\n" + "\n".join(errors))
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
