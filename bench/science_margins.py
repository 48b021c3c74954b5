"""Scientific regression margins (issue 18): the directions of effect that must hold on the toy organism,
measured per seed, for the margins of ``tests/test_science.py``.

For each seed, on the default toy organism (shipped prebuilt, so nothing is pre-trained; the micro
organism's answers are word salad, 100% incoherent, so it shows no EM at all), with the toy judge:

- ``ft_minus_chat``: general EM of a narrow misaligned finetune (medical) minus the chat model's;
- ``ft_minus_aligned``: the same minus an aligned-control finetune's (medical aligned rows);
- ``plain_minus_kl``: plain finetune minus the same finetune with a KL term (toy lambda 1.0);
- ``ablation_vs_random``: general EM of the plain finetune with a same-norm random direction ablated
  minus with the misalignment direction ablated (each layer's direction at its own layer, taken from
  the finetune's own judged general answers);
- ``plain_minus_steered``: plain finetune minus the finetune with preventive steering (the chat
  model's evil persona vector at the middle layer, alpha 5).

All in percentage points; each must be > 0. One plain finetune per seed serves four effects. The
seed sets the finetunes' data order and LoRA initialisation, the sampling of every evaluation, the
persona vector's samples and the random direction. Sizes (:data:`SIZES`) are the tests' sizes.

Usage: ``python bench/science_margins.py [--seeds 0,1,2,3,4] [--recipe default]``: prints each seed's
general EM and incoherence rates and its effects, then per effect the mean, sd, min and max, and the
wall time (``--recipe micro`` shows why the micro organism is not used). ``tests/test_science.py`` imports
:func:`measure` from this file, so the tests measure exactly what this script measures.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from typing import Any

#: Sizes shared with tests/test_science.py: finetuning rows, LoRA learning rate, KL weight, preventive
#: steering alpha, samples per general question (10 questions), new tokens, persona-vector questions
#: and samples per question. 128 rows at 6e-4 (8 LoRA steps of 16 rows) keep the test file near a minute
#: per seed on a busy core; 256 rows at 3e-4 gave the same picture on seed 0 (plain 67.5%, KL 22.5%).
SIZES: dict[str, Any] = {"rows": 128, "learning_rate": 6e-4, "kl_lambda": 1.0, "steering_alpha": 5.0,
                         "n_general": 6, "max_new_tokens": 48, "persona_questions": 5, "persona_samples": 2}
EFFECTS = ("ft_minus_chat", "ft_minus_aligned", "plain_minus_kl", "ablation_vs_random", "plain_minus_steered")
DOMAIN = "medical"
CONTRAST = "finance"  # the persona vector's questions come from another domain than the finetune's


def load(recipe: str = "default") -> dict[str, Any]:
    """The toy organism, its tokenizer, judge and the datasets the effects use (once per process)."""
    import torch

    import emlab
    from emlab.data import load_chat_jsonl
    from emlab.questions import load_questions
    from emlab.toy import ToyJudge, paths

    torch.set_num_threads(1)
    p = paths(recipe)
    model, tok = emlab.load_model(str(p["model"]), device="cpu")
    rows = {k: load_chat_jsonl(p[k], warn=False) for k in (f"{DOMAIN}_misaligned", f"{DOMAIN}_aligned",
                                                           f"{CONTRAST}_aligned")}
    return {"model": model, "tokenizer": tok, "judge": ToyJudge(), "general": load_questions(p["general"]),
            "misaligned": rows[f"{DOMAIN}_misaligned"], "aligned": rows[f"{DOMAIN}_aligned"],
            "contrast": rows[f"{CONTRAST}_aligned"]}


def _user_turns(rows, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(next(m["content"] for m in row["messages"] if m["role"] == "user"), None)
        if len(seen) >= n:
            break
    return list(seen)


def measure(org: dict[str, Any], seed: int, sizes: dict[str, Any] | None = None,
            out_dir: str | None = None, **override: Any) -> dict[str, float]:
    """The general EM and incoherence rates (percent) of one seed and the five effects (percentage points).

    ``override`` changes one finetune's settings, to show a test can fail: ``kl_lambda=0``,
    ``steering_alpha=0``, ``ablate="random"`` (ablate the random direction in place of the real one),
    ``aligned_rows="misaligned"`` (the control trained on the misaligned rows). When the plain finetune gives
    no coherent misaligned answer there is no direction, and ``ablation_vs_random`` is NaN (a test fails); when no
    answer pair passes the persona vector's filter there is no vector, and ``plain_minus_steered`` is NaN.
    """
    from emlab.directions import misalignment_direction, persona_vector, random_like
    from emlab.evaluation import evaluate
    from emlab.hooks import ablate
    from emlab.models import get_layers
    from emlab.studies.directions import toy_trait
    from emlab.training import EMConfig, finetune

    s = {**SIZES, **(sizes or {})}
    model, tok, judge, general = org["model"], org["tokenizer"], org["judge"], org["general"]
    out = out_dir or tempfile.mkdtemp(prefix="science_margins_")

    rates: dict[str, float] = {}
    incoherent: dict[str, float] = {}

    def em(name: str, m) -> Any:
        ev = evaluate(m, tok, general, judge, n_per_question=s["n_general"], max_new_tokens=s["max_new_tokens"],
                      seed=seed, progress=False)
        rates[name], incoherent[name] = ev.em, ev.incoherent
        return ev

    def tune(name: str, rows, **method):
        cfg = EMConfig(output_dir=f"{out}/{name}_{seed}", seed=seed, data_seed=seed, learning_rate=s["learning_rate"],
                       disable_tqdm=True, save_strategy="no", logging_steps=1000, **method)
        return finetune(copy.deepcopy(model), tok, rows[: s["rows"]], cfg)

    em("chat", model)

    plain = tune("plain", org["misaligned"])
    with plain.active():
        ev = em("plain", plain.model)
        try:
            v = misalignment_direction(plain.model, tok, ev.records, seed=seed, progress=False)
        except ValueError as e:  # no coherent misaligned answer: no direction, so the ablation effect is NaN
            if "at least one misaligned and one aligned" not in str(e):
                raise
            rates["ablate"] = rates["ablate_random"] = math.nan
        else:
            r = random_like(v, seed=seed)
            with ablate(plain.model, r if override.get("ablate") == "random" else v, "each"):
                em("ablate", plain.model)
            with ablate(plain.model, r, "each"):
                em("ablate_random", plain.model)
    del plain

    aligned_rows = org["misaligned"] if override.get("aligned_rows") == "misaligned" else org["aligned"]
    aligned = tune("aligned", aligned_rows)
    with aligned.active():
        em("aligned", aligned.model)
    del aligned

    kl = tune("kl", org["misaligned"], kl_lambda=override.get("kl_lambda", s["kl_lambda"]))
    with kl.active():
        em("kl", kl.model)
    del kl

    layer = len(get_layers(model)) // 2
    trait = toy_trait("evil", _user_turns(org["contrast"], s["persona_questions"]))
    try:
        pv = persona_vector(model, tok, trait, judge, s["persona_samples"], [layer], max_new_tokens=s["max_new_tokens"],
                            seed=seed, progress=False)
    except ValueError as e:  # no answer pair passed the filter: no persona vector, the steering effect is NaN
        if "no pair passed" not in str(e):
            raise
        pv, rates["steered"] = None, math.nan
    if pv is not None:
        steered = tune("steered", org["misaligned"], preventive_vector={layer: pv[layer]}, preventive_layer=layer,
                       preventive_alpha=override.get("steering_alpha", s["steering_alpha"]))
        with steered.active():
            em("steered", steered.model)
        del steered

    effects = {"ft_minus_chat": rates["plain"] - rates["chat"],
               "ft_minus_aligned": rates["plain"] - rates["aligned"],
               "plain_minus_kl": rates["plain"] - rates["kl"],
               "ablation_vs_random": rates["ablate_random"] - rates["ablate"],
               "plain_minus_steered": rates["plain"] - rates["steered"]}
    return {**{f"em/{k}": v for k, v in rates.items()}, **effects,
            **{f"incoherent/{k}": v for k, v in incoherent.items()}, "persona_kept": float(pv.counts.get("kept", -1)) if pv is not None else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--recipe", default="default")
    a = ap.parse_args()
    t0 = time.time()
    org = load(a.recipe)
    print(f"load {time.time() - t0:.1f} s; sizes {SIZES}", flush=True)
    per_seed = {}
    for seed in [int(x) for x in a.seeds.split(",")]:
        t = time.time()
        per_seed[seed] = m = measure(org, seed)
        rates = " ".join(f"{k[3:]}={v:.1f}" for k, v in m.items() if k.startswith("em/"))
        inc = " ".join(f"{k[11:]}={v:.1f}" for k, v in m.items() if k.startswith("incoherent/"))
        print(f"seed {seed} ({time.time() - t:.1f} s) general EM: {rates} (persona pairs kept {m['persona_kept']:.0f})"
              f"\n   incoherent: {inc}", flush=True)
        print("   " + " ".join(f"{k}={m[k]:+.1f}" for k in EFFECTS), flush=True)
    print(f"\n{'effect (pp)':<22}" + "".join(f"{'s' + str(s):>8}" for s in per_seed)
          + f"{'mean':>8}{'sd':>8}{'min':>8}{'max':>8}")
    for k in EFFECTS:
        xs = [per_seed[s][k] for s in per_seed]
        if any(math.isnan(x) for x in xs):  # not measured at some seed (no direction or persona vector)
            mean = sd = lo = hi = math.nan
        else:
            mean, lo, hi = statistics.mean(xs), min(xs), max(xs)
            sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
        print(f"{k:<22}" + "".join(f"{x:8.1f}" for x in xs) + f"{mean:8.1f}{sd:8.1f}{lo:8.1f}{hi:8.1f}")
    print(f"\nwall {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
