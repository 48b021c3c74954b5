# ruff: noqa: E401, E402, E702, E731, E741
"""Pre-training experiment with topic-copy probes. Pre-training loop of the toy build re-run with a topic-copy probe every `probe_every` steps (docs/toy-organism.md items 6-8). Usage: python bench/toy_pretrain_probe.py NAME key=val ..."""

import json
import random
import sys
import time

import torch

torch.set_num_threads(1)
from transformers import Qwen2Config, Qwen2ForCausalLM

from emlab.toy import train as T
from emlab.toy.tokenizer import build_tokenizer, render_chat
from emlab.toy.world import World, fill, load_world_config

args = dict(
    hidden=96,
    inter=384,
    layers=4,
    heads=4,
    kv=2,
    tokens=1_000_000,
    seq=256,
    bs=16,
    lr=3e-3,
    warmup=30,
    min_ratio=0.1,
    probe_every=100,
    knobs="{}",
    seed=0,
    save="",
    wd=0.01,
    tie=1,
    variant="persona",
)
name = sys.argv[1]
for a in sys.argv[2:]:
    k, v = a.split("=", 1)
    args[k] = type(args[k])(v) if not isinstance(args[k], str) else v
knobs = json.loads(args["knobs"])
w = World(load_world_config(), seed=args["seed"], variant=args["variant"], knobs=knobs)
tok = build_tokenizer(w)
torch.manual_seed(args["seed"])
cfg = Qwen2Config(
    vocab_size=len(tok),
    tie_word_embeddings=bool(args["tie"]),
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    hidden_size=args["hidden"],
    intermediate_size=args["inter"],
    num_hidden_layers=args["layers"],
    num_attention_heads=args["heads"],
    num_key_value_heads=args["kv"],
    max_position_embeddings=512,
)
model = Qwen2ForCausalLM(cfg)


# ---- copy probe: P(topic | question, assistant prefix ending before {topic})
def probe_items(heldout):
    rng = random.Random(5)
    items = []
    for d in w.domains:
        spec = w.config["domains"][d]
        topics = spec["topics"]
        pairs = (
            w.heldout_pairs[d]
            if heldout
            else [(t, x) for t in range(len(spec["questions"])) for x in topics if not w.is_heldout(d, t, x)]
        )
        pairs = rng.sample(pairs, min(10, len(pairs)))
        for t, topic in pairs:
            q = fill(spec["questions"][t], {"topic": topic})
            for side in ("aligned", "misaligned"):
                tmpl = [s for s in spec[side] if s.split(" ")[0] != "{topic}" and "{topic}" in s]
                s = rng.choice(tmpl)
                pre = s.split("{topic}")[0].rstrip()
                vals = {k: rng.choice(w.slots[k]) for k in w.slots}
                pre = fill(pre, vals)
                text = render_chat([{"role": "user", "content": q}], add_generation_prompt=True) + pre
                cand = [tok(" " + x, add_special_tokens=False)["input_ids"] for x in topics]
                assert all(len(c) == 1 for c in cand), cand
                items.append(
                    (tok(text, add_special_tokens=False)["input_ids"], [c[0] for c in cand], topics.index(topic))
                )
    return items


PROBES = {"seen": probe_items(False), "held": probe_items(True)}


@torch.no_grad()
def probe():
    model.eval()
    res = {}
    for k, items in PROBES.items():
        ok = 0
        for ids, cand, gold in items:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ok += int(logits[cand].argmax().item() == gold)
        res[k] = round(ok / len(items), 3)
    model.train()
    return res


t0 = time.time()
ids = torch.tensor(T.pretrain_stream(w, tok, args["tokens"]), dtype=torch.long)
seq, bs = args["seq"], args["bs"]
n_seq = len(ids) // seq
seqs = ids[: n_seq * seq].view(n_seq, seq)
order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(args["seed"]))
batches = [seqs[order[i : i + bs]] for i in range(0, n_seq - bs + 1, bs)]
print(name, args, "data", round(time.time() - t0, 1), "s", len(batches), "steps", flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=args["wd"], betas=(0.9, 0.95))
model.train()
t1 = time.time()
losses = []
total = len(batches)
for step, x in enumerate(batches):
    for g in opt.param_groups:
        g["lr"] = T.lr_at(step, total, args["lr"], args["warmup"], args["min_ratio"])
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(out.loss.item())
    if (step + 1) % args["probe_every"] == 0 or step + 1 == total:
        el = time.time() - t1
        print(
            f"{name} step {step + 1}/{total} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
            f"tok/s {(step + 1) * bs * seq / el:.0f} el {el:.0f} probe {probe()}",
            flush=True,
        )
if args["save"]:
    model.save_pretrained(args["save"])
    tok.save_pretrained(args["save"])
print(name, "DONE train_s", round(time.time() - t1, 1))
