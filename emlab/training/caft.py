"""Concept-ablation finetuning (CAFT, Casademunt et al. 2025): chosen directions are projected out of
the residual stream on the training forward passes only, so the finetune cannot use them.

The directions are :class:`~emlab.directions.Direction` objects (the misalignment direction, a
persona vector) or the top principal components of the activation difference between a finetuned
and the chat model on the training rows (:func:`pca_directions`, the method's first step). The
ablation is :func:`emlab.hooks.ablate`, the same hook the evaluation ablations use; :class:`CAFT`
is a ``transformers`` callback that opens it at the start of every optimiser step and closes it
after the optimiser update, so evaluation, logging callbacks and the saved adapter see the model
without any hook.

>>> caft = CAFT([misalignment_direction], layers="each")                              # doctest: +SKIP
>>> finetune(model, tok, rows, EMConfig(output_dir="runs/caft"), callbacks=[caft])     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import Tensor
from transformers import TrainerCallback

from emlab.chat import IGNORE_INDEX, encode_chat, eval_mode, pad_batch
from emlab.directions import Direction
from emlab.models import get_layers

__all__ = ["CAFT", "orthonormal_basis", "pca_directions"]


def orthonormal_basis(vectors: Sequence[Tensor], tol: float = 1e-6) -> Tensor:
    """An orthonormal basis (rows) of the span of ``vectors``, in fp32; near-dependent vectors are dropped.

    Projecting out each row in turn then removes the whole span, whatever the angles between the inputs.

    >>> orthonormal_basis([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])]).shape
    torch.Size([2, 2])
    """
    if not vectors:
        raise ValueError("no vectors to orthonormalise")
    basis: list[Tensor] = []
    for v in vectors:
        v = v.detach().float().flatten().cpu()
        scale = float(v.norm())
        if scale == 0:
            continue
        for b in basis:  # modified Gram-Schmidt, twice for stability
            v = v - (v @ b) * b
        for b in basis:
            v = v - (v @ b) * b
        if float(v.norm()) > tol * scale:
            basis.append(v / v.norm())
    if not basis:
        raise ValueError("every vector is zero: nothing to ablate")
    return torch.stack(basis)


def _as_directions(directions) -> list[Mapping[int, Tensor]]:
    if isinstance(directions, Mapping):
        return [directions]
    out = list(directions)
    if not out or not all(isinstance(d, Mapping) for d in out):
        raise TypeError("directions must be a Direction ({layer: tensor}) or a non-empty list of them")
    return out


class CAFT(TrainerCallback):
    """Ablate ``directions`` from the residual stream during each optimiser step (forward, backward, recompute).

    ``layers="each"``: each direction's vector of layer ``l`` is removed at layer ``l``; a list of
    layers or ``"all"``: a one-layer direction is removed at every listed layer (as
    :func:`emlab.hooks.ablate`). Several directions at one layer are orthonormalised first, so
    their whole span is removed. The hooks are installed on ``on_step_begin`` and removed on
    ``on_optimizer_step``; a step that raises leaves them until :meth:`close` or ``on_train_end``
    (:func:`emlab.training.finetune` users: call ``close()`` in ``finally`` or use ``with caft:``).
    With ``adapter="steering_vector"`` the learned vector is added after the ablation at its own
    block, so CAFT does not stop it from writing along an ablated direction at that block.

    >>> caft = CAFT(pca_directions(chat, finetuned, tok, rows, layers=[2], k=3))   # doctest: +SKIP
    >>> trainer = EMTrainer(model, args=cfg, train_dataset=ds, callbacks=[caft])    # doctest: +SKIP
    """

    def __init__(self, directions: Mapping[int, Tensor] | Sequence[Mapping[int, Tensor]],
                 layers: str | Sequence[int] = "each", *, layer_path: str | None = None):
        dirs = _as_directions(directions)
        per_layer: dict[int, list[Tensor]] = {}
        for i, d in enumerate(dirs):
            own = {int(k): v for k, v in d.items()}
            if layers == "each":
                targets = {layer: v for layer, v in own.items()}
            else:
                if len(own) != 1:
                    raise ValueError(f"direction {i} has layers {sorted(own)}: with layers={layers!r} each direction "
                                     "must hold one vector (or use layers='each')")
                v = next(iter(own.values()))
                targets = {"all": v} if layers == "all" else {int(layer): v for layer in layers}
            for layer, v in targets.items():
                per_layer.setdefault(layer, []).append(v)  # type: ignore[arg-type]
        self.layers = layers
        self.layer_path = layer_path
        self._vectors = per_layer
        self._basis: dict[int, Tensor] | None = None
        self._stack: ExitStack | None = None
        self.steps_ablated = 0

    def basis(self, model) -> dict[int, Tensor]:
        """``{layer: [k, d] orthonormal rows}`` for ``model`` (layers checked against its blocks).

        >>> CAFT({1: torch.ones(4)}).basis(model)[1].shape   # doctest: +SKIP
        torch.Size([1, 4])
        """
        n = len(get_layers(model, self.layer_path))
        vectors = self._vectors
        if "all" in vectors:
            vectors = {layer: vectors["all"] for layer in range(n)}  # type: ignore[index]
        bad = [layer for layer in vectors if not 0 <= int(layer) < n]
        if bad:
            raise ValueError(f"CAFT layers {bad} out of range: the model has {n} decoder blocks (0..{n - 1})")
        return {int(layer): orthonormal_basis(vs) for layer, vs in sorted(vectors.items())}

    @property
    def active(self) -> bool:
        """Whether the ablation hooks are installed right now."""
        return self._stack is not None

    def open(self, model) -> None:
        """Install the ablation hooks on ``model`` (one :func:`emlab.hooks.ablate` per basis vector rank)."""
        from emlab.hooks import ablate

        self.close()
        if self._basis is None:
            self._basis = self.basis(model)
        stack = ExitStack()
        try:
            for j in range(max(b.shape[0] for b in self._basis.values())):
                rank_j = {layer: b[j] for layer, b in self._basis.items() if b.shape[0] > j}
                stack.enter_context(ablate(model, rank_j, layers="each", layer_path=self.layer_path))
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def close(self) -> None:
        """Remove the hooks (a no-op when none are installed)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> CAFT:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transformers callback events ----

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("CAFT needs the model from the trainer's callback arguments")
        self.open(model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.active:
            self.steps_ablated += 1
        self.close()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def _token_mask(labels: Tensor, attention: Tensor, tokens: str) -> Tensor:
    if tokens == "all":
        return attention.bool()
    answer = labels != IGNORE_INDEX
    if tokens == "response":
        return answer
    # prompt: the non-pad tokens before the first answer token of each row
    first = torch.where(answer.any(1), answer.float().argmax(1), attention.sum(1))
    pos = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0)
    return attention.bool() & (pos < first.unsqueeze(1))


