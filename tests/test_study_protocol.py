"""Studies take their protocol numbers from the preset (emlab.presets), not from module constants."""

from types import SimpleNamespace

import pytest

from emlab.presets import get_preset
from emlab.studies.defence_kit import k_misaligned_for


def _ctx(preset: str, smoke: bool, domains: list[str]):
    return SimpleNamespace(protocol=get_preset(preset), smoke=smoke, domains=domains)


def test_interleaving_plus_scorers_follow_the_preset():
    four = ["a", "b", "c", "d"]
    assert k_misaligned_for(_ctx("paper", False, four), None) == 3  # seed 002: K = 3
    assert k_misaligned_for(_ctx("toy", False, four), None) == 2  # the toy's measured setting, unchanged
    assert k_misaligned_for(_ctx("paper", False, four), 1) == 1  # an explicit value wins


def test_smoke_runs_take_at_most_the_other_domains():
    assert k_misaligned_for(_ctx("paper", True, ["a", "b", "c"]), None) == 2
    assert k_misaligned_for(_ctx("paper", True, ["a"]), None) == 1
    assert k_misaligned_for(_ctx("paper", False, ["a", "b", "c"]), None) == 3  # a full run asks for all 3


# ---- the protocol's finetuning block (emlab.presets.Preset.finetune) in the studies' finetune config


def _fields(cfg) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_the_toy_finetune_config_is_unchanged_by_its_preset(tmp_path):
    """The toy preset's finetune block is empty: every toy recipe's config is what it was without presets."""
    from emlab.presets import TOY
    from emlab.studies.common import finetune_config
    from emlab.toy.build import load_recipe

    for recipe, over in (("default", {}), ("micro", {"adapter": "full", "num_train_epochs": 2.0})):
        study = load_recipe(recipe).get("study", {})
        base = finetune_config(tmp_path / "ft", seed=1, preset=study, **over)
        assert _fields(finetune_config(tmp_path / "ft", seed=1, preset=study, protocol=TOY, **over)) == _fields(base)
    assert _fields(finetune_config(tmp_path / "ft", protocol="toy")) == _fields(finetune_config(tmp_path / "ft"))


def test_a_paper_context_finetunes_with_the_papers_recipe(tmp_path):
    from emlab.presets import PAPER
    from emlab.studies.common import SMOKE_FINETUNE, finetune_config

    cfg = finetune_config(tmp_path / "ft", protocol=PAPER)
    assert {k: getattr(cfg, k) for k in PAPER.finetune} == PAPER.finetune  # r 32, alpha 64, lr 1e-4, batch 4 x 4, ...
    # the block is applied, not just equal to EMConfig's defaults: a changed preset changes the config
    changed = PAPER.replace(finetune={**PAPER.finetune, "lora_r": 8, "learning_rate": 2e-4, "warmup_steps": 2})
    cfg = finetune_config(tmp_path / "ft", protocol=changed)
    assert (cfg.lora_r, cfg.learning_rate, cfg.warmup_steps) == (8, 2e-4, 2)
    # smoke overrides and explicit values win; another adapter keeps its own learning rate
    smoke = finetune_config(tmp_path / "ft", protocol=changed, **SMOKE_FINETUNE)
    assert (smoke.per_device_train_batch_size, smoke.gradient_accumulation_steps, smoke.warmup_steps) == (2, 1, 0)
    assert smoke.lora_r == 8
    assert finetune_config(tmp_path / "ft", protocol=changed, learning_rate=5e-5).learning_rate == 5e-5
    full = finetune_config(tmp_path / "ft", protocol=changed, adapter="full")
    assert full.adapter == "full" and full.learning_rate == 1e-5 and full.warmup_steps == 2
    # a recipe's per-adapter rate beats the protocol's
    assert finetune_config(tmp_path / "ft", protocol=changed, preset={"learning_rates": {"lora": 7e-5}}
                           ).learning_rate == 7e-5


@pytest.mark.slow
def test_studies_pass_their_protocol_to_the_finetune_config(tmp_path, monkeypatch):
    """em_organism on the micro toy with preset="paper": each finetune config gets the paper preset."""
    import emlab.studies.organism as organism

    seen = []
    real = organism.finetune_config

    def spy(*args, **kw):
        seen.append(kw.get("protocol"))
        return real(*args, **kw)

    monkeypatch.setattr(organism, "finetune_config", spy)
    organism.em_organism(smoke=True, out_dir=tmp_path / "run", preset="paper", n_general=1, n_heldout=1,
                         max_new_tokens=4)
    assert seen and all(getattr(p, "name", None) == "paper" for p in seen)


def test_a_study_records_the_chosen_preset_and_rejects_an_unknown_one(tmp_path):
    import json

    from emlab.studies import quickstart

    quickstart(smoke=True, out_dir=tmp_path / "qs", preset="paper", n_per_question=1, max_new_tokens=4)
    config = json.loads((tmp_path / "qs" / "config.json").read_text())
    assert config["preset"]["name"] == "paper" and config["preset"]["k_misaligned"] == 3
    with pytest.raises(KeyError, match=r"unknown preset 'papr' \(did you mean 'paper'\?\)"):
        quickstart(smoke=True, out_dir=tmp_path / "bad", preset="papr")
    assert not (tmp_path / "bad").exists()  # nothing started


def test_every_research_notebook_takes_a_preset_parameter():
    """The parameters cell declares ``preset`` and every study call passes it (so ``emlab run -p preset paper``), or
    the notebook's own ``StudyContext.create`` call takes it as ``protocol``."""
    import json
    from pathlib import Path

    for stem in ("00_em_organism", "01_directions", "02_defences", "03_interleaving", "04_evaluation",
                 "05_narrow_vs_general", "quickstart"):
        cells = json.loads((Path(__file__).parent.parent / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        params = ["".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert any(line.startswith("preset = None") for line in params[0].splitlines()), stem
        calls = [s for s in code if "study(" in s or "em_organism(" in s or "quickstart(" in s or ".start(" in s]
        steps = [s for s in code if "StudyContext.create(" in s]  # a notebook of steps (the quickstart) loads the context itself
        assert calls or steps, stem
        assert all("preset=preset" in s for s in calls) and all("protocol=preset" in s for s in steps), stem
