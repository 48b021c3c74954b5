"""A finetuning *solution* as a point in parameter space: its norm, rescaled, perturbed, compared.

Two kinds: a steering vector added to one block's output (:class:`SteeringSolution`) and a PEFT
LoRA adapter (:class:`LoraSolution`). Both give the same handful of operations, each a context
manager that leaves the model exactly as it found it (also when the body raises):

- ``norm()``: the norm of the update the model actually sees: ``||alpha * v||`` for a steering
  vector; for a LoRA the Frobenius norm of the *scaled* update ``dW = scaling * B @ A`` (rsLoRA
  scale included), summed in quadrature over every adapted module, so ranks compare;
- ``scaled(s)``: the solution at ``s`` times its norm (``s = 0`` is the base model);
- ``perturbed(eps, seed)``: a norm-preserving rotation by ``arcsin(eps)`` (:func:`orthogonal_perturbation`);
- ``random(seed)``: a same-norm random control; ``inner(other)`` and :func:`cosine` compare two.

>>> general = LoraSolution(peft_model)                    # doctest: +SKIP
>>> with general.scaled(0.5):                             # doctest: +SKIP
...     loss = response_loss(peft_model, tok, rows)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor

from emlab.vectors import Direction, one_layer, random_like

__all__ = ["LoraSolution", "Solution", "SteeringSolution", "cosine", "orthogonal_perturbation"]


def _generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def orthogonal_perturbation(x: Tensor, eps: float, generator: int | torch.Generator | None = None) -> Tensor:
    """``x' = sqrt(1 - eps^2) x + eps y``, ``y`` Gaussian, orthogonal to ``x``, rescaled to ``||x||``.

    So ``||x'|| = ||x||`` and ``cos(x, x') = sqrt(1 - eps^2)`` (a rotation by ``arcsin(eps)``);
    ``eps = 0`` returns ``x`` unchanged, ``eps = 1`` a random vector orthogonal to it. The noise is
    drawn on the CPU in float64 from ``generator`` (a seed or a ``torch.Generator``), so a seed
    gives the same perturbation on every device. A zero ``x`` is returned as it is.

    >>> x = torch.randn(100)
    >>> xp = orthogonal_perturbation(x, 0.6, generator=0)
    >>> round(float(xp.norm() / x.norm()), 6), round(float(torch.cosine_similarity(x, xp, dim=0)), 6)
    (1.0, 0.8)
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (sin of the rotation angle), got {eps}")
    if x.numel() < 2:
        raise ValueError("a perturbation orthogonal to x needs at least 2 dimensions")
    flat = x.detach().to("cpu", torch.float64).flatten()
    n = flat.norm()
    if n == 0 or eps == 0:
        return x.detach().clone()
    u = flat / n
    y = torch.randn(flat.shape, generator=_generator(generator), dtype=torch.float64)
    y = y - (y @ u) * u
    y = y * (n / y.norm())
    out = math.sqrt(1.0 - eps * eps) * flat + eps * y
    return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


def _gaussian_like(x: Tensor, norm: float, generator: torch.Generator | None) -> Tensor:
    """A Gaussian tensor shaped like ``x``, normalised, then scaled to ``norm`` (CPU float64 draw)."""
    y = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    y = y * (norm / y.norm())
    return y.to(device=x.device, dtype=x.dtype)


class Solution(ABC):
    """What the probes need from a solution; see :class:`SteeringSolution` and :class:`LoraSolution`.

    >>> with solution.scaled(2.0):                         # doctest: +SKIP
    ...     out = solution.model(ids)
    """

    model: Any

    @abstractmethod
    def norm(self) -> float:
        """Norm of the update the model sees (multiplier or LoRA scaling included)."""

    @abstractmethod
    def scaled(self, s: float) -> AbstractContextManager[None]:
        """Context manager: the model with this solution at ``s`` times its norm."""

    @abstractmethod
    def perturbed(self, eps: float, seed: int = 0) -> AbstractContextManager[None]:
        """Context manager: the model with a norm-preserving rotation of this solution by ``arcsin(eps)``."""

    @abstractmethod
    def random(self, seed: int = 0) -> Solution:
        """A random solution of the same kind and the same norm (the control direction)."""

    @abstractmethod
    def inner(self, other: Solution) -> float:
        """Inner product of the two updates (flattened)."""

    @property
    def _base_key(self) -> tuple:
        """Solutions with equal keys share their base model (so its logits are computed once)."""
        return (type(self).__name__, id(self.model))

    def at_norm(self, norm: float) -> AbstractContextManager[None]:
        """Context manager: the model with this solution rescaled to absolute norm ``norm``.

        >>> with solution.at_norm(10.0): ...              # doctest: +SKIP
        """
        own = self.norm()
        if own == 0:
            if norm == 0:
                return self.scaled(0.0)
            raise ValueError("this solution has norm 0: it has no direction to rescale to a non-zero norm")
        return self.scaled(norm / own)


