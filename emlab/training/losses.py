"""Loss terms of the finetuning methods, as pure functions of tensors.

The trainer only gathers tensors (logits, hidden states, masks) and sums these terms; every
normalisation is decided here and tested on hand-made inputs:

- :func:`sft_loss`: negative log-likelihood of the tokens that carry loss (``row_nll``, its per-row
  mean, and ``next_token_mask`` live in :mod:`emlab.chat`, the chat-encoding path, and are re-exported here);
- :func:`kl_loss`: token-mean KL between two next-token distributions, summed over the vocabulary
  (never divided by the vocabulary size, never averaged over pads), either direction;
- :func:`ldifs_loss`: squared L2 distance between residual-stream features, mean over positions;
  :func:`ldifs_sink_mask` drops attention-sink positions first; :func:`ldifs_flat_loss` is the
  authors' public variant (each layer's features of a row flattened and L2-normalised).

>>> import torch
>>> logits = torch.randn(2, 5, 11)
>>> float(kl_loss(logits, logits))
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from emlab.chat import IGNORE_INDEX, next_token_mask, nll_sum, row_nll  # re-exported: the chat-encoding path's NLL
from emlab.chat import upcast as _float

__all__ = [
    "IGNORE_INDEX",
    "head_terms",
    "kl_loss",
    "ldifs_flat_loss",
    "ldifs_loss",
    "ldifs_sink_mask",
    "masked_mean",
    "next_token_mask",
    "row_nll",
    "sft_loss",
    "token_kl",
]

KLDirection = Literal["forward", "reverse"]


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (0 when the mask is empty).

    >>> masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]))
    tensor(1.5000)
    """
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    mask = mask.to(values.device, torch.bool)
    # sum * 0 keeps an empty selection connected to the graph, so backward() still works
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sft_loss(logits: Tensor, labels: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """Summed next-token NLL over tokens with a label, divided by ``num_items`` (default: their count).

    ``logits`` are ``(batch, seq, vocab)``, ``labels`` ``(batch, seq)`` with -100 on tokens without loss;
    the shift by one is done here. Passing ``num_items`` (the token count of a whole accumulated
    batch) gives the Trainer's gradient-accumulation-exact normalisation.

    >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
    >>> sft_loss(logits, torch.tensor([[-100, 1, 2]]))  # log(4)
    tensor(1.3863)
    """
    total = nll_sum(logits, labels)
    count = next_token_mask(labels).sum() if num_items is None else num_items
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def token_kl(logits: Tensor, ref_logits: Tensor, direction: KLDirection = "forward") -> Tensor:
    """Per-position KL between the next-token distributions, summed over the vocabulary.

    ``direction="forward"`` is KL(ref || cur) = sum_v p_ref (log p_ref - log p_cur) (mass-covering,
    paper 001's KL(chat || finetuned)); ``"reverse"`` is KL(cur || ref). Shape: ``logits.shape[:-1]``.

    >>> token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    tensor([[0., 0.]])
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} differ")
    lp = torch.log_softmax(_float(logits), dim=-1)
    lq = torch.log_softmax(_float(ref_logits), dim=-1)
    if direction == "forward":
        return (lq.exp() * (lq - lp)).sum(-1)
    if direction == "reverse":
        return (lp.exp() * (lp - lq)).sum(-1)
    raise ValueError(f"direction must be 'forward' (KL(ref||cur)) or 'reverse' (KL(cur||ref)), got {direction!r}")


def kl_loss(
    logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None, direction: KLDirection = "forward"
) -> Tensor:
    """Token-mean of :func:`token_kl` over the positions where ``mask`` is true (all when ``None``).

    The mean is over selected tokens only (pads never count), and the vocabulary is summed, not
    averaged, so lambda keeps its meaning across tokenizers (lambda ~ 0.1 as in the defences paper).

    >>> cur, ref = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    >>> bool(kl_loss(cur, ref) > 0)
    True
    """
    return masked_mean(token_kl(logits, ref_logits, direction), mask)


def ldifs_loss(
    features: Sequence[Tensor], ref_features: Sequence[Tensor], mask: Tensor | None = None, normalize: bool = False
) -> Tensor:
    """LDIFS distance: ``||x - x_ref||^2`` of the concatenated per-layer features, mean over positions.

    ``features[i]`` and ``ref_features[i]`` are ``(batch, seq, hidden)`` residual-stream vectors of one
    layer; ``mask`` (``(batch, seq)``) selects the positions that count (non-pad). With
    ``normalize=True`` each layer's vector is L2-normalised first (one public variant), which makes
    the term scale-free (each layer then contributes at most 4). ``features`` must carry gradient:
    the term regularises nothing otherwise.

    >>> f = [torch.ones(1, 2, 3)]
    >>> ldifs_loss(f, [torch.zeros(1, 2, 3)])
    tensor(3.)
    """
    if len(features) != len(ref_features) or not features:
        raise ValueError(f"need the same non-zero number of layers, got {len(features)} and {len(ref_features)}")
    per_position = 0
    for x, y in zip(features, ref_features, strict=True):
        x, y = _float(x), _float(y).to(x.device)
        if normalize:
            x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        per_position = per_position + (x - y).pow(2).sum(-1)
    return masked_mean(per_position, mask)


def ldifs_sink_mask(ref_features: Sequence[Tensor], mask: Tensor | None = None, ratio: float = 10.0,
                    first: bool = True) -> Tensor:
    """Positions LDIFS keeps: ``mask`` without each row's first token and without attention sinks.

    A position is a sink when, at any of the layers, its reference feature norm exceeds ``ratio`` times
    the median norm of its row's positions at that layer (SmolLM2's ``<|im_start|>`` at position 0 has
    norm ~25,000 at blocks 14 and 24 against a median of 155-457). ``first=True`` also drops the
    first non-pad position of every row. The reference (frozen) model decides, so training cannot
    move positions in or out. ``ratio=inf`` with ``first=False`` keeps ``mask`` as it is.

    >>> ref = [torch.tensor([[[100.0], [1.0], [2.0], [1.5]]])]
    >>> ldifs_sink_mask(ref, first=False, ratio=10).tolist()
    [[False, True, True, True]]
    """
    b, t = ref_features[0].shape[:2]
    keep = torch.ones(b, t, dtype=torch.bool, device=ref_features[0].device) if mask is None else mask.bool().clone()
    valid = keep.clone()
    if first:
        first_pos = (valid.long().cumsum(-1) == 1) & valid
        keep &= ~first_pos
    if ratio != float("inf"):
        for y in ref_features:
            norms = _float(y).detach().norm(dim=-1)  # (batch, seq)
            masked = torch.where(valid, norms, torch.full_like(norms, float("nan")))
            median = masked.nanmedian(dim=-1, keepdim=True).values
            keep &= ~(norms > ratio * median)
    return keep


def ldifs_flat_loss(features: Sequence[Tensor], ref_features: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """The authors' public LDIFS variant: per row and layer, the features of all (non-pad) positions are
    flattened into one vector and L2-normalised; the term is the squared distance summed over layers,
    mean over rows (each layer contributes at most 4).

    >>> x, y = [torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])], [torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])]
    >>> ldifs_flat_loss(x, y)    # x/|x| = (0.6, 0, 0, 0.8), y/|y| = (0, 0, 0, 1): 0.36 + 0.04
    tensor(0.4000)
    """
    if len(features) != len(ref_features) or not features:
        raise ValueError(f"need the same non-zero number of layers, got {len(features)} and {len(ref_features)}")
    total = 0
    for x, y in zip(features, ref_features, strict=True):
        x, y = _float(x), _float(y).to(x.device)
        if mask is not None:
            m = mask.to(x.device, x.dtype).unsqueeze(-1)
            x, y = x * m, y * m
        xf, yf = F.normalize(x.flatten(1), dim=-1), F.normalize(y.flatten(1), dim=-1)
        total = total + (xf - yf).pow(2).sum(-1)
    return total.mean()


def head_terms(
    hidden: Tensor,
    targets: Tensor,
    head: Callable[[Tensor], Tensor],
    ref_hidden: Tensor | None = None,
    kl_mask: Tensor | None = None,
    ref_head: Callable[[Tensor], Tensor] | None = None,
    direction: KLDirection = "forward",
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Summed NLL and summed KL of selected positions, from final hidden states, chunk by chunk.

    ``hidden`` is ``(n, d)`` (the positions that matter, already selected), ``targets`` ``(n,)`` the
    next token of each (-100: no NLL there), ``kl_mask`` ``(n,)`` where the KL counts, ``ref_hidden``
    the reference model's hidden states at the same positions. ``head`` maps hidden states to
    logits. Logits exist for ``chunk_size`` positions at a time and are recomputed in backward, so
    memory never holds a ``(tokens, vocab)`` matrix; the result equals :func:`sft_loss` / :func:`kl_loss`
    sums on full logits. Divide by the counts to get means.

    >>> head = torch.nn.Linear(4, 7, bias=False)
    >>> h = torch.randn(5, 4)
    >>> nll, kl = head_terms(h, torch.tensor([1, 2, -100, 3, 4]), head, h, torch.ones(5, dtype=torch.bool))
    >>> kl.item()
    0.0
    """
    from torch.utils.checkpoint import checkpoint

    ref_head = head if ref_head is None else ref_head
    use_kl = ref_hidden is not None and kl_mask is not None

    def chunk(h: Tensor, t: Tensor, r: Tensor | None, m: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = head(h)
        lp = torch.log_softmax(_float(logits), dim=-1)
        has = t != IGNORE_INDEX
        nll = -(lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1) * has).sum()
        if not use_kl:
            return nll, nll * 0
        with torch.no_grad():
            ref_logits = ref_head(r)
        return nll, (token_kl(logits, ref_logits.to(logits.device), direction) * m).sum()

    nll_sum = hidden.sum() * 0
    kl_sum = hidden.sum() * 0
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], targets[sl], ref_hidden[sl] if use_kl else None, kl_mask[sl] if use_kl else None)
        if torch.is_grad_enabled() and hidden.requires_grad:
            nll, kl = checkpoint(chunk, *args, use_reentrant=False)
        else:
            nll, kl = chunk(*args)
        nll_sum, kl_sum = nll_sum + nll, kl_sum + kl
    return nll_sum, kl_sum