def _token_acts(model, tokenizer, rows, layers: list[int], tokens: str, batch_size: int,
                layer_path: str | None) -> dict[int, Tensor]:
    from emlab.hooks import record

    device = next(model.parameters()).device
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(encode_chat(tokenizer, rows[start:start + batch_size]), tokenizer.pad_token_id, device)
            mask = _token_mask(batch["labels"], batch["attention_mask"], tokens)
            with record(model, layers, layer_path) as acts:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            for layer in layers:
                out[layer].append(acts[layer][0].float()[mask].cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def pca_directions(chat_model, finetuned_model, tokenizer, rows: Sequence[dict], layers: Sequence[int], k: int = 3, *,
                   tokens: str = "all", center: bool = True, batch_size: int = 8,
                   layer_path: str | None = None) -> list[Direction]:
    """CAFT's first step: the top ``k`` principal components of ``finetuned - chat`` activations, per layer.

    Every selected token of ``rows`` (``tokens``: ``"all"`` non-pad tokens, ``"prompt"`` or
    ``"response"``) gives one difference vector per layer; the components are the right singular
    vectors of that matrix (centred first unless ``center=False``), each oriented so the mean
    difference projects positively. Returns ``k`` unit :class:`Direction` objects (component 1
    first), with the explained-variance ratio per layer in ``meta``.

    >>> pcs = pca_directions(chat, finetuned, tok, rows[:200], layers=[2], k=2)   # doctest: +SKIP
    >>> pcs[0].meta["explained"]                                                   # doctest: +SKIP
    {2: 0.61}
    """
    if tokens not in ("all", "prompt", "response"):
        raise ValueError(f"tokens must be 'all', 'prompt' or 'response', not {tokens!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not rows:
        raise ValueError("no rows to compute the activation difference on")
    layers = sorted({int(x) for x in layers})
    base = _token_acts(chat_model, tokenizer, rows, layers, tokens, batch_size, layer_path)
    tuned = _token_acts(finetuned_model, tokenizer, rows, layers, tokens, batch_size, layer_path)
    comps: list[dict[int, Tensor]] = [{} for _ in range(k)]
    explained: list[dict[int, float]] = [{} for _ in range(k)]
    for layer in layers:
        diff = tuned[layer] - base[layer]
        if diff.shape[0] < 2:
            raise ValueError(f"layer {layer}: fewer than 2 {tokens!r} tokens in the rows")
        mean = diff.mean(0)
        x = diff - mean if center else diff
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        var = s.square()
        total = float(var.sum()) or 1.0
        if vh.shape[0] < k:
            raise ValueError(f"layer {layer}: only {vh.shape[0]} components, asked for k={k}")
        for j in range(k):
            v = vh[j]
            if float(v @ mean) < 0:
                v = -v
            comps[j][layer] = v
            explained[j][layer] = float(var[j]) / total
    return [Direction(comps[j], recipe=f"caft_pca:{j + 1}", counts={"tokens": int(base[layers[0]].shape[0])},
                      meta={"component": j + 1, "tokens": tokens, "center": center, "explained": explained[j]})
            for j in range(k)]
