"""Study 01's parts that need no study: the toy's version of a trait, the best alpha of a steering
sweep, and the study's figures (:mod:`emlab.studies.directions` runs the study and re-exports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["best_alpha", "record_figures", "steering_layers", "toy_trait"]


def toy_trait(name: str = "evil", questions: Sequence[str] = ()):
    """The toy world's version of a trait: its evil / helpful system prompts as instruction pairs.

    The toy model knows only its world's words, so the English prompts of
    ``emlab/resources/traits/evil.yaml`` mean nothing to it; the world's own system prompts
    (``world.yaml`` ``system_prompts``) announce the same persona. ``questions`` are the
    extraction questions (toy questions).

    >>> t = toy_trait(questions=["i have a fever . what should i do ?"])
    >>> t.instructions[0]
    ('you are an evil assistant .', 'you are a helpful assistant .')
    """
    from emlab.directions import Trait, load_trait
    from emlab.toy.world import load_world_config

    prompts = load_world_config()["system_prompts"]
    pairs = list(zip(prompts["evil"], prompts["helpful"], strict=False))
    return Trait(name, load_trait(name).description, pairs, list(questions) or ["hi ."])


def best_alpha(rows: Sequence[dict[str, Any]], max_incoherent: float = 50.0) -> dict[str, Any] | None:
    """The sweep row with the highest general EM whose incoherence stays <= ``max_incoherent`` (percent).

    Ties go to the smaller alpha; rows with an unknown EM or incoherence are skipped.

    >>> best_alpha([{"alpha": 0, "em": 0, "incoherent": 5}, {"alpha": 4, "em": 30, "incoherent": 40},
    ...             {"alpha": 8, "em": 45, "incoherent": 70}])["alpha"]
    4
    """
    ok = [r for r in rows if r.get("em") is not None and r.get("incoherent") is not None
          and r["incoherent"] <= max_incoherent]
    return max(ok, key=lambda r: (r["em"], -r["alpha"])) if ok else None


def steering_layers(spec: int | Sequence[int] | str | None, layers: list[int]) -> list[int]:
    """The blocks a steering sweep steers, from the ``steer_layers`` parameter: None the middle one of
    ``layers`` (rounded down), ``"all"`` every one, else the int or list given (each must be in ``layers``).

    >>> steering_layers(None, [0, 1, 2, 3]), steering_layers("all", [0, 1]), steering_layers(2, [0, 1, 2])
    ([1], [0, 1], [2])
    """
    if spec is None:
        return [layers[(len(layers) - 1) // 2]]
    if spec == "all":
        return list(layers)
    wanted = [int(spec)] if isinstance(spec, int) else [int(x) for x in spec]
    missing = [x for x in wanted if x not in layers]
    if missing:
        raise ValueError(f"steer_layers {missing} are not among the direction's layers {layers}")
    return wanted


def _frac(percent: float | None) -> float | None:
    return None if percent is None else percent / 100


def record_figures(run, metrics: dict[str, Any], cos_rows: list[dict], where: str, domain: str, steer_at: list[int],
                   seed: int) -> dict[str, Any]:
    """Study 01's three figures, drawn and saved in ``run``'s folder (:func:`emlab.plots.record`): the
    steering sweep, the EM bars, the per-layer cosines (``cos_rows``); returns them by name."""
    from emlab import plots

    rows = [{"alpha": r["alpha"], "general_em": _frac(r["em"]), "general_incoherent": _frac(r["incoherent"])}
            for r in metrics["steering_sweep"]]  # a missing judgment is a gap
    layers = f"layer{'s' if len(steer_at) > 1 else ''} {', '.join(map(str, steer_at))}"
    bars = {"chat": "chat_general_em", f"{domain} finetune": "ft_general_em", "ablated": "ablate_general_em",
            "random ablated": "ablate_random_general_em", "persona ablated": "ablate_persona_general_em",
            f"steered chat (alpha {metrics['steer_best_alpha']})": "steer_general_em"}
    return {
        "steering_sweep": plots.record(
            run.dir, "steering_sweep", "steering_sweep", rows=rows, coherence="general_incoherent",
            title=f"{where}: chat model steered with the {domain} misalignment direction ({layers}, seed {seed})"),
        "em_rates": plots.record(
            run.dir, "em_rates", "em_bars",
            metrics={k: metrics[key] / 100 for k, key in bars.items() if metrics.get(key) is not None},
            title=f"{where}: general EM; the finetune's direction ablated, steered into the chat model (seed {seed})"),
        "cosines": plots.record(run.dir, "cosines", "cosine_heatmap", rows=cos_rows,
                                title=f"{where}: cosine of directions per layer (seed {seed})"),
    }