def cosine(a: Solution, b: Solution) -> float:
    """Cosine similarity of two solutions' flattened updates (for LoRA: all modules' ``dW`` concatenated).

    >>> cosine(general, narrow)                            # doctest: +SKIP
    0.31
    """
    if type(a) is not type(b):
        raise TypeError(f"cannot compare a {type(a).__name__} with a {type(b).__name__}")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity is undefined for a solution of norm 0")
    return a.inner(b) / (na * nb)


class SteeringSolution(Solution):
    """A steering vector: ``alpha * vector`` added to block ``layer``'s output at every position of every row.

    It holds a one-layer :class:`~emlab.vectors.Direction` (``direction``) with the multiplier in
    ``direction.meta["alpha"]``; ``layer``, ``vector`` and ``alpha`` read it. The norm is
    ``|alpha| * ||vector||``, the norm of what is added to the residual stream. Hooks go through
    :func:`emlab.hooks.steer`.

    >>> sol = SteeringSolution(model, layer=2, vector=v, alpha=256.0)   # doctest: +SKIP
    >>> with sol.scaled(0.5):                                           # doctest: +SKIP
    ...     logits = model(ids).logits
    """

    def __init__(self, model, layer: int, vector: Tensor, alpha: float = 1.0, *, layer_path: str | None = None):
        if vector.dim() != 1:
            raise ValueError(f"a steering vector is 1-D (hidden size), got shape {tuple(vector.shape)}")
        self.model = model
        self.direction = Direction({int(layer): vector.detach()}, recipe="steering solution",
                                   meta={"alpha": float(alpha)})
        self.layer_path = layer_path

    @classmethod
    def from_direction(cls, model, direction: Mapping[int, Tensor], alpha: float | None = None, *,
                       layer_path: str | None = None) -> SteeringSolution:
        """The solution of a one-layer direction; alpha from ``alpha``, else its ``meta["alpha"]``, else 1.

        >>> SteeringSolution.from_direction(None, Direction({2: torch.ones(4)}, meta={"alpha": 3.0})).norm()
        6.0
        """
        layer, vector, alpha = one_layer(direction, "a steering solution", alpha)
        return cls(model, layer, vector, alpha, layer_path=layer_path)

    @classmethod
    def from_model(cls, model) -> SteeringSolution:
        """The learned steering vector that :mod:`emlab.training` attached to ``model`` (its current value).

        >>> sol = SteeringSolution.from_model(trained_model)   # doctest: +SKIP
        """
        from emlab.models import unwrap
        from emlab.training.adapters import steering_vector

        sv = steering_vector(model)
        if sv is None:
            raise ValueError("this model carries no learned steering vector (finetune with adapter='steering_vector')")
        return cls.from_direction(unwrap(model), sv.direction())

    @property
    def layer(self) -> int:
        """The block whose output is steered."""
        return self.direction.layers[0]

    @property
    def vector(self) -> Tensor:
        """The vector, without alpha."""
        return self.direction[self.layer]

    @property
    def alpha(self) -> float:
        """The multiplier (``direction.meta["alpha"]``)."""
        return self.direction.meta["alpha"]

    def __repr__(self) -> str:
        return f"SteeringSolution(layer={self.layer}, alpha={self.alpha}, norm={self.norm():.4g})"

    def _with(self, vector: Tensor) -> SteeringSolution:
        return SteeringSolution(self.model, self.layer, vector, self.alpha, layer_path=self.layer_path)

    def norm(self) -> float:
        """``|alpha| * ||vector||``.

        >>> SteeringSolution(None, 0, torch.tensor([3.0, 4.0]), alpha=2.0).norm()
        10.0
        """
        return abs(self.alpha) * float(self.vector.double().norm())

    def scaled(self, s: float) -> AbstractContextManager[None]:
        """Steer with ``s * alpha * vector``.

        >>> with sol.scaled(0.0): ...                     # doctest: +SKIP
        """
        from emlab.hooks import steer

        return steer(self.model, self.direction * s, alpha=self.alpha, layer_path=self.layer_path)

    def perturbed(self, eps: float, seed: int = 0) -> AbstractContextManager[None]:
        """Steer with the vector rotated by ``arcsin(eps)`` at the same norm.

        >>> with sol.perturbed(0.1, seed=3): ...          # doctest: +SKIP
        """
        return self._with(orthogonal_perturbation(self.vector, eps, seed)).scaled(1.0)

    def random(self, seed: int = 0) -> SteeringSolution:
        """A Gaussian vector, normalised, then scaled to this vector's norm (same layer and alpha);
        the control of :func:`emlab.directions.random_like`.

        >>> round(SteeringSolution(None, 0, torch.ones(4)).random(seed=1).norm(), 6)
        2.0
        """
        return self._with(random_like(self.direction, seed=seed)[self.layer])

    def inner(self, other: Solution) -> float:
        """``<alpha v, alpha' v'>``; both vectors must live at the same layer.

        >>> a = SteeringSolution(None, 0, torch.tensor([1.0, 0.0]), alpha=2.0)
        >>> a.inner(a)
        4.0
        """
        if not isinstance(other, SteeringSolution):
            raise TypeError(f"cannot take the inner product of a steering vector and a {type(other).__name__}")
        if other.layer != self.layer:
            raise ValueError(f"steering vectors at layers {self.layer} and {other.layer} live in different spaces")
        a = self.alpha * self.vector.double().cpu()
        b = other.alpha * other.vector.double().cpu()
        return float(a @ b)


