"""How much training signal interleaved rows carry: answer loss of each pool, chat model vs misaligned finetune.

Interleaving can only pull a finetune back where its loss on the interleaved rows has risen: rows the
misaligned finetune still fits as well as the chat model did add (almost) no gradient against the
persona shift. This trains study 02's undefended finetune (medical LoRA, 1000 rows, seed S) and
prints, for each candidate pool, the mean answer NLL (assistant tokens, the training mask) under the
chat model and under the finetune:

- ``benign``: the toy's benign pool (instructions and refusals; the WildGuardMix role), split into
  its ``refusals`` and ``instructions``;
- ``aligned advice``: aligned answers of the other domains (``medical_kl_ood``);
- ``misaligned (train)``: the finetune's own rows, for scale.

Usage: ``python bench/interleave_signal.py [--seed S] [--rows-per-pool N]``.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-pool", type=int, default=300)
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--out", default="runs/bench_interleave_signal")
    args = ap.parse_args()

    from emlab.studies.common import StudyContext, finetune_config
    from emlab.training import finetune
    from emlab.training.interleaving import answer_losses, is_refusal, last_answer

    t0 = time.time()
    ctx = StudyContext.create("toy")
    data = ctx.domain_data(args.domain, rows=1000)
    n = args.rows_per_pool
    benign = ctx.rows("benign")
    pools = {
        "benign (all)": benign[:n],
        "  refusals": [r for r in benign if is_refusal(last_answer(r))][:n],
        "  instructions": [r for r in benign if not is_refusal(last_answer(r))][:n],
        "aligned advice": ctx.rows(f"{args.domain}_kl_ood")[:n],
        "misaligned (train)": data.misaligned[:n],
    }
    chat = {k: answer_losses(ctx.model, ctx.tokenizer, v).mean().item() for k, v in pools.items()}
    ft = finetune(ctx.fresh_model(), ctx.tokenizer, data.misaligned,
                  finetune_config(f"{args.out}/seed{args.seed}/ft", seed=args.seed, preset=ctx.preset))
    with ft.active():
        tuned = {k: answer_losses(ft.model, ctx.tokenizer, v).mean().item() for k, v in pools.items()}
    print(f"{'pool':20s} {'rows':>5s} {'chat NLL':>9s} {'finetune NLL':>13s} {'change':>8s}")
    for k, v in pools.items():
        print(f"{k:20s} {len(v):5d} {chat[k]:9.4f} {tuned[k]:13.4f} {tuned[k] - chat[k]:+8.4f}")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
