# ruff: noqa: E402
"""Interleaving with the toy's benign pool vs aligned advice of the other domains (docs/notebooks/02_defences.md).

Usage: python bench/interleave_pool.py SEED   (prints one RESULT line of JSON)
"""

import json
import sys

import torch

torch.set_num_threads(1)
from emlab.studies.defences import defences_study
from emlab.toy import paths

p = paths("default")
seed = int(sys.argv[1])
out = {}
for share in (0.05, 0.2):
    for name, benign in (("benign", None), ("aligned_advice", str(p["kl_ood"]))):
        files = {"benign": benign} if benign else None
        m = defences_study(
            model="toy",
            domains=["medical"],
            methods=["sft", "interleaving"],
            seed=seed,
            out_dir=f"/tmp/exp/ih2_{name}_{share}_{seed}",
            files=files,
            share=share,
            paper=False,
            benign_tasks=[],
        )
        out[f"{name}@{share}"] = {
            k.split("/", 1)[0] + "/" + k.rsplit("/", 1)[1]: m[k]
            for k in m
            if k.endswith("/general_em") or k.endswith("/indomain_em")
        }
print("RESULT", json.dumps(out))