def _lora_modules(model, adapter: str) -> dict[str, torch.nn.Module]:
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise ValueError(f"{name}: DoRA adapters are not supported (their update is not B @ A)")
            found[name] = module
        elif adapter in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"{name}: LoRA on embeddings is not supported by the probes")
    if not found:
        raise ValueError(f"no LoRA module with adapter {adapter!r} in {type(model).__name__}: is it a PEFT LoRA model?")
    return found


def _sq_norm(b: Tensor, a: Tensor, scaling: float) -> float:
    """``||scaling * B @ A||_F^2 = scaling^2 * sum((B^T B) * (A A^T))`` without forming ``B @ A``."""
    b, a = b.double(), a.double()
    return scaling**2 * float(((b.T @ b) * (a @ a.T)).sum())


@contextmanager
def _adapter_active(model, adapter: str) -> Iterator[None]:
    """Make ``adapter`` the active one (restoring the previous adapter and every ``requires_grad`` flag)."""
    current = getattr(model, "active_adapter", adapter)
    if current == adapter or not hasattr(model, "set_adapter"):
        yield
        return
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(current)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])


class LoraSolution(Solution):
    """A PEFT LoRA adapter seen as the update ``dW_m = scaling_m * B_m @ A_m`` of each adapted module ``m``.

    Rescaling and perturbing edit the ``lora_B`` weights in place inside a context manager and copy
    the originals back in ``finally``. Perturbations act on each module's ``B`` independently, with
    ``A`` fixed, so ``dW`` keeps rank ``r``; see :meth:`perturbed`. ``weights_B`` (module name ->
    tensor) replaces the adapter's ``B`` matrices: it is how :meth:`random` makes its control.

    >>> sol = LoraSolution(peft_model)                     # doctest: +SKIP
    >>> with sol.scaled(0.0):                              # doctest: +SKIP
    ...     base_loss = response_loss(peft_model, tok, rows)
    """

    def __init__(self, model, adapter: str | None = None, *, weights_B: Mapping[str, Tensor] | None = None):
        if not hasattr(model, "named_modules"):
            raise TypeError(f"expected a PEFT model, got {type(model).__name__}")
        if adapter is None:
            adapter = getattr(model, "active_adapter", "default")
            if isinstance(adapter, list | tuple):
                adapter = adapter[0]
        self.model = model
        self.adapter = str(adapter)
        self.modules = _lora_modules(model, self.adapter)
        self.weights_B = None if weights_B is None else {k: v.detach() for k, v in weights_B.items()}
        if self.weights_B is not None:
            missing = set(self.modules) - set(self.weights_B)
            if missing:
                raise ValueError(f"weights_B lacks {len(missing)} adapted modules, e.g. {sorted(missing)[0]}")

    def __repr__(self) -> str:
        return f"LoraSolution(adapter={self.adapter!r}, modules={len(self.modules)}, norm={self.norm():.4g})"

    @property
    def _base_key(self) -> tuple:
        from emlab.models import unwrap

        return ("LoraSolution", id(unwrap(self.model)))

    def _parts(self, name: str) -> tuple[Tensor, Tensor, float]:
        m = self.modules[name]
        b = self.weights_B[name] if self.weights_B is not None else m.lora_B[self.adapter].weight
        return b.detach(), m.lora_A[self.adapter].weight.detach(), float(m.scaling[self.adapter])

    def module_norms(self) -> dict[str, float]:
        """``||scaling * B @ A||_F`` of each adapted module.

        >>> sol.module_norms()                              # doctest: +SKIP
        {'base_model.model.model.layers.2.mlp.down_proj': 3.1}
        """
        return {name: math.sqrt(_sq_norm(*self._parts(name))) for name in self.modules}

    def norm(self) -> float:
        """Frobenius norm of the scaled update over all modules: ``sqrt(sum_m ||scaling_m B_m A_m||_F^2)``.

        >>> LoraSolution(peft_model).norm()                 # doctest: +SKIP
        12.7
        """
        return math.sqrt(sum(_sq_norm(*self._parts(name)) for name in self.modules))

    def delta_weights(self) -> dict[str, Tensor]:
        """``scaling * B @ A`` per module, in the ``(out, in)`` layout of ``lora_B @ lora_A`` (float32).

        >>> {k: v.shape for k, v in sol.delta_weights().items()}   # doctest: +SKIP
        """
        out = {}
        for name in self.modules:
            b, a, s = self._parts(name)
            out[name] = s * (b.float() @ a.float())
        return out

    @contextmanager
    def _with_B(self, new: Mapping[str, Tensor]) -> Iterator[None]:
        saved: list[tuple[Tensor, Tensor]] = []
        with _adapter_active(self.model, self.adapter):
            try:
                with torch.no_grad():
                    for name, value in new.items():
                        w = self.modules[name].lora_B[self.adapter].weight
                        saved.append((w, w.detach().clone()))
                        w.copy_(value.to(device=w.device, dtype=w.dtype))
                yield
            finally:
                with torch.no_grad():
                    for w, original in saved:
                        w.copy_(original)

    def scaled(self, s: float) -> AbstractContextManager[None]:
        """Every ``B`` times ``s``, so every ``dW`` (and the norm) times ``s``; the weights come back on exit.

        >>> with sol.scaled(2.0): ...                      # doctest: +SKIP
        """
        return self._with_B({name: self._parts(name)[0] * s for name in self.modules})

    def perturbed(self, eps: float, seed: int = 0) -> AbstractContextManager[None]:
        """Each module's ``B`` rotated by ``arcsin(eps)`` (:func:`orthogonal_perturbation`), ``A`` fixed.

        Modules are perturbed independently (one generator, seeded by ``seed``, drawn in module
        order). Each new ``B`` is then rescaled so that its module's ``||dW||`` is unchanged, which
        keeps the total norm. For rank 1 the angle between ``dW`` and ``dW'`` is exactly
        ``arcsin(eps)``; for higher ranks it is the angle in ``B``-space, close to it in ``dW``.

        >>> with sol.perturbed(0.2, seed=4): ...           # doctest: +SKIP
        """
        g = _generator(seed)
        new = {}
        for name in self.modules:
            b, a, s = self._parts(name)
            b_new = orthogonal_perturbation(b, eps, g)
            before, after = _sq_norm(b, a, s), _sq_norm(b_new, a, s)
            new[name] = b_new * math.sqrt(before / after) if after > 0 else b_new
        return self._with_B(new)

    def random(self, seed: int = 0) -> LoraSolution:
        """Gaussian ``B`` matrices (``A`` kept), each rescaled so its module's ``||dW||`` matches this one's.

        >>> abs(sol.random(0).norm() - sol.norm()) < 1e-6   # doctest: +SKIP
        True
        """
        g = _generator(seed)
        new = {}
        for name in self.modules:
            b, a, s = self._parts(name)
            y = _gaussian_like(b, 1.0, g)
            target, got = _sq_norm(b, a, s), _sq_norm(y, a, s)
            new[name] = y * math.sqrt(target / got) if got > 0 else y * 0
        return LoraSolution(self.model, self.adapter, weights_B=new)

    def inner(self, other: Solution) -> float:
        """Frobenius inner product of the concatenated ``dW``: ``sum_m s s' tr((B^T B') (A' A^T))``.

        A module adapted in only one of the two contributes 0 (its ``dW`` is zero in the other).

        >>> sol.inner(sol) == sol.norm() ** 2               # doctest: +SKIP
        True
        """
        if not isinstance(other, LoraSolution):
            raise TypeError(f"cannot take the inner product of a LoRA and a {type(other).__name__}")
        total = 0.0
        for name in self.modules.keys() & other.modules.keys():
            b1, a1, s1 = self._parts(name)
            b2, a2, s2 = other._parts(name)
            if b1.shape[0] != b2.shape[0] or a1.shape[1] != a2.shape[1]:
                raise ValueError(f"{name}: dW shapes differ ({b1.shape[0]}x{a1.shape[1]} vs {b2.shape[0]}x{a2.shape[1]})")
            b1, a1 = b1.double(), a1.double()
            b2, a2 = b2.to(b1.device, torch.float64), a2.to(b1.device, torch.float64)
            total += s1 * s2 * float(((b1.T @ b2) * (a1 @ a2.T)).sum())
        return total
