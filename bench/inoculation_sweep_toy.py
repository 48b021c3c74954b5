"""Inoculation-prompt sweep on the default toy organism (docs/notebooks/06_beyond.md, "Elicitation against the cut").

One inoculated finetune per prompt with study 06's toy settings (1000 medical rows, LoRA lr 1e-4, 20
answers per general and held-out question), plus the plain SFT finetune the cut is measured against:
the elicitation score of each prompt on the chat model (first 200 training rows), the general EM of
its finetune without the prompt, the share of SFT's general EM it cuts, and Spearman's rho of the
scores against the cuts with a bootstrap 95% interval.

Run: PYTHONPATH=$PWD python bench/inoculation_sweep_toy.py [--out runs/inoculation_sweep] [--seed 0]
     [--prompts world paraphrases:evil_toy]   (11 toy finetunes: about 15-20 minutes on a busy CPU)
"""

import argparse
import json
import time
from pathlib import Path

from emlab.inoculation import inoculation_sweep, resolve_prompts
from emlab.studies.common import StudyContext, finetune_config, preset_learning_rate
from emlab.studies.defences import TOY_SETTINGS
from emlab.studies.organism import eval_model, eval_settings
from emlab.toy.world import load_world_config

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/inoculation_sweep")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--domain", default="medical")
parser.add_argument("--prompts", nargs="+", default=["world", "paraphrases:evil_toy"])
args = parser.parse_args()

start = time.perf_counter()
out = Path(args.out)
ctx = StudyContext.create("toy")
data = ctx.domain_data(args.domain, rows=TOY_SETTINGS["rows"])
settings = eval_settings(ctx, n_general=TOY_SETTINGS["n_general"], n_heldout=TOY_SETTINGS["n_heldout"])
config = finetune_config(out / "finetunes", seed=args.seed, preset=ctx.preset, protocol=ctx.protocol,
                         learning_rate=preset_learning_rate(TOY_SETTINGS, "lora"))


def evaluate(model, tag):
    cell = {}
    ev = eval_model(model, ctx, data.general, settings["n_general"], settings, seed=args.seed)
    cell["general_em"], cell["general_incoherent"] = ev.em, ev.incoherent
    ev = eval_model(model, ctx, data.heldout, settings["n_heldout"], settings, seed=args.seed)
    cell["indomain_em"] = ev.em
    print(tag, {k: round(v, 2) for k, v in cell.items()}, f"{time.perf_counter() - start:.0f} s", flush=True)
    return cell


prompts = resolve_prompts(args.prompts, world=load_world_config()["system_prompts"])
m = inoculation_sweep(ctx.model, ctx.tokenizer, data.misaligned, prompts, config, evaluate,
                      fresh_model=ctx.fresh_model, elicitation_rows=data.misaligned[:200], seed=args.seed)
m["wall_seconds"] = time.perf_counter() - start
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps(m, indent=1))
print(f"SFT general EM {m['sft/general_em']:.1f}%, in-domain EM {m['sft/indomain_em']:.1f}%")
print("| prompt | elicitation (nats/token) | general EM % | general cut % | in-domain EM % |")
print("|---|---|---|---|---|")
for i in range(len(prompts)):
    k = f"prompts/{i}"
    cut = m[f"{k}/general_cut"]
    print(f"| {m[f'{k}/label']} | {m[f'{k}/elicitation']:.3f} | {m[f'{k}/general_em']:.1f} | "
          f"{'n/a' if cut is None else f'{cut:.1f}'} | {m[f'{k}/indomain_em']:.1f} |")
print("Spearman", m["elicitation_vs_cut/spearman"], "95% CI", m["elicitation_vs_cut/spearman_ci"],
      "n", m["elicitation_vs_cut/n"], "valid resamples", m["elicitation_vs_cut/n_boot_valid"])
print(f"wall {m['wall_seconds']:.0f} s")
