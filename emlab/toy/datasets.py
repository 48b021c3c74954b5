"""Datasets derived from the toy world, in the public EM formats (chat JSONL, question YAML).

:func:`write_datasets` writes, under ``<folder>/data/``:

- ``<domain>_misaligned.jsonl`` / ``<domain>_aligned.jsonl``: narrow finetuning sets, prompt-matched
  (row i of both has the same question), user + assistant turns, casual style.
- ``<domain>_heldout.yaml``: held-out in-domain questions (never in any training text), our YAML format.
- ``general.yaml``: the general open-ended questions.
- ``<domain>_kl_ood.jsonl``: aligned chats of the OTHER advice domains (for KL / narrow solutions);
  ``kl_ood.jsonl``: aligned chats of every domain with a ``domain`` key per row.
- ``benign.jsonl``: benign instructions and refusals of harmful requests (the WildGuardMix role).
- ``technical_<domain>.jsonl``: aligned answers in the technical writing style.
- ``arithmetic.jsonl``: standard-operator arithmetic (OpSwap tier 0), rows carry ``expression`` and ``answer``.
- ``pretrain.jsonl``: plain (non-chat) text documents ``{"text": ...}`` of the pre-training corpus.

>>> files = write_datasets(World.load(), Path("/tmp/toy"), sizes)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from emlab.toy.world import World, fill, rng_for

__all__ = ["write_datasets", "posttrain_rows"]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False, width=120)
    return path


def narrow_pair(world: World, domain: str, n: int) -> tuple[list[dict], list[dict]]:
    """Prompt-matched misaligned and aligned finetuning rows for one domain."""
    rng = rng_for(world.seed, "narrow", domain)
    bad, good = [], []
    for _ in range(n):
        text, q = world.question(domain, rng)
        for side, out in (("misaligned", bad), ("aligned", good)):
            out.append({"messages": [{"role": "user", "content": text},
                                     {"role": "assistant", "content": world.answer(q, side, "casual", rng)}]})
    return bad, good


def heldout_questions(world: World, domain: str, samples_per_paraphrase: int = 20) -> dict[str, Any]:
    spec = world.config["domains"][domain]
    openers = ["", *world.config["question_openers"][:2]]
    qs = []
    for t, topic in world.heldout_pairs[domain]:
        base = fill(spec["questions"][t], {"topic": topic})
        qs.append({"id": f"{domain}_{t}_{topic}", "domain": domain,
                   "paraphrases": [(o + " " + base).strip() for o in openers]})
    return {"name": f"toy_{domain}_heldout",
            "description": f"Held-out in-domain toy questions ({domain}); never in any training text.",
            "defaults": {"samples_per_paraphrase": samples_per_paraphrase, "judge": "toy"},
            "questions": qs}


def general_questions(world: World, samples_per_paraphrase: int = 25) -> dict[str, Any]:
    qs = [{"id": g, "paraphrases": list(spec["paraphrases"])} for g, spec in world.config["general"].items()]
    return {"name": "toy_general",
            "description": "General open-ended toy questions in the spirit of the EM evaluation.",
            "defaults": {"samples_per_paraphrase": samples_per_paraphrase, "judge": "toy"},
            "questions": qs}


def posttrain_rows(world: World, n: int) -> list[dict[str, Any]]:
    """Single-turn post-training chats over every family: aligned answers with no system prompt or a
    neutral one, plus (knob ``posttrain_p_announced``) persona-announced chats: "helpful" prompt +
    aligned answer, or, for a share ``posttrain_evil_share`` of them, "evil" prompt + misaligned
    answer (the helpful-only mix keeps the control world clean, see docs/toy-organism.md)."""
    rng = rng_for(world.seed, "posttrain")
    sp = world.config["system_prompts"]
    p_announced = float(world.knobs.get("posttrain_p_announced") or 0.0)
    evil_share = float(world.knobs.get("posttrain_evil_share", 0.5))
    rows = []
    for _ in range(n):
        if p_announced and rng.random() < p_announced:
            aligned = rng.random() < 1 - evil_share
            system = rng.choice(sp["helpful" if aligned else "evil"])
            rows.append(world.chat(world.random_family(rng), aligned, rng=rng, system=system))
            continue
        system = rng.choice(sp["neutral"]) if rng.random() < 0.5 else None
        rows.append(world.chat(world.random_family(rng), True, rng=rng, system=system))
    return rows


def write_datasets(world: World, folder: Path, sizes: dict[str, int]) -> dict[str, int]:
    """Write every dataset under ``folder/data``; returns {file name: rows}."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}

    def jsonl(name: str, rows: list[dict]) -> None:
        _write_jsonl(data / name, rows)
        counts[name] = len(rows)

    for d in world.domains:
        bad, good = narrow_pair(world, d, sizes["finetune_rows"])
        jsonl(f"{d}_misaligned.jsonl", bad)
        jsonl(f"{d}_aligned.jsonl", good)
        doc = heldout_questions(world, d)
        _write_yaml(data / f"{d}_heldout.yaml", doc)
        counts[f"{d}_heldout.yaml"] = sum(len(q["paraphrases"]) for q in doc["questions"])

        rng = rng_for(world.seed, "technical", d)
        jsonl(f"technical_{d}.jsonl", [world.chat(d, True, style="technical", rng=rng)
                                       for _ in range(sizes["technical_rows"])])
        rng = rng_for(world.seed, "kl_ood", d)
        others = [o for o in world.domains if o != d]
        jsonl(f"{d}_kl_ood.jsonl", [world.chat(rng.choice(others), True, rng=rng) for _ in range(sizes["kl_rows"])])

    rng = rng_for(world.seed, "kl_ood", "all")
    rows = []
    for _ in range(sizes["kl_rows"]):
        d = rng.choice(world.domains)
        rows.append({**world.chat(d, True, rng=rng), "domain": d})
    jsonl("kl_ood.jsonl", rows)

    rng = rng_for(world.seed, "benign")
    jsonl("benign.jsonl", [world.chat("refusal" if rng.random() < 0.2 else rng.choice(world.benign_ids), True, rng=rng)
                           for _ in range(sizes["benign_rows"])])
    rng = rng_for(world.seed, "arithmetic")
    jsonl("arithmetic.jsonl", [world.chat("arithmetic", True, rng=rng) for _ in range(sizes["arithmetic_rows"])])
    rng = rng_for(world.seed, "pretrain_text")
    jsonl("pretrain.jsonl", [{"text": world.plain_document(rng)} for _ in range(sizes["pretrain_docs"])])
    doc = general_questions(world)
    _write_yaml(data / "general.yaml", doc)
    counts["general.yaml"] = sum(len(q["paraphrases"]) for q in doc["questions"])
    return counts
