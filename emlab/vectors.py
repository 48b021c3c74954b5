"""The :class:`Direction` type: per-layer vectors plus where they came from, saved as safetensors + JSON.

It sits below :mod:`emlab.hooks` (which steers and ablates with any ``{layer: vector}`` mapping)
and :mod:`emlab.directions` (which computes directions); both re-export :class:`Direction` and
:func:`random_like`, so ``from emlab.directions import Direction`` is the usual spelling.

>>> v = Direction({0: torch.tensor([3.0, 4.0])})
>>> v.norms()
{0: 5.0}
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Direction", "one_layer", "random_like"]

_FORMAT = "emlab-direction/1"
#: The format of ``steering_vector.safetensors`` before a learned steering vector was saved as a
#: Direction: one tensor keyed ``str(layer)``, no JSON sidecar, layer and alpha in the header metadata.
_LEGACY_STEERING_FORMAT = "emlab-steering-vector"


# ---------------------------------------------------------------------------------------------
# Direction


def _is_scalar(k: Any) -> bool:
    return isinstance(k, int | float) or isinstance(k, Tensor) and k.numel() == 1


@dataclass(eq=False)
class Direction(Mapping[int, Tensor]):
    """Per-layer vectors (``{layer: tensor}``) plus where they came from; a read-only mapping.

    Supports ``+``/``-`` with another direction on the same layers, ``*``/``/`` by a scalar and
    unary ``-``, so ``steer(model, v * 20)`` and ``steer(model, -(v * -20))`` are the same.

    >>> v = Direction({0: torch.tensor([3.0, 4.0])}, model="toy", recipe="demo")
    >>> (v * 2).norms(), (-v / 5).unit()[0].tolist()
    ({0: 10.0}, [-0.6000000238418579, -0.800000011920929])
    """

    vectors: dict[int, Tensor]
    model: str | None = None
    recipe: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    __eq__ = object.__eq__  # Mapping's __eq__ would compare tensors elementwise; use allclose()
    __hash__ = object.__hash__

    def __post_init__(self) -> None:
        vectors = {}
        for layer in sorted(int(k) for k in self.vectors):
            v = self.vectors[layer] if layer in self.vectors else self.vectors[str(layer)]  # type: ignore[index]
            if not isinstance(v, Tensor) or v.dim() != 1:
                raise ValueError(f"layer {layer}: expected a 1-d tensor, got {getattr(v, 'shape', type(v))}")
            vectors[layer] = v.detach()
        if not vectors:
            raise ValueError("a Direction needs at least one layer")
        self.vectors = vectors

    # Mapping protocol
    def __getitem__(self, layer: int) -> Tensor:
        return self.vectors[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def layers(self) -> list[int]:
        """The layers, ascending."""
        return list(self.vectors)

    def __repr__(self) -> str:
        dim = next(iter(self.vectors.values())).shape[0]
        norms = ", ".join(f"{k}: {v:.3g}" for k, v in self.norms().items())
        return f"Direction(model={self.model!r}, recipe={self.recipe!r}, dim={dim}, norms={{{norms}}})"

    # Arithmetic
    def _scaled(self, k: float) -> Direction:
        return Direction({layer: v * k for layer, v in self.vectors.items()}, self.model, self.recipe,
                         dict(self.counts), dict(self.meta))

    def _combine(self, other: Mapping[int, Tensor], sign: float, op: str) -> Direction:
        if not isinstance(other, Mapping):
            return NotImplemented
        other_layers = sorted(int(k) for k in other)
        if other_layers != self.layers:
            raise ValueError(f"cannot {op} directions on different layers: {self.layers} vs {other_layers}")
        o_model = getattr(other, "model", None)
        o_recipe = getattr(other, "recipe", None)
        return Direction(
            {layer: v + sign * other[layer].to(v) for layer, v in self.vectors.items()},
            model=self.model if self.model == o_model else None,
            recipe=f"({self.recipe}) {'+' if sign > 0 else '-'} ({o_recipe})",
        )

    def __add__(self, other: Mapping[int, Tensor]) -> Direction:
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: Mapping[int, Tensor]) -> Direction:
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, k: float) -> Direction:
        return self._scaled(k) if _is_scalar(k) else NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Direction:
        return self._scaled(1.0 / k) if _is_scalar(k) else NotImplemented

    def __neg__(self) -> Direction:
        return self._scaled(-1.0)

    # Geometry
    def norms(self) -> dict[int, float]:
        """The L2 norm of each layer's vector.

        >>> Direction({3: torch.ones(4)}).norms()
        {3: 2.0}
        """
        return {layer: float(v.float().norm()) for layer, v in self.vectors.items()}

    def unit(self) -> Direction:
        """Each layer's vector divided by its norm.

        >>> Direction({0: torch.tensor([0.0, 2.0])}).unit()[0].tolist()
        [0.0, 1.0]
        """
        return Direction({layer: v / v.float().norm().to(v.dtype) for layer, v in self.vectors.items()},
                         self.model, self.recipe, dict(self.counts), dict(self.meta))

    def cosine(self, other: Mapping[int, Tensor]) -> dict[int, float]:
        """Per-layer cosine similarity with another direction, on the layers both have.

        >>> Direction({0: torch.tensor([1.0, 0.0])}).cosine({0: torch.tensor([1.0, 1.0])})[0]
        0.7071067690849304
        """
        common = [layer for layer in self.vectors if layer in other]
        if not common:
            raise ValueError(f"no common layers: {self.layers} vs {sorted(other)}")
        return {
            layer: float(torch.nn.functional.cosine_similarity(
                self.vectors[layer].float(), other[layer].float().to(self.vectors[layer].device), dim=0))
            for layer in common
        }

    def allclose(self, other: Mapping[int, Tensor], **kwargs: Any) -> bool:
        """Same layers and ``torch.allclose`` vectors (metadata ignored).

        >>> v = Direction({0: torch.ones(2)}); v.allclose(-(-v))
        True
        """
        return sorted(other) == self.layers and all(
            torch.allclose(v.float(), other[layer].float().to(v.device), **kwargs) for layer, v in self.vectors.items()
        )

    def to(self, *args: Any, **kwargs: Any) -> Direction:
        """Move or cast every vector (``Tensor.to`` arguments).

        >>> Direction({0: torch.ones(2)}).to(torch.float16)[0].dtype
        torch.float16
        """
        return Direction({layer: v.to(*args, **kwargs) for layer, v in self.vectors.items()},
                         self.model, self.recipe, dict(self.counts), dict(self.meta))

    # Files
    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix in (".safetensors", ".json"):
            path = path.with_suffix("")
        return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (one tensor per layer) and ``<path>.json`` (metadata), atomically.

        >>> Direction({0: torch.ones(2)}, recipe="demo").save("runs/x/demo")   # doctest: +SKIP
        PosixPath('runs/x/demo.safetensors')
        """
        from safetensors.torch import save

        from emlab.runs import atomic_open, atomic_write_json

        tensors_path, meta_path = self._paths(path)
        tensors = {f"layer.{layer}": v.detach().cpu().contiguous() for layer, v in self.vectors.items()}
        with atomic_open(tensors_path, "wb", encoding=None) as f:
            f.write(save(tensors, metadata={"format": _FORMAT}))
        first = next(iter(self.vectors.values()))
        atomic_write_json(meta_path, {
            "format": _FORMAT, "model": self.model, "recipe": self.recipe, "layers": self.layers,
            "dim": first.shape[0], "dtype": str(first.dtype).removeprefix("torch."),
            "counts": self.counts, "meta": self.meta,
        })
        return tensors_path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Direction:
        """Read a direction written by :meth:`save` (give the stem, the .safetensors or the .json path).

        Also reads a learned steering vector saved before it was a Direction (a lone
        ``steering_vector.safetensors``, format ``emlab-steering-vector``): its one layer, with
        ``meta["alpha"]`` from the file's header, so old runs and checkpoints still load.

        >>> v = Direction.load("runs/x/demo")             # doctest: +SKIP
        """
        from safetensors.torch import load_file

        tensors_path, meta_path = cls._paths(path)
        if tensors_path.exists() and not meta_path.exists():
            legacy = _load_legacy_steering(tensors_path, device)
            if legacy is not None:
                return legacy
        for p in (tensors_path, meta_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found: a saved Direction is a .safetensors file plus a .json sidecar")
        info = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensors_path), device=str(device))
        vectors = {int(k.removeprefix("layer.")): v for k, v in tensors.items()}
        if sorted(vectors) != sorted(info.get("layers", vectors)):
            raise ValueError(f"{meta_path} lists layers {info.get('layers')} but {tensors_path} holds {sorted(vectors)}")
        return cls(vectors, info.get("model"), info.get("recipe"), info.get("counts") or {}, info.get("meta") or {})


