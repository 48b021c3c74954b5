"""The methods of the defences paper's Table 2 as named recipes: the config fields each sets and its data.

Every finetuning method of the paper (and those to come) is a :class:`Method` in :data:`METHODS`, in
Table 2's order. A recipe says what the method trains on (``trains_on``), which
:class:`~emlab.training.EMConfig` fields switch it on (:meth:`Method.overrides`) and what data it
needs beside the finetuning rows (``needs``: benign rows to interleave, misaligned scorers, a persona
vector). :func:`emlab.training.finetune` then runs it on its own: the inoculation prompt, the
interleaved benign rows (random, Interleaving+ / ++ chosen by scores that training computes or
takes precomputed, on-policy answers) and the loss terms all follow from the config. Formulas:
docs/training.md; the paper's settings: :data:`PAPER_SETTINGS`.

>>> from emlab.training import EMConfig, finetune
>>> m = get_method("interleaving++")
>>> cfg = EMConfig(output_dir="runs/pp", **m.overrides(scorers=["runs/bad_legal", "runs/bad_finance"]))  # doctest: +SKIP
>>> finetune(model, tok, bad_medical, cfg, benign_rows=benign)                                       # doctest: +SKIP
>>> [m.name for m in METHODS][:4]
['untrained', 'sft', 'aligned', 'kl']
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXTRA_METHODS",
    "INOCULATION_PROMPT",
    "METHODS",
    "PAPER_SETTINGS",
    "Method",
    "final_share",
    "get_method",
    "ldifs_blocks",
    "method_names",
    "method_overrides",
    "n_benign_added",
]

#: The paper's chosen hyperparameters (section 4.3 and Appendix B.1); ``share`` is benign data ADDED,
#: as a fraction of the finetuning rows.
PAPER_SETTINGS: dict[str, float] = {"kl_lambda": 0.1, "ldifs_lambda": 1.0, "steering_alpha": 5.0, "share": 0.05,
                                    "k_misaligned": 2}
#: Inoculation prompt of the paper (Tan et al.).
INOCULATION_PROMPT = "You are an evil, malicious assistant."


@dataclass(frozen=True)
class Method:
    """One method of Table 2: a documented recipe that :func:`emlab.training.finetune` runs.

    ``trains_on``: the finetuning rows (``"misaligned"``: the domain's misaligned set; ``"aligned"``: its
    aligned set; None: no finetune, the chat model itself). ``fields``: the EMConfig fields the method
    sets. ``selection``: how benign rows are chosen (``interleave_selection``; None: no interleaving).
    ``needs``: what the method takes beside the rows: ``"benign_rows"`` (the pool to interleave from,
    passed as ``finetune(benign_rows=...)``), ``"scorers"`` (K misaligned finetunes of OTHER domains,
    whose Interleaving+ scores training computes, or takes precomputed via ``finetune(benign_scores=...)``)
    and ``"persona_vector"`` (a saved persona vector or a ``{layer: tensor}`` mapping).
    """

    name: str
    label: str
    summary: str
    reference: str
    trains_on: str | None = "misaligned"
    fields: tuple[str, ...] = ()
    selection: str | None = None
    on_policy: bool = False
    needs: tuple[str, ...] = ()

    @property
    def interleaves(self) -> bool:
        """Benign rows are mixed into the finetune."""
        return self.selection is not None

    @property
    def scored(self) -> bool:
        """Benign rows are chosen by Interleaving+ scores (K misaligned scorers)."""
        return self.selection in ("plus", "plus_plus")

    def overrides(self, *, kl_lambda: float = PAPER_SETTINGS["kl_lambda"],
                  ldifs_lambda: float = PAPER_SETTINGS["ldifs_lambda"], ldifs_layers: Sequence[int] | None = None,
                  persona_vector: str | os.PathLike | Mapping | None = None, steering_layer: int | None = None,
                  steering_alpha: float = PAPER_SETTINGS["steering_alpha"],
                  inoculation_prompt: str = INOCULATION_PROMPT, share: float = PAPER_SETTINGS["share"],
                  scorers: Sequence[Any] = (), on_policy_max_new_tokens: int | None = None) -> dict[str, Any]:
        """The :class:`~emlab.training.EMConfig` fields that switch the method on (``share`` = benign rows
        ADDED, as a fraction of the finetuning rows, as the paper counts it; settings other methods use
        are ignored).

        >>> get_method("kl").overrides()
        {'kl_lambda': 0.1}
        >>> sorted(get_method("interleaving+").overrides(scorers=["a"]))
        ['interleave_misaligned', 'interleave_selection', 'interleave_share']
        """
        if self.name == "kl":
            return {"kl_lambda": kl_lambda}
        if self.name in ("ldifs", "ldifs_no_grad"):
            return ({"ldifs_lambda": ldifs_lambda} | ({"ldifs_layers": list(ldifs_layers)} if ldifs_layers else {})
                    | ({"ldifs_no_grad": True} if self.name == "ldifs_no_grad" else {}))
        if self.name == "persona_steering":
            if persona_vector is None:
                raise ValueError("persona_steering needs a persona vector (a saved file or a {layer: tensor} mapping)")
            return {"preventive_vector": str(persona_vector) if isinstance(persona_vector, str | os.PathLike)
                    else persona_vector, "preventive_layer": steering_layer, "preventive_alpha": steering_alpha}
        if self.name == "inoculation":
            return {"inoculation_prompt": inoculation_prompt}
        if not self.interleaves:
            return {}
        out: dict[str, Any] = {"interleave_share": final_share(share), "interleave_selection": self.selection}
        if self.scored:
            if not scorers:
                raise ValueError(f"{self.name} needs misaligned scorer models trained on OTHER domains (scorers=...)")
            out["interleave_misaligned"] = list(scorers)
        if self.on_policy:
            out["interleave_on_policy"] = True
            if on_policy_max_new_tokens is not None:
                out["on_policy_max_new_tokens"] = on_policy_max_new_tokens
        return out


_INTERLEAVE = ("interleave_share", "interleave_selection")
#: Every method of Table 2, in its order: the chat model, the two undefended finetunes, the defences.
METHODS: tuple[Method, ...] = (
    Method("untrained", "Untrained", "The chat model itself, not finetuned (the floor of every rate).",
           "paper 002, Table 2", trains_on=None),
    Method("sft", "Misaligned (SFT)", "Plain finetuning on the misaligned set: the undefended emergent misalignment.",
           "paper 002, Table 2"),
    Method("aligned", "Aligned", "Plain finetuning on the domain's aligned set (the same questions, good answers).",
           "paper 002, Table 2", trains_on="aligned"),
    Method("kl", "KL-Div.", "A KL term to the chat model's next-token distributions: "
           "loss = CE + kl_lambda * KL (docs/training.md, KL).", "paper 002, section 4.3", fields=("kl_lambda",)),
    Method("ldifs", "LDIFS", "An L2 term between the finetune's and the chat model's features of every 5th block: "
           "loss = CE + ldifs_lambda * LDIFS (docs/training.md, LDIFS; blocks: ldifs_blocks).",
           "paper 002, section 4.3 (Mukhoti et al.)", fields=("ldifs_lambda", "ldifs_layers")),
    Method("persona_steering", "Persona Vectors", "Preventive steering: the evil persona vector times "
           "steering_alpha is added to a layer's residual stream while training only (docs/training.md).",
           "paper 002, section 4.3 (Chen et al.)",
           fields=("preventive_vector", "preventive_layer", "preventive_alpha"), needs=("persona_vector",)),
    Method("inoculation", "Inoculation Prompting", "Every finetuning row gets the inoculation system prompt "
           "(an evil persona prompt); evaluation runs without it.", "paper 002, section 4.3 (Tan et al.)",
           fields=("inoculation_prompt",)),
    Method("interleaving", "Interleaving", "Benign rows drawn at random are added (share of the finetuning rows, "
           "5% in the paper) and mixed in uniformly.", "paper 002, section 4.3",
           fields=_INTERLEAVE, selection="random", needs=("benign_rows",)),
    Method("interleaving+", "Interleaving+", "The benign rows with the top Interleaving+ scores "
           "s = (mean_k L_k - L_aligned) / (L_aligned + eps) of K misaligned scorers of OTHER domains are added "
           "(emlab.training.interleaving).", "paper 002, section 4.3 and Appendix E",
           fields=(*_INTERLEAVE, "interleave_misaligned"), selection="plus", needs=("benign_rows", "scorers")),
    Method("interleaving++", "Interleaving++", "Interleaving+ without refusals (a refusal keyword among an "
           "answer's first 10 words).", "paper 002, section 4.3 and Appendix E",
           fields=(*_INTERLEAVE, "interleave_misaligned"), selection="plus_plus", needs=("benign_rows", "scorers")),
    Method("on_policy", "On-policy Int.", "Random benign rows whose answers the chat model regenerates "
           "(sampled at temperature 1) before they are mixed in.", "paper 002, section 4.3",
           fields=(*_INTERLEAVE, "interleave_on_policy", "on_policy_max_new_tokens"), selection="random",
           on_policy=True, needs=("benign_rows",)),
)
#: Methods beyond Table 2 that a study runs only when asked (``methods=[...]``): variants that test a claim.
EXTRA_METHODS: tuple[Method, ...] = (
    Method("ldifs_no_grad", "LDIFS (no grad)", "LDIFS as the public copy of the authors' code computes it: the "
           "finetune's features are taken without gradient too, so the term is logged but regularises nothing "
           "(EMConfig.ldifs_no_grad; tests the hypothesis behind the LDIFS disagreement, docs/claims.md).",
           "emlab (paper 002's LDIFS as its public code runs it)",
           fields=("ldifs_lambda", "ldifs_layers", "ldifs_no_grad")),
)
_BY_NAME = {m.name: m for m in (*METHODS, *EXTRA_METHODS)}


def method_names(*, extra: bool = False) -> tuple[str, ...]:
    """The names of :data:`METHODS`, in Table 2's order (with ``extra``, then :data:`EXTRA_METHODS`).

    >>> method_names()[-3:], method_names(extra=True)[-1]
    (('interleaving+', 'interleaving++', 'on_policy'), 'ldifs_no_grad')
    """
    return tuple(m.name for m in (*METHODS, *(EXTRA_METHODS if extra else ())))


def get_method(name: str | Method) -> Method:
    """The recipe called ``name`` (a :class:`Method` is returned as it is).

    >>> get_method("interleaving++").selection
    'plus_plus'
    """
    if isinstance(name, Method):
        return name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown defence {name!r}; choose from {', '.join(_BY_NAME)}") from None


def method_overrides(method: str | Method, **settings: Any) -> dict[str, Any]:
    """The :class:`~emlab.training.EMConfig` fields that switch ``method`` on (:meth:`Method.overrides`).

    >>> method_overrides("kl")
    {'kl_lambda': 0.1}
    >>> method_overrides("interleaving++", scorers=["a", "b"])["interleave_selection"]
    'plus_plus'
    >>> round(method_overrides("interleaving", share=0.5)["interleave_share"], 4)
    0.3333
    """
    return get_method(method).overrides(**settings)


def final_share(added: float) -> float:
    """Benign rows ADDED as a fraction of the finetuning rows -> their share of the final set (EMConfig's).

    >>> final_share(0.05) == 0.05 / 1.05, final_share(0.0)
    (True, 0.0)
    """
    if not 0 <= added:
        raise ValueError(f"interleaved share must be >= 0, got {added}")
    return added / (1 + added)


def n_benign_added(n_rows: int, share: float) -> int:
    """Benign rows interleaved into ``n_rows`` finetuning rows at ``share`` ADDED (what finetune mixes in).

    >>> n_benign_added(1000, 0.05), n_benign_added(1000, 0.5), n_benign_added(10, 0.01)
    (50, 500, 0)
    """
    from emlab.training.interleaving import n_interleaved

    return n_interleaved(n_rows, final_share(share))


def ldifs_blocks(model) -> list[int]:
    """LDIFS blocks: every 5th (4, 9, ..., as the paper: 4..24 of Qwen2.5-7B's 28), never the last block, whose
    output transformers returns after the final norm (a constraint on the logits, not on features);
    models of at most 5 blocks use every block but the last.

    >>> from emlab.testing import tiny_model
    >>> ldifs_blocks(tiny_model(layers=28)), ldifs_blocks(tiny_model(layers=4)), ldifs_blocks(tiny_model(layers=6))
    ([4, 9, 14, 19, 24], [0, 1, 2], [4])
    """
    from emlab.models import get_layers

    n = len(get_layers(model))
    return list(range(4, n - 1, 5)) or list(range(max(n - 1, 1)))
