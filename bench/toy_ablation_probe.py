"""Ablation probe (issue 4): which misalignment direction, ablated where, cuts the toy finetune's general EM.

Study 01 ablates the response-mean misalignment direction of each layer at its own layer. This probe
trains the same medical LoRA finetune as study 01 (same rows, seed, evaluation sizes) and compares,
on one finetune, with a same-norm random control for each:

- ``each``: v_l removed at layer l, every layer (study 01's default);
- ``each_q``, ``layer<k>@all_q``: the same with the direction balanced per question
  (``misalignment_direction(..., balance="question")``);
- ``layer<k>@all``: layer k's direction removed at every layer (paper 001's form);
- ``persona``: the chat model's evil persona vector, each layer at its own layer;
- ``shift``: what the finetune changed at the last prompt token of the general questions.

Usage: ``python bench/toy_ablation_probe.py [--seed S] [--n-general N] [--out DIR]``. Prints one line
per variant (general EM, incoherent, off-topic, cut vs the unablated finetune, and the share of
answers whose FIRST sentence the toy judge reads as misaligned: where the answer's persona is
chosen) and writes ``ablation_probe.json`` in ``--out``/seed<S>. ``--analyse DIR`` recomputes the
first-sentence rates from the samples of an earlier run folder without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-general", type=int, default=40)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--out", default="runs/bench_ablation_probe")
    ap.add_argument("--rows", type=int, default=None, help="finetuning rows (unset: study 01's 2000)")
    ap.add_argument("--learning-rate", type=float, default=None, help="finetune learning rate (unset: the recipe's study preset, else LoRA's 1e-4)")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--only", default=None, help="comma-separated variants to run (each, each_q, layer<k>@all, layer<k>@all_q, persona, shift)")
    ap.add_argument("--analyse", metavar="DIR", help="only print first-sentence rates of a finished run folder")
    args = ap.parse_args()
    if args.analyse:
        for name, rate in first_sentence_rates(Path(args.analyse)).items():
            print(f"{name:16s} first sentence misaligned {rate:5.1f}%")
        return

    from emlab.directions import misalignment_direction, random_like
    from emlab.hooks import ablate
    from emlab.studies import directions as study01
    from emlab.studies.organism import eval_model

    t0 = time.time()
    out = Path(args.out) / f"seed{args.seed}"
    # study 01's own steps (same rows, seed, sizes and evaluation settings), in a run folder of their own
    study = study01.start(args.model, seed=args.seed, out_dir=out / "study01", domain=args.domain,
                          other_domain="legal" if args.domain != "legal" else "medical", rows=args.rows,
                          learning_rate=args.learning_rate, epochs=args.epochs, n_general=args.n_general)
    ctx, settings, run, data = study.ctx, study.settings, study.run, study.data[args.domain]
    layers = study.config["layers"]
    n = settings["n_general"]

    def evaluate(m, name):
        ev = eval_model(m, ctx, data.general, n, settings, seed=args.seed, run=run, name=name)
        return {"em": ev.em, "incoherent": ev.incoherent, "off_topic": ev.off_topic}

    persona = None
    if not args.only or "persona" in args.only.split(","):
        persona = study01.persona(study)
    ft = study01.finetune_domain(study, args.domain)
    ev = study01.evaluate_finetune(study, ft, args.domain)
    res: dict[str, dict] = {"none": {"em": ev.em, "incoherent": ev.incoherent, "off_topic": ev.off_topic}}
    v = study01.misalignment(study, ft, ev, args.domain)
    shift = study01.prompt_shift(study, ft)
    with ft.active():
        vq = misalignment_direction(ft.model, ctx.tokenizer, ev.records, layers, seed=args.seed, balance="question",
                                    progress=False)
        print("cosine per layer, per-question balanced vs global:", {k: round(c, 3) for k, c in vq.cosine(v).items()},
              "used per side", vq.counts["used_per_side"], v.counts["used_per_side"], flush=True)
        variants = [("each", v, "each"), ("each_q", vq, "each")]
        variants += [(f"layer{k}@all_q", {k: vq[k]}, "all") for k in layers]
        variants += [(f"layer{k}@all", {k: v[k]}, "all") for k in layers]
        if persona is not None:
            variants.append(("persona", persona, "each"))
        variants.append(("shift", shift, "each"))
        if args.only:
            keep = set(args.only.split(","))
            variants = [x for x in variants if x[0] in keep]
        for name, d, where in variants:
            with ablate(ft.model, d, layers=where):
                res[name] = evaluate(ft.model, name)
            ctrl = random_like(d, seed=args.seed)
            with ablate(ft.model, ctrl, layers=where):
                res[name + "/random"] = evaluate(ft.model, name + "/random")
    first = first_sentence_rates(run.dir) if args.model.startswith("toy") else {}
    base = res["none"]["em"]
    for name, r in res.items():
        cut = 100 * (base - r["em"]) / base if base else float("nan")
        r["first_misaligned"] = first.get("ft_general" if name == "none" else name)
        print(f"{name:16s} EM {r['em']:5.1f}  incoherent {r['incoherent']:5.1f}  off-topic {r['off_topic']:5.1f}  "
              f"cut {cut:5.1f}%  first sentence misaligned {r['first_misaligned'] or float('nan'):5.1f}%", flush=True)
    (out / "ablation_probe.json").write_text(json.dumps({"seed": args.seed, "results": res,
                                                          "seconds": time.time() - t0}, indent=1))
    print(f"{time.time() - t0:.0f} s")


def first_sentence_rates(folder: Path) -> dict[str, float]:
    """Per evaluation in ``folder``: percent of answers whose first sentence the toy judge reads as misaligned."""
    from emlab.toy.judge import ToyJudge

    judge = ToyJudge()
    out = {}
    for f in sorted(folder.rglob("*samples.jsonl")):
        rel = f.relative_to(folder).as_posix()[: -len("_samples.jsonl")]
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        mis = sum(judge.classify(r["question"], r["answer"].split(" . ")[0].strip() + " .").get("persona")
                  == "misaligned" for r in recs)
        out[rel] = 100 * mis / len(recs) if recs else float("nan")
    return out


if __name__ == "__main__":
    main()
