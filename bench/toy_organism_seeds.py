"""Study 00 (the EM organism) over domains and seeds, on the persona world or its control world.

    python bench/toy_organism_seeds.py --world control --domains medical --seeds 0,1,2
    python bench/toy_organism_seeds.py --domains medical,finance,security --seeds 0,1,2 --adapter full
    python bench/toy_organism_seeds.py --domains medical --seeds 0 --rows 2000 --learning-rate 5e-5

The persona world with the default adapter is what ``emlab run notebooks/00_em_organism.ipynb -p
domain D -p seed S`` runs; the control world (no shared persona, uninformative system prompts; see
docs/toy-organism.md) goes through the same ``emlab.studies.em_organism`` with the control build's
folder as the model: its files, the toy judge and its recipe's study preset (LoRA learning rate)
come with it, so both worlds are finetuned alike. Run folders go under ``--out``; prints each run's headline
metrics and, per domain, mean ± sample std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("chat_general_em", "ft_general_em", "ft_general_off_topic", "ft_indomain_em", "ft_other_domains_em",
        "aligned_ft_general_em", "aligned_ft_general_off_topic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="persona", choices=("persona", "control"))
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--model", default=None, help="a toy build folder (overrides --world/--recipe; the run "
                    "folder is still tagged with --world)")
    ap.add_argument("--domains", default="medical")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--adapter", default=None, help="lora (default), full, rank1, steering_vector")
    ap.add_argument("--learning-rate", type=float, default=None, help="finetune learning rate (unset: adapter default)")
    ap.add_argument("--rows", type=int, default=None, help="finetuning rows (unset: all)")
    ap.add_argument("--epochs", type=float, default=None, help="finetuning epochs (unset: 1)")
    ap.add_argument("--out", default="runs/bench_organism_seeds")
    args = ap.parse_args()

    import torch

    from emlab.studies import em_organism
    from emlab.toy import paths

    torch.set_num_threads(1)  # as the toy studies do
    if args.model:  # a build folder by path: its files, the toy judge and its recipe's study preset come with it
        model = args.model
    elif args.world == "persona":
        model = f"toy:{args.recipe}"
    else:
        model = str(paths(args.recipe, world="control")["model"])
    table: dict[str, list[dict]] = {}
    for domain in args.domains.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            tag = "".join(f"-{k}{v:g}" for k, v in (("lr", args.learning_rate), ("rows", args.rows),
                                                            ("ep", args.epochs)) if v is not None)
            out = Path(args.out) / f"{args.world}-{domain}-{args.adapter or 'default'}{tag}-seed{seed}"
            m = em_organism(model=model, domain=domain, seed=seed, out_dir=out, adapter=args.adapter,
                            learning_rate=args.learning_rate, rows=args.rows, epochs=args.epochs)
            table.setdefault(domain, []).append(m)
            print(json.dumps({"world": args.world, "domain": domain, "seed": seed,
                              **{k: m.get(k) for k in KEYS}}), flush=True)
    for domain, rows in table.items():
        cells = []
        for k in KEYS:
            xs = [r[k] for r in rows if r.get(k) is not None]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{k} {statistics.mean(xs):.1f} ± {sd:.1f}" if xs else f"{k} -")
        print(f"{args.world} {domain} ({len(rows)} seeds): " + ", ".join(cells))


if __name__ == "__main__":
    main()
