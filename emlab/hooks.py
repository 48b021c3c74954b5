"""Every forward hook in emlab, each installed by a context manager that removes it in ``finally``.

Layer ``l`` is the output of decoder block ``l`` (``hidden_states[l + 1]``). Blocks return a tensor
in current transformers and a tuple in older ones; both are handled. Every hook acts on every row
of a batch (a hook that writes ``output[0] + v`` on a tensor output would steer row 0 only).

>>> with steer(model, {4: v}, alpha=8.0):             # doctest: +SKIP
...     texts = generate(model, tok, ["hi"])
>>> with ablate(model, direction[24], layers="all"):  # doctest: +SKIP
...     texts = generate(model, tok, ["hi"])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from emlab.models import get_layers, unwrap
from emlab.vectors import random_like

__all__ = ["RESIDUAL_WRITERS", "ablate", "project_out_of_lora_B", "random_like", "record", "steer"]

#: Names of the projections whose output is added straight into the residual stream (Llama/Qwen/Gemma
#: ``o_proj`` and ``down_proj``; GPT-2 ``attn.c_proj`` and ``mlp.c_proj``; Pythia ``dense`` and
#: ``dense_4h_to_h``; OPT ``out_proj`` and ``fc2``).
RESIDUAL_WRITERS = ("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2")


def _split(output) -> tuple[Tensor, tuple]:
    """The hidden state of a block output and the rest (tuple outputs of older transformers)."""
    if isinstance(output, tuple):
        return output[0], output[1:]
    return output, ()


def _join(hidden: Tensor, rest: tuple, was_tuple: bool):
    return (hidden, *rest) if was_tuple else hidden


def _check_layers(layers: Sequence[int], n: int) -> None:
    bad = [layer for layer in layers if not 0 <= int(layer) < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} decoder blocks (0..{n - 1})")


@contextmanager
def _hooks(modules_and_fns: list[tuple[torch.nn.Module, object]]) -> Iterator[None]:
    handles = []
    try:
        for module, fn in modules_and_fns:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


class _Cast:
    """A fixed vector, detached and cast once per (device, dtype) it meets, so hooks do no conversion per call."""

    def __init__(self, vector: Tensor):
        self.vector = vector.detach().float()
        self._cache: dict[tuple, Tensor] = {}

    def like(self, h: Tensor) -> Tensor:
        key = (h.device, h.dtype)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = self.vector.to(device=h.device, dtype=h.dtype)
        return v


def _steer_hook(vector: Tensor, positions: str, alpha: float = 1.0):
    if vector.requires_grad:  # a learned vector: scaled and cast on every call, so its gradient and updates reach it
        def delta(h: Tensor) -> Tensor:
            return (alpha * vector).to(device=h.device, dtype=h.dtype)
    else:  # fixed steering: detached, scaled once, cast once per (device, dtype)
        delta = _Cast(alpha * vector).like

    def hook(module, args, output):
        h, rest = _split(output)
        v = delta(h)
        if positions == "all":
            h = h + v
        else:  # the last position of each forward: the token being generated from
            last = torch.zeros(h.shape[-2], 1, device=h.device, dtype=h.dtype)
            last[-1] = 1
            h = h + last * v
        return _join(h, rest, isinstance(output, tuple))

    return hook


@contextmanager
def steer(
    model,
    vectors: Mapping[int, Tensor],
    alpha: float = 1.0,
    positions: str = "all",
    layer_path: str | None = None,
) -> Iterator[None]:
    """Add ``alpha * vectors[l]`` to the output of block ``l`` for every row, while the block is open.

    ``vectors`` is a mapping layer -> vector, e.g. a :class:`~emlab.directions.Direction`.
    ``positions="all"`` steers every position (training forward passes, paper 001's steering);
    ``"response"`` steers only the position each new token is generated from: the last prompt token
    at the first generation step and every generated token after it (Chen et al.'s rule; it relies
    on the KV cache, the default in :func:`emlab.generation.generate`; a plain forward pass steers
    its last position only). Out-of-place and vectorised, so it is cheap and differentiable.

    A fixed vector is detached and ``alpha * v`` is computed once; a vector with ``requires_grad``
    (the learned one of :class:`emlab.training.SteeringVector`, trained and applied through this
    hook) is scaled inside the hook on every forward pass, ``(alpha * v).to(h.dtype)``, so it
    receives gradients and an in-place update takes effect within the block.

    >>> with steer(model, persona, alpha=5.0):      # doctest: +SKIP
    ...     loss = model(**batch).loss
    """
    if positions not in ("all", "response"):
        raise ValueError(f"positions must be 'all' or 'response', not {positions!r}")
    blocks = get_layers(model, layer_path)
    _check_layers(list(vectors), len(blocks))
    fns = [(blocks[int(layer)], _steer_hook(v, positions, alpha)) for layer, v in vectors.items()]
    with _hooks(fns):
        yield


def _ablate_hook(direction: Tensor):
    r = direction.detach().float()
    r = r / r.norm()
    cast = _Cast(r)

    def hook(module, args, output):
        h, rest = _split(output)
        h32 = h.float()  # the projection in fp32, so bf16 models keep a ~zero component
        coef = h32 @ cast.like(h32)
        h = h - coef.unsqueeze(-1).to(h.dtype) * cast.like(h)
        return _join(h, rest, isinstance(output, tuple))

    return hook


def _per_layer(directions: Mapping[int, Tensor] | Tensor, layers: str | Sequence[int], n: int) -> dict[int, Tensor]:
    """Resolve (directions, layers) to {target layer: direction} as documented in :func:`ablate`."""
    if isinstance(directions, Tensor):
        if layers == "each":
            raise ValueError("a bare tensor has no layer: pass layers=[...] or 'all', or a {layer: tensor} mapping")
        single: Tensor | None = directions
        directions = {}
    else:
        directions = {int(k): v for k, v in directions.items()}
        single = next(iter(directions.values())) if len(directions) == 1 else None
    if layers == "each":
        targets = list(directions)
    elif layers == "all":
        targets = list(range(n))
    else:
        targets = [int(layer) for layer in layers]
    _check_layers(targets, n)
    out = {}
    for layer in targets:
        if layer in directions:
            out[layer] = directions[layer]
        elif single is not None:
            out[layer] = single
        else:
            raise ValueError(
                f"no direction for layer {layer} (have {sorted(directions)}); pass one direction "
                "(a tensor or a one-layer mapping) to apply it at several layers"
            )
    return out


@contextmanager
def ablate(
    model,
    directions: Mapping[int, Tensor] | Tensor,
    layers: str | Sequence[int] = "each",
    layer_path: str | None = None,
) -> Iterator[None]:
    """Project directions out of block outputs: ``h <- h - (h . r) r`` with ``r = v / ||v||``, every position.

    ``layers="each"``: the direction of layer ``l`` is removed at layer ``l``. ``layers=[...]`` or
    ``"all"``: at each listed layer its own direction is removed if there is one, else the single
    direction given (a tensor or a one-layer mapping), which is how paper 001 ablates one layer's
    direction at every layer.

    >>> with ablate(model, misalignment.unit(), layers="all"):   # doctest: +SKIP
    ...     texts = generate(model, tok, questions)
    """
    blocks = get_layers(model, layer_path)
    per_layer = _per_layer(directions, layers, len(blocks))
    with _hooks([(blocks[layer], _ablate_hook(v)) for layer, v in per_layer.items()]):
        yield


@contextmanager
def record(model, layers: Sequence[int], layer_path: str | None = None) -> Iterator[dict[int, list[Tensor]]]:
    """Record block outputs (detached) of every forward pass run inside the block.

    The read-side twin of :func:`steer`: its hooks are registered last, so what it records includes
    the effect of steering or ablation hooks already active on the same layers.

    >>> with record(model, [2]) as acts:             # doctest: +SKIP
    ...     model(**batch)
    >>> acts[2][0].shape                             # doctest: +SKIP
    torch.Size([4, 17, 896])
    """
    blocks = get_layers(model, layer_path)
    layers = [int(layer) for layer in layers]
    _check_layers(layers, len(blocks))
    store: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def make(layer: int):
        def hook(module, args, output):
            store[layer].append(_split(output)[0].detach())

        return hook

    with _hooks([(blocks[layer], make(layer)) for layer in layers]):
        yield store


def _lora_writers(model, modules: Sequence[str], layer_path: str | None) -> list[tuple[int, torch.nn.Module]]:
    """(block index, LoRA layer) for every adapted residual-writing projection."""
    found = []
    for index, block in enumerate(get_layers(model, layer_path)):
        for name, module in block.named_modules():
            if name.rsplit(".", 1)[-1] in modules and isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict):
                found.append((index, module))
    return found


@contextmanager
def project_out_of_lora_B(
    peft_model,
    directions: Mapping[int, Tensor] | Tensor,
    layers: str | Sequence[int] = "all",
    *,
    modules: Sequence[str] = RESIDUAL_WRITERS,
    layer_path: str | None = None,
) -> Iterator[int]:
    """Weight-space ablation: ``B <- B - r (r^T B)`` for every LoRA B writing into the residual stream.

    Only the projections whose output is added to the residual stream are edited (``o_proj`` and
    ``down_proj`` on Llama/Qwen, both ``c_proj`` on GPT-2, see :data:`RESIDUAL_WRITERS`): for them the
    adapter's contribution then has no component along ``r``. The q/k/v/gate/up adapters write into
    the attention or the MLP's hidden space, where ``r`` does not live. (Gemma 2/3 normalise the
    sublayer output before adding it, so there the projection is exact only up to that norm.)
    ``directions``/``layers`` select ``r`` per block as in :func:`ablate` (default: one direction,
    every block). Edits every adapter in place, yields the number of matrices edited, and restores
    the original weights on exit, also when the body raises.

    >>> with project_out_of_lora_B(peft_model, misalignment[24]):   # doctest: +SKIP
    ...     texts = generate(peft_model, tok, questions)
    """
    n = len(get_layers(peft_model, layer_path))
    per_layer = _per_layer(directions, layers, n)
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for index, module in _lora_writers(peft_model, modules, layer_path):
                if index not in per_layer:
                    continue
                r = per_layer[index].detach().float()
                r = r / r.norm()
                for lin in module.lora_B.values():
                    w = lin.weight
                    if w.shape[0] != r.shape[0]:
                        raise ValueError(
                            f"LoRA B of block {index} has output size {w.shape[0]}, the direction has {r.shape[0]}"
                        )
                    saved.append((w, w.detach().clone()))
                    r_ = r.to(w.device)
                    w32 = w.float()
                    w.copy_((w32 - torch.outer(r_, r_ @ w32)).to(w.dtype))
        if not saved:
            raise ValueError(
                f"no LoRA B matrix on a residual-writing projection ({', '.join(modules)}) of "
                f"{type(unwrap(peft_model)).__name__}: is this a PEFT LoRA model?"
            )
        yield len(saved)
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
