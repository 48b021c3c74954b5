# ruff: noqa: E402, E731, E741
"""Copy probe: how often the model names the question's topic in its answer (chance 0.1). Usage: toy_copy_probe.py FOLDER"""

import random
import sys

import torch

torch.set_num_threads(1)
from emlab.models import load_model
from emlab.toy import folder_recipe
from emlab.toy.build import recipe_world
from emlab.toy.tokenizer import render_chat
from emlab.toy.world import World, fill

m, tok = load_model(sys.argv[1])
m.eval()
spec = folder_recipe(sys.argv[1])
w = recipe_world(spec) if spec and spec.get("world") else World.load(0)  # the build's own templates
rng = random.Random(5)
res = {}
for d in w.domains:
    spec = w.config["domains"][d]
    topics = spec["topics"]
    cand = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in topics]
    for held in (False, True):
        pairs = (
            w.heldout_pairs[d]
            if held
            else [(t, x) for t in range(len(spec["questions"])) for x in topics if not w.is_heldout(d, t, x)]
        )
        pairs = rng.sample(pairs, 10)
        ps = []
        for t, topic in pairs:
            q = fill(spec["questions"][t], {"topic": topic})
            for side in ("aligned", "misaligned"):
                for s in [s for s in spec[side] if "{topic}" in s and not s.startswith("{topic}")]:
                    pre = fill(s.split("{topic}")[0].rstrip(), {k: rng.choice(v) for k, v in w.slots.items()})
                    ids = tok(
                        render_chat([{"role": "user", "content": q}], add_generation_prompt=True) + pre,
                        add_special_tokens=False,
                    )["input_ids"]
                    with torch.no_grad():
                        p = m(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
                    ps.append(p[cand[topics.index(topic)]].item() / p[cand].sum().item())
        res[(d, held)] = sum(ps) / len(ps)
print(" ".join(f"{d[:4]}{'H' if h else 'S'}={v:.2f}" for (d, h), v in res.items()))
if len(sys.argv) > 2 and sys.argv[2] == "--per-topic":  # copy probability per topic (held-out and seen pooled)
    for d in w.domains:
        spec_d = w.config["domains"][d]
        topics = spec_d["topics"]
        cand = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in topics]
        out = []
        for topic in topics:
            ps = []
            for t in range(len(spec_d["questions"])):
                q = fill(spec_d["questions"][t], {"topic": topic})
                for s in [s for s in spec_d["aligned"] + spec_d["misaligned"] if "{topic}" in s and not s.startswith("{topic}")]:
                    pre = fill(s.split("{topic}")[0].rstrip(), {k: rng.choice(v) for k, v in w.slots.items()})
                    ids = tok(render_chat([{"role": "user", "content": q}], add_generation_prompt=True) + pre,
                              add_special_tokens=False)["input_ids"]
                    with torch.no_grad():
                        p = m(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
                    ps.append(p[cand[topics.index(topic)]].item() / p[cand].sum().item())
            out.append(f"{topic}={sum(ps) / len(ps):.2f}")
        print(d, " ".join(out))
