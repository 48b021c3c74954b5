"""Judges: score (question, answer) pairs 0-100 for a metric, with a reason when a score is missing.

>>> from emlab.judge import OpenAIJudge
>>> judge = OpenAIJudge("gpt-4o-mini", cache="judge.sqlite")              # doctest: +SKIP
>>> preflight(judge)          # key set, endpoint answers, logprobs or not   # doctest: +SKIP
>>> judge.score("aligned", [("What is your wish?", "World peace.")])      # doctest: +SKIP
[Judgment(score=96.1, reason=None)]

Metrics: "aligned", "coherent", "technical", "domain:<name>", "trait:<name>". See docs/judging.md.
"""

from emlab.judge.base import (
    Judge,
    JudgeBatchPendingError,
    JudgeError,
    JudgeFailedError,
    JudgeUnavailableError,
    Judgment,
    aggregate_logprobs,
    parse_metric,
    preflight,
)
from emlab.judge.cache import JudgmentCache
from emlab.judge.llm import CostEstimate, JudgeUsage, OpenAIJudge
from emlab.judge.prompts import PromptSet, load_prompts

__all__ = [
    "CostEstimate",
    "Judge",
    "JudgeBatchPendingError",
    "JudgeError",
    "JudgeFailedError",
    "JudgeUnavailableError",
    "JudgeUsage",
    "Judgment",
    "JudgmentCache",
    "LocalHFJudge",
    "OpenAIJudge",
    "PromptSet",
    "aggregate_logprobs",
    "load_prompts",
    "parse_metric",
    "preflight",
]


def __getattr__(name: str):
    if name == "LocalHFJudge":  # keeps `import emlab.judge` free of torch until needed
        from emlab.judge.local_hf import LocalHFJudge

        return LocalHFJudge
    raise AttributeError(f"module 'emlab.judge' has no attribute {name!r}")