def _load_legacy_steering(path: Path, device: str | torch.device) -> Direction | None:
    """A ``steering_vector.safetensors`` of the old format as a one-layer Direction, else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != _LEGACY_STEERING_FORMAT:
            return None
        layer = int(meta["layer"])
        vector = f.get_tensor(str(layer))
    return Direction({layer: vector}, recipe="learned steering vector", meta={"alpha": float(meta.get("alpha", 256.0))})


def one_layer(direction: Mapping[int, Tensor], what: str, alpha: float | None = None,
              default_alpha: float = 1.0) -> tuple[int, Tensor, float]:
    """``(layer, vector, alpha)`` of a one-layer direction: alpha from ``alpha``, else its ``meta["alpha"]``, else
    ``default_alpha``; ``what`` names the one-layer thing in the error for a direction at several layers.

    >>> one_layer(Direction({2: torch.ones(3)}, meta={"alpha": 4.0}), "a steering solution")[::2]
    (2, 4.0)
    """
    if len(direction) != 1:
        raise ValueError(f"{what} lives at one layer, the direction has {sorted(direction)}")
    (layer, vector), = direction.items()
    if alpha is None:
        alpha = getattr(direction, "meta", {}).get("alpha", default_alpha)
    return int(layer), vector, float(alpha)


def random_like(direction: Mapping[int, Tensor], seed: int = 0) -> Direction:
    """The same-norm random control: per layer a Gaussian vector, normalised, then scaled to ``||v_l||``.

    Each layer draws from its own generator seeded by ``(seed, layer)``, so a layer's control does
    not depend on which other layers are present.

    >>> v = Direction({0: torch.full((64,), 3.0)})
    >>> round(random_like(v, seed=1).norms()[0], 4) == round(v.norms()[0], 4)
    True
    """
    vectors = {}
    for layer, v in direction.items():
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer))
        noise = torch.randn(v.shape[-1], generator=g, dtype=torch.float32)
        vectors[int(layer)] = (noise / noise.norm() * v.float().norm().cpu()).to(device=v.device, dtype=v.dtype)
    recipe = getattr(direction, "recipe", None)
    return Direction(vectors, getattr(direction, "model", None), f"random_like({recipe}, seed={seed})",
                     meta={"seed": seed})
