"""emlab.studies.common.finetune_config: how a study preset and overrides make an EMConfig."""

from emlab.studies.common import finetune_config


def test_preset_learning_rate_per_adapter(tmp_path):
    preset = {"finetune": {"num_train_epochs": 2.0}, "learning_rates": {"lora": 5e-5}}
    lora = finetune_config(tmp_path / "a", seed=3, preset=preset)
    assert lora.learning_rate == 5e-5 and lora.num_train_epochs == 2.0 and lora.seed == 3
    assert finetune_config(tmp_path / "b", preset=preset, adapter="lora").learning_rate == 5e-5
    # another adapter keeps its own default; an explicit rate always wins
    full = finetune_config(tmp_path / "c", preset=preset, adapter="full")
    assert full.adapter == "full" and full.learning_rate == 1e-5
    assert finetune_config(tmp_path / "d", preset=preset, learning_rate=3e-4).learning_rate == 3e-4
    assert finetune_config(tmp_path / "e", preset={"finetune": {"adapter": "full"}, "learning_rates": {"full": 2e-5}}
                           ).learning_rate == 2e-5
    assert finetune_config(tmp_path / "f").learning_rate == 1e-4  # no preset: LoRA's default
