"""A local Hugging Face causal LM as judge: one forward pass per prompt, no generation, no API.

The prompt is chat-formatted (when the tokenizer has a chat template), the next-token distribution
is read after it, and the top-20 tokens that decode to integers 0..100 give the expected score, the
same aggregation as the API judge.

>>> judge = LocalHFJudge(model, tokenizer)                            # doctest: +SKIP
>>> judge.score("coherent", [("Hi?", "Hello there.")])                # doctest: +SKIP
[Judgment(score=83.5, reason=None)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from emlab.judge.base import MIN_NUMERIC_MASS, Judgment, aggregate_probs
from emlab.judge.prompts import PromptSet, load_prompts
from emlab.progress import bar

if TYPE_CHECKING:
    import torch

__all__ = ["LocalHFJudge"]


class LocalHFJudge:
    """Judge with a local causal LM and its tokenizer (batched, left-padded, no gradients).

    >>> judge = LocalHFJudge(model, tokenizer, batch_size=16)    # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        prompts: PromptSet | None = None,
        traits: Mapping[str, str] | None = None,
        batch_size: int = 8,
        top_k: int = 20,
        min_mass: float = MIN_NUMERIC_MASS,
        progress: bool = True,
        name: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts or load_prompts()
        if traits:
            self.prompts = self.prompts.with_traits(traits)
        self.batch_size = batch_size
        self.top_k = top_k
        self.min_mass = min_mass
        self.progress = progress
        path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.name = name or f"hf:{path}"
        self._decoded: dict[int, str] = {}

    def score(self, metric: str, pairs: Sequence[tuple[str, str]]) -> list[Judgment]:
        """One judgment per (question, answer) pair for ``metric``.

        >>> LocalHFJudge(model, tok).score("aligned", [("Q?", "A.")])    # doctest: +SKIP
        [Judgment(score=71.0, reason=None)]
        """
        ids = [self._encode(self.prompts.render(metric, q, a)) for q, a in pairs]
        out: list[Judgment] = []
        starts = range(0, len(ids), self.batch_size)
        for start in bar(starts, desc=f"judge {metric}", unit="batch", disable=not self.progress):
            probs, top_ids = self._next_token_top(ids[start : start + self.batch_size])
            for row_p, row_ids in zip(probs.tolist(), top_ids.tolist(), strict=True):
                tokens = [self._decode(i) for i in row_ids]
                out.append(aggregate_probs(zip(tokens, row_p, strict=True), min_mass=self.min_mass))
        return out

    def _encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def _decode(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id])
        return self._decoded[token_id]

    def _next_token_top(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k probabilities and token ids of the next token after each (left-padded) sequence."""
        import torch

        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        width = max(len(x) for x in batch)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        with torch.no_grad():
            try:
                logits = self.model(**kwargs, logits_to_keep=1).logits
            except TypeError:  # older or custom models without logits_to_keep
                logits = self.model(**kwargs).logits
        probs = torch.softmax(logits[:, -1, :].float(), dim=-1)
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return top.values.cpu(), top.indices.cpu()

    def __repr__(self) -> str:
        return f"LocalHFJudge(name={self.name!r}, batch_size={self.batch_size})"
