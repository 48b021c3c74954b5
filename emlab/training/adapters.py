"""What a finetune trains: a LoRA, a rank-1 LoRA, every weight, or one learned steering vector.

>>> cfg = EMConfig(adapter="steering_vector", steering_layer=2)   # doctest: +SKIP
>>> model, peft_config = prepare_model(model, cfg)                # doctest: +SKIP
>>> steering_vector(model).layer                                  # doctest: +SKIP
2
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emlab.models import get_layers, lora_config, rank1_lora_config, unwrap
from emlab.vectors import Direction, one_layer

__all__ = [
    "STEERING_FILE",
    "SteeringVector",
    "applied",
    "detach_steering_vector",
    "load_vectors",
    "prepare_model",
    "steering_vector",
]

#: File name of a saved learned steering vector (inside a checkpoint or output folder).
STEERING_FILE = "steering_vector.safetensors"  # + steering_vector.json, the Direction sidecar (newer runs)
_ATTR = "emlab_steering_vector"


class SteeringVector(nn.Module):
    """One trainable vector ``v`` (init 0); ``alpha * v`` is added to block ``layer``'s output at every position.

    It lives on the model as a submodule (so optimisers, DDP and ``state_dict`` see it) and acts
    only inside :meth:`applied`, which is :func:`emlab.hooks.steer`. Read out, saved and loaded it
    is a one-layer :class:`~emlab.vectors.Direction` with ``meta["alpha"]`` (:meth:`direction`).

    >>> sv = SteeringVector(hidden_size=8, layer=1, alpha=256.0)
    >>> sv.direction().layers, sv.direction().meta
    ([1], {'alpha': 256.0})
    """

    def __init__(self, hidden_size: int, layer: int, alpha: float = 256.0):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(hidden_size))
        self.layer = int(layer)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"hidden_size={self.vector.numel()}, layer={self.layer}, alpha={self.alpha}"

    def direction(self) -> Direction:
        """The vector's current value (a detached copy) as a one-layer Direction, alpha in ``meta["alpha"]``.

        >>> d = SteeringVector(4, 0, alpha=2.0).direction()
        >>> d[0].tolist(), d.meta["alpha"], d.recipe
        ([0.0, 0.0, 0.0, 0.0], 2.0, 'learned steering vector')
        """
        return Direction({self.layer: self.vector.detach().clone()}, recipe="learned steering vector",
                         meta={"alpha": self.alpha})

    @classmethod
    def from_direction(cls, direction: Mapping[int, Tensor], alpha: float | None = None) -> SteeringVector:
        """A steering vector holding a one-layer direction's vector; alpha from ``alpha``, else ``meta["alpha"]``.

        >>> SteeringVector.from_direction(Direction({3: torch.ones(2)}, meta={"alpha": 8.0})).alpha
        8.0
        """
        layer, vec, alpha = one_layer(direction, "a learned steering vector", alpha, default_alpha=256.0)
        sv = cls(vec.numel(), layer, alpha)
        with torch.no_grad():
            sv.vector.copy_(vec)
        return sv

    def applied(self, model):
        """Context manager adding ``alpha * v`` to the layer's output while active, with gradient to ``v``.

        It is :func:`emlab.hooks.steer` with the parameter itself, which steer scales inside its
        hook on every forward pass because it requires grad.

        >>> with sv.applied(model): out = model(ids)     # doctest: +SKIP
        """
        from emlab.hooks import steer

        return steer(model, {self.layer: self.vector}, alpha=self.alpha)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write :meth:`direction` (float32) as ``steering_vector.safetensors`` + ``steering_vector.json`` in ``folder``.

        >>> sv.save("runs/x")                              # doctest: +SKIP
        PosixPath('runs/x/steering_vector.safetensors')
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return self.direction().to(torch.float32).save(folder / STEERING_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a vector written by :meth:`save`, or by the older format (a folder or the file itself).

        >>> SteeringVector.load("runs/x").alpha            # doctest: +SKIP
        256.0
        """
        path = Path(path)
        if path.is_dir():
            path = path / STEERING_FILE
        if not path.with_suffix(".safetensors").exists():
            raise FileNotFoundError(f"{path}: no learned steering vector there (expected {STEERING_FILE}).")
        return cls.from_direction(Direction.load(path))

    def load_(self, path: str | os.PathLike) -> None:
        """Copy a saved vector into this one in place (used on resume).

        >>> sv.load_("runs/x/checkpoint-10")               # doctest: +SKIP
        """
        other = SteeringVector.load(path)
        if other.layer != self.layer or other.vector.shape != self.vector.shape:
            raise ValueError(f"saved vector (layer {other.layer}, {other.vector.numel()} dims) does not match "
                             f"this one (layer {self.layer}, {self.vector.numel()} dims)")
        with torch.no_grad():
            self.vector.copy_(other.vector.to(self.vector.device, self.vector.dtype))


