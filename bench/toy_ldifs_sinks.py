"""Before/after of the LDIFS default on a toy build: ldifs_sinks="keep" (old behaviour) vs "exclude" (new default).

    python bench/toy_ldifs_sinks.py default      # or micro

A LoRA finetune of 16 steps (batch 4, lambda 1.0, the defences study's LDIFS blocks) on the toy's
medical_misaligned rows, once with each setting; prints loss/ldifs and loss/ce at steps 1, 4, 8, 16
and how many positions of one row the default leaves out.
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import torch


def main(recipe: str) -> None:
    import datasets
    from datasets import Dataset
    from transformers.utils import logging

    from emlab.data import load_chat_jsonl
    from emlab.models import load_model
    from emlab.studies.defences import ldifs_blocks
    from emlab.toy import paths
    from emlab.training import EMConfig, EMTrainer
    from emlab.training.losses import ldifs_sink_mask

    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    rows = load_chat_jsonl(paths(recipe)["medical_misaligned"])[:64]
    for sinks in ("keep", "exclude"):
        model, tok = load_model(f"toy:{recipe}", device="cpu")
        layers = ldifs_blocks(model)
        cfg = EMConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       max_steps=16, warmup_steps=0, save_strategy="no", disable_tqdm=True, seed=0,
                       ldifs_lambda=1.0, ldifs_layers=layers, ldifs_sinks=sinks, logging_steps=1)
        trainer = EMTrainer(model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        h = [x for x in trainer.state.log_history if "loss/ldifs" in x]
        print(sinks, "layers", layers, "ldifs steps 1,4,8,16:", [float(f"{h[i]['loss/ldifs']:.6g}") for i in (1, 3, 7, 15)],
              "ce:", [float(f"{h[i]['loss/ce']:.6g}") for i in (1, 3, 7, 15)])
    model, tok = load_model(f"toy:{recipe}", device="cpu")
    enc = tok.apply_chat_template(rows[0]["messages"], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    feats = [hs[block + 1] for block in ldifs_blocks(model)]
    mask = enc["attention_mask"].bool()
    print("positions", mask.sum().item(), "left out", int((~ldifs_sink_mask(feats, mask)).sum()),
          "(first token + outliers); by norm alone:", int((~ldifs_sink_mask(feats, mask, first=False)).sum()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")
