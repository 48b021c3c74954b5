"""Persona features with sparse autoencoders (SAELens), on any model emlab's hooks can read.

No pretrained SAE exists for the toy, so one is trained on the chat model's residual stream:
activations are collected with :func:`emlab.hooks.record` (no TransformerLens model needed) and fed
to SAELens' own ``SAETrainer`` with one of its training SAE classes (TopK by default), offline.
Then :func:`latent_diff` ranks latents by how much more a misaligned finetune activates them than
the chat model on neutral prompts, :func:`latent_direction` turns a latent's decoder row into a
:class:`~emlab.directions.Direction` (cosine with the persona / misalignment directions, steering,
ablation), and :func:`sae_quality` reports reconstruction (fraction of variance explained) and L0.

Published SAEs of real models load with SAELens itself and work with the same functions::

    from sae_lens import SAE
    sae = SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    diff = latent_diff(sae, chat, finetuned, tok, prompts, layer=20)     # the model's block 20 output

>>> acts = collect_activations(model, tok, rows, layer=2)                 # doctest: +SKIP
>>> sae = train_sae(acts, d_sae=768, k=16)                                # doctest: +SKIP
>>> sae_quality(sae, acts)                                                # doctest: +SKIP
{'fve': 0.93, 'l0': 16.0, 'dead_fraction': 0.02, 'n': 20000}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from emlab.chat import eval_mode
from emlab.directions import Direction

__all__ = ["ARCHITECTURES", "collect_activations", "latent_diff", "latent_direction", "sae_quality", "train_sae"]

#: SAE architectures :func:`train_sae` builds (SAELens training classes).
ARCHITECTURES = ("topk", "standard")


def _encode(tokenizer, item: Any) -> list[int]:
    """Token ids of a chat row (``{"messages": [...]}``, rendered whole), a message list or a prompt string."""
    if isinstance(item, dict) and "messages" in item:
        messages, gen = item["messages"], False
    elif isinstance(item, str):
        messages, gen = [{"role": "user", "content": item}], True
    else:
        messages = list(item)
        gen = not messages or messages[-1].get("role") != "assistant"
    enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
    return list(enc["input_ids"])


@torch.no_grad()
def collect_activations(model, tokenizer, items: Sequence[Any], layer: int, *, skip_first: bool = True,
                        batch_size: int = 16, layer_path: str | None = None) -> Tensor:
    """Block ``layer``'s output at every non-pad token of ``items`` (chat rows, message lists or prompts): ``[N, d]``.

    ``skip_first`` drops position 0 of each sequence (the attention sink of real models carries
    activations far larger than the rest, which would dominate an SAE's reconstruction loss).
    fp32 on the CPU.

    >>> collect_activations(model, tok, ["hello"], layer=1).shape         # doctest: +SKIP
    torch.Size([7, 96])
    """
    from emlab.hooks import record

    if not items:
        raise ValueError("no items to collect activations from")
    encoded = [_encode(tokenizer, it) for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, x in enumerate(chunk):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, int(skip_first): len(x)] = True
            with record(model, [layer], layer_path) as acts:
                model(input_ids=ids.to(device), attention_mask=_attention(chunk, width).to(device), use_cache=False)
            out.append(acts[layer][0].float()[mask.to(device)].cpu())
    return torch.cat(out)


def _attention(chunk: list[list[int]], width: int) -> Tensor:
    attn = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, x in enumerate(chunk):
        attn[row, : len(x)] = 1
    return attn


def _batches(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """An endless stream of shuffled batches (SAELens' ``DataProvider``)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=g)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[start:start + batch_size]]


def train_sae(acts: Tensor, *, d_sae: int | None = None, architecture: str = "topk", k: int = 16,
              l1_coefficient: float = 5.0, epochs: float = 20.0, batch_size: int = 256, lr: float = 1e-3,
              seed: int = 0, progress: bool = False):
    """Train a SAELens SAE on activations ``acts`` (``[N, d]``) with SAELens' ``SAETrainer``; returns the SAE.

    ``architecture``: ``"topk"`` (``k`` latents active per token) or ``"standard"`` (ReLU with an
    L1 penalty ``l1_coefficient``). ``d_sae`` defaults to ``8 * d``. Inputs are scaled by SAELens'
    ``expected_average_only_in`` normalisation, folded into the weights at the end, so the SAE
    reads and writes raw activations.

    >>> sae = train_sae(torch.randn(4096, 32), d_sae=128, k=4, epochs=2)     # doctest: +SKIP
    """
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {architecture!r}")
    if acts.dim() != 2 or acts.shape[0] < batch_size:
        raise ValueError(f"acts must be [N, d] with N >= batch_size={batch_size}, got {tuple(acts.shape)}")
    acts = acts.detach().float().cpu().contiguous()
    d = acts.shape[1]
    d_sae = int(d_sae or 8 * d)
    torch.manual_seed(seed)
    common = {"d_in": d, "d_sae": d_sae, "normalize_activations": "expected_average_only_in", "device": "cpu"}
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=int(k), **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=float(l1_coefficient), **common))
    total = int(epochs * acts.shape[0])
    cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=batch_size, lr=lr, lr_end=lr / 10,
                           device="cpu",
                           n_batches_for_norm_estimate=max(1, min(100, acts.shape[0] // batch_size)),
                           logger=LoggingConfig(log_to_wandb=False), save_final_checkpoint=False, n_checkpoints=0)
    trainer = SAETrainer(cfg, sae, _batches(acts, batch_size, seed))
    if not progress:
        from functools import partialmethod

        from tqdm import tqdm

        original = tqdm.__init__
        tqdm.__init__ = partialmethod(original, disable=True)  # SAELens' fit() always draws a bar
        try:
            trainer.fit()
        finally:
            tqdm.__init__ = original
    else:
        trainer.fit()
    sae.eval()
    return sae


@torch.no_grad()
def sae_quality(sae, acts: Tensor) -> dict[str, float]:
    """Reconstruction of ``acts`` by ``sae``: fraction of variance explained, mean L0, share of dead latents.

    ``fve = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; a latent is dead when it fires on no row.

    >>> sae_quality(sae, acts)["fve"]                                      # doctest: +SKIP
    0.93
    """
    acts = acts.float()
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    resid = (acts - recon).square().sum()
    total = (acts - acts.mean(0)).square().sum()
    fired = (feats > 0)
    return {"fve": float(1 - resid / total), "l0": float(fired.sum(1).float().mean()),
            "dead_fraction": float((~fired.any(0)).float().mean()), "n": int(acts.shape[0])}


@torch.no_grad()
def latent_diff(sae, chat_model, finetuned_model, tokenizer, prompts: Sequence[Any], layer: int, *,
                top: int = 10, skip_first: bool = True, layer_path: str | None = None) -> list[dict[str, Any]]:
    """Latents ranked by mean activation on ``prompts`` in the finetune minus the chat model (largest increase first).

    Each entry: ``latent``, ``diff``, ``chat`` and ``finetuned`` (mean activation over all tokens).
    Returns the ``top`` entries (all with ``top=None``).

    >>> latent_diff(sae, chat, ft, tok, prompts, layer=2, top=3)[0]["latent"]   # doctest: +SKIP
    412
    """
    a = sae.encode(collect_activations(chat_model, tokenizer, prompts, layer, skip_first=skip_first,
                                       layer_path=layer_path)).mean(0)
    b = sae.encode(collect_activations(finetuned_model, tokenizer, prompts, layer, skip_first=skip_first,
                                       layer_path=layer_path)).mean(0)
    diff = b - a
    order = torch.argsort(diff, descending=True, stable=True).tolist()
    if top is not None:
        order = order[:top]
    return [{"latent": i, "diff": float(diff[i]), "chat": float(a[i]), "finetuned": float(b[i])} for i in order]


def latent_direction(sae, latent: int, layer: int, *, model: str | None = None) -> Direction:
    """The decoder row of ``latent`` as a one-layer :class:`Direction` (for cosines, steering and ablation).

    >>> v = latent_direction(sae, 412, layer=2)                            # doctest: +SKIP
    >>> v.cosine(persona)[2]                                               # doctest: +SKIP
    """
    w = sae.W_dec
    if not 0 <= int(latent) < w.shape[0]:
        raise ValueError(f"latent {latent} out of range: the SAE has {w.shape[0]} latents")
    return Direction({int(layer): w[int(latent)].detach().float().clone()}, model=model, recipe=f"sae_latent:{latent}",
                     meta={"latent": int(latent), "d_sae": int(w.shape[0])})