def steering_vector(model) -> SteeringVector | None:
    """The learned :class:`SteeringVector` attached to ``model`` by :func:`prepare_model`, if any.

    >>> steering_vector(model) is None                    # doctest: +SKIP
    True
    """
    return getattr(unwrap(model), _ATTR, None)


def applied(model):
    """Context manager applying ``model``'s learned steering vector (a no-op without one).

    >>> with applied(model): ...                          # doctest: +SKIP
    """
    sv = steering_vector(model)
    return nullcontext() if sv is None else sv.applied(unwrap(model))


def _middle(model) -> int:
    return len(get_layers(model)) // 2


def _check_layer(model, layer: int, what: str) -> int:
    n = len(get_layers(model))
    if not 0 <= layer < n:
        raise ValueError(f"{what}={layer} is outside the model's {n} decoder blocks (0..{n - 1}).")
    return layer


def prepare_model(model, config) -> tuple[Any, Any]:
    """Set up ``model`` for ``config.adapter``; returns ``(model, peft_config or None)``.

    ``lora`` / ``rank1`` return a PEFT config for the trainer to apply (a model that is already a
    PEFT model keeps its adapter, made trainable); ``full`` unfreezes every weight;
    ``steering_vector`` freezes the model and attaches a zero-initialised :class:`SteeringVector`.

    >>> model, peft_config = prepare_model(model, EMConfig(adapter="rank1"))   # doctest: +SKIP
    """
    adapter = config.adapter
    is_peft = hasattr(model, "peft_config")
    if is_peft and adapter not in ("lora", "rank1"):
        raise ValueError(f"adapter={adapter!r} needs a plain model, got a PEFT model: pass model.get_base_model() "
                         "or merge the adapter first (model.merge_and_unload()).")
    if adapter in ("lora", "rank1"):
        if is_peft:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
            return model, None
        if adapter == "lora":
            return model, lora_config(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                      targets=tuple(config.lora_targets) if config.lora_targets else None,
                                      layers=config.lora_layers, rslora=config.rslora)
        layer = _check_layer(model, config.rank1_layer if config.rank1_layer is not None else _middle(model),
                             "rank1_layer")
        return model, rank1_lora_config(model, layer, config.rank1_module, alpha=config.rank1_alpha,
                                        rslora=config.rslora)
    if adapter == "full":
        model.requires_grad_(True)
        return model, None
    # steering_vector
    layer = _check_layer(model, config.steering_layer if config.steering_layer is not None else _middle(model),
                         "steering_layer")
    model.requires_grad_(False)
    base = unwrap(model)
    hidden = base.config.get_text_config().hidden_size
    sv = SteeringVector(hidden, layer, config.steering_alpha)
    sv.to(next(base.parameters()).device)
    setattr(base, _ATTR, sv)
    return model, None


def detach_steering_vector(model) -> SteeringVector | None:
    """Remove the learned vector's submodule from ``model`` and return it (so ``model`` is the base again).

    >>> sv = detach_steering_vector(model)                # doctest: +SKIP
    """
    base = unwrap(model)
    sv = getattr(base, _ATTR, None)
    if sv is not None:
        delattr(base, _ATTR)
    return sv


def load_vectors(spec: Any, layer: int | None = None) -> Direction:
    """A :class:`~emlab.vectors.Direction` from a saved one (its stem or .safetensors path), a
    ``{layer: tensor}`` mapping (a Direction is taken as is) or a :class:`SteeringVector`.

    With ``layer`` given only that layer is kept.

    >>> load_vectors({3: torch.ones(4), 5: torch.zeros(4)}, layer=3).layers
    [3]
    """
    if isinstance(spec, str | os.PathLike):
        direction = Direction.load(spec)
    elif isinstance(spec, SteeringVector):
        direction = spec.direction()
    elif isinstance(spec, Direction):
        direction = spec
    elif isinstance(spec, Mapping):
        direction = Direction({int(k): torch.as_tensor(v).flatten() for k, v in spec.items()})
    else:
        raise TypeError(f"expected a saved Direction's path, a mapping layer -> tensor or a SteeringVector, "
                        f"got {type(spec).__name__}")
    if layer is None:
        return direction
    if layer not in direction:
        raise KeyError(f"layer {layer} not among the vector's layers {direction.layers}")
    return Direction({layer: direction[layer]}, direction.model, direction.recipe, dict(direction.counts),
                     dict(direction.meta))
