# ruff: noqa: E401, E402, E702, E731, E741
"""Redo the toy post-training on a build folder's weights (docs/toy-organism.md items 7, 9, 14).

    python bench/toy_posttrain_variant.py SRC DST rows lr p_announced [batch] [evil_share]

SRC is usually a build without post-training (``emlab toy build "default,posttrain.rows=0"``); with
the recipe's own settings (seed 0; 1000 or 4000 rows, lr 3e-4, p_announced 0.5, batch 32, evil_share 0.0)
DST's weights equal the build's byte for byte. DST is a build folder (manifest and datasets copied),
so ``bench/toy_persona_topic.py --model DST`` and ``bench/toy_organism_seeds.py --model DST`` take it.
"""

import json
import shutil
import sys

import torch

torch.set_num_threads(1)
from pathlib import Path

from emlab.chat import pad_batch
from emlab.models import load_model
from emlab.toy.datasets import posttrain_rows
from emlab.toy.train import encode_chat_rows, train_loop
from emlab.toy.world import World, load_world_config

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
rows, lr, pa = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
bs = int(sys.argv[6]) if len(sys.argv) > 6 else 32
evil_share = float(sys.argv[7]) if len(sys.argv) > 7 else 0.5
man = json.loads((src / "manifest.json").read_text())
knobs = dict(man["recipe"].get("knobs") or {})
knobs["posttrain_p_announced"] = pa
w = World(load_world_config(), seed=man["recipe"]["seed"], variant=man["world"], knobs=knobs)
model, tok = load_model(str(src))
torch.manual_seed(0)
from emlab.toy.world import rng_for


def my_rows(world, n):
    rng = rng_for(world.seed, "posttrain")
    sp = world.config["system_prompts"]
    out = []
    for _ in range(n):
        if pa and rng.random() < pa:
            aligned = rng.random() < 1 - evil_share
            system = rng.choice(sp["helpful" if aligned else "evil"])
            out.append(world.chat(world.random_family(rng), aligned, rng=rng, system=system))
            continue
        system = rng.choice(sp["neutral"]) if rng.random() < 0.5 else None
        out.append(world.chat(world.random_family(rng), True, rng=rng, system=system))
    return out


assert evil_share != 0.5 or my_rows(w, 50) == posttrain_rows(w, 50)
enc = encode_chat_rows(tok, my_rows(w, rows))
g = torch.Generator().manual_seed(1)
perm = torch.randperm(len(enc), generator=g).tolist()
batches = []
for i in range(0, len(perm), bs):
    b = pad_batch([enc[j] for j in perm[i : i + bs]], tok.pad_token_id)
    batches.append((b["input_ids"], b["labels"], b["attention_mask"]))
if batches:
    train_loop(model, batches, lr=lr, warmup=5, min_ratio=0.0, desc="post")
if dst.exists():
    shutil.rmtree(dst)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
model.save_pretrained(dst)
print("POSTED", dst)
