"""What judging costs: list prices, the estimate before a job and the running totals of a judge.

Used by :class:`~emlab.judge.llm.OpenAIJudge` (which re-exports every name here) and the Batch API
calls (:mod:`emlab.judge.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BATCH_DISCOUNT", "PRICES_AS_OF", "PRICES_PER_MTOK", "CostEstimate", "JudgeUsage", "estimate_cost"]

#: USD per million (input, output) tokens: OpenAI's list prices as of :data:`PRICES_AS_OF`. Estimates
#: only: Azure and cached-input prices differ, and a self-hosted server costs what its GPU costs.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}
#: When :data:`PRICES_PER_MTOK` was checked (OpenAI's pricing page as summarised in March 2026).
PRICES_AS_OF = "2026-03"
#: The Batch API bills half the list price, input and output.
BATCH_DISCOUNT = 0.5


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float | None:
    """Estimated USD cost from :data:`PRICES_PER_MTOK` (longest matching model-name prefix).

    ``batch=True`` applies the Batch API's discount (:data:`BATCH_DISCOUNT`).

    >>> round(estimate_cost("gpt-4o-mini-2024-07-18", 1_000_000, 0), 2)
    0.15
    >>> round(estimate_cost("gpt-4o", 1_000_000, 1_000_000, batch=True), 2)
    6.25
    >>> estimate_cost("my-vllm-model", 10, 1) is None
    True
    """
    matches = [k for k in PRICES_PER_MTOK if model.startswith(k)]
    if not matches:
        return None
    price_in, price_out = PRICES_PER_MTOK[max(matches, key=len)]
    cost = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
    return cost * BATCH_DISCOUNT if batch else cost


@dataclass
class JudgeUsage:
    """Running totals for one judge: requests, cache hits, failures, tokens and estimated cost.

    ``failed``: judgments the endpoint never gave (gave up, rejected, no logprobs); ``no_score``: the
    judge answered but not with a number (REFUSAL, CODE); ``nan_logprobs``: responses carrying a NaN
    log-probability (each one is retried, then counted as a failure).

    >>> JudgeUsage("gpt-4o-mini", prompt_tokens=2_000_000).cost_usd
    0.3
    """

    model: str
    judged: int = 0
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed: int = 0
    no_score: int = 0
    nan_logprobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_requests: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0

    @property
    def cost_usd(self) -> float | None:
        """Estimated cost of the tokens used so far (None for models without a known price)."""
        now = estimate_cost(self.model, self.prompt_tokens, self.completion_tokens)
        batch = estimate_cost(self.model, self.batch_prompt_tokens, self.batch_completion_tokens, batch=True)
        return None if now is None or batch is None else now + batch

    def __str__(self) -> str:
        cost = self.cost_usd
        money = f"~${cost:.5f}" if cost is not None else "cost unknown"
        tokens_in = self.prompt_tokens + self.batch_prompt_tokens
        tokens_out = self.completion_tokens + self.batch_completion_tokens
        extra = f", {self.no_score} not a number" if self.no_score else ""
        extra += f", {self.nan_logprobs} responses with NaN logprobs" if self.nan_logprobs else ""
        extra += f", {self.batch_requests} through the Batch API" if self.batch_requests else ""
        return (
            f"{self.judged} judged ({self.calls} calls, {self.cache_hits} cache hits, {self.failed} failed{extra}); "
            f"{tokens_in}+{tokens_out} tokens, {money}"
        )


@dataclass(frozen=True)
class CostEstimate:
    """What a judging job will cost before it runs: requests and tokens still to pay for.

    Prompt tokens are estimated at 4 characters a token plus 8 per chat message (no tokenizer
    download needed); completion tokens are 1 per request (logprobs) or ``sample_tokens`` (sampled).

    >>> print(CostEstimate("gpt-4o-mini", "aligned", 1000, 10, 300_000, 1000, batch=False))
    judge gpt-4o-mini, aligned: 1,000 requests (10 answers cached), ~300,000 prompt + ~1,000 completion tokens, ~$0.0456 (~$0.0228 with the Batch API; USD list prices of 2026-03: $0.15 / $0.60 per M tokens in / out)
    """

    model: str
    metric: str
    requests: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    batch: bool = False

    @property
    def usd(self) -> float | None:
        """Estimated cost at list price (None for models without a known price)."""
        return estimate_cost(self.model, self.prompt_tokens, self.completion_tokens)

    @property
    def usd_batch(self) -> float | None:
        """Estimated cost through the Batch API."""
        return estimate_cost(self.model, self.prompt_tokens, self.completion_tokens, batch=True)

    def __str__(self) -> str:
        head = (
            f"judge {self.model}, {self.metric}: {self.requests:,} requests ({self.cached:,} answers cached), "
            f"~{self.prompt_tokens:,} prompt + ~{self.completion_tokens:,} completion tokens"
        )
        if self.usd is None:
            return head + f", cost unknown (no list price for {self.model!r}; self-hosted servers cost their GPU time)"
        matches = [k for k in PRICES_PER_MTOK if self.model.startswith(k)]
        p_in, p_out = PRICES_PER_MTOK[max(matches, key=len)]
        first, second = (self.usd_batch, self.usd) if self.batch else (self.usd, self.usd_batch)
        other = "without" if self.batch else "with"
        return (
            head + f", ~{_usd(first)} (~{_usd(second)} {other} the Batch API; USD list prices of {PRICES_AS_OF}: "
            f"${p_in:.2f} / ${p_out:.2f} per M tokens in / out)"
        )


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.1 else f"${x:.4f}"
