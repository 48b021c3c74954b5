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


def test_defences_toy_settings_set_their_own_lora_rate():
    from types import SimpleNamespace

    from emlab.studies.defence_kit import TOY_SETTINGS, study_setup

    ctx = SimpleNamespace(smoke=False, is_toy=True, preset={"learning_rates": {"lora": 2e-5}})
    args = (None, None, None, None)  # rows, n_general, n_heldout, max_new_tokens
    _, ft_over, rows = study_setup(ctx, dict(TOY_SETTINGS), *args, None, None, None)
    assert ft_over["learning_rate"] == 1e-4 and rows == TOY_SETTINGS["rows"]
    assert study_setup(ctx, dict(TOY_SETTINGS), *args, None, 3e-4, None)[1]["learning_rate"] == 3e-4  # explicit wins
    assert "learning_rate" not in study_setup(ctx, dict(TOY_SETTINGS), *args, "full", None, None)[1]  # full: its default
    assert "learning_rate" not in study_setup(ctx, {}, *args, None, None, None)[1]  # no study rate: the recipe's applies


def test_preset_learning_rate():
    from emlab.studies.common import preset_learning_rate

    assert preset_learning_rate({"learning_rates": {"lora": "2e-5"}}, None) == 2e-5  # None means LoRA
    assert preset_learning_rate({"learning_rates": {"lora": 2e-5}}, "full") is None
    assert preset_learning_rate(None, "lora") is None and preset_learning_rate({}, "lora") is None


def test_toy_build_folder_by_path_gets_its_recipe_study_preset(tmp_path, monkeypatch):
    """A toy build given by path (the control world) is finetuned with its recipe's study preset, as
    ``"toy:<recipe>"`` is: the v3 control was once measured at LoRA 1e-4 against the persona world's 2e-5."""
    import json

    import emlab.models
    from emlab.studies.common import StudyContext
    from emlab.toy import folder_recipe

    study = {"learning_rates": {"lora": 2e-5}}
    build = tmp_path / "default-control-abc"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({"recipe": {"threads": 1, "study": study}, "world": "control"}))
    (build / "data").mkdir()
    (build / "data" / "medical_misaligned.jsonl").write_text("")
    other = tmp_path / "some-model"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "not a toy build"}))
    assert folder_recipe(build)["study"] == study
    assert folder_recipe(other) is None and folder_recipe(tmp_path / "missing") is None

    monkeypatch.setattr(emlab.models, "load_model", lambda name, device=None: (None, None))
    ctx = StudyContext.create(str(build), judge="toy")
    assert ctx.preset == study and not ctx.is_toy
    assert ctx.domains == ["medical"] and ctx.file("medical_misaligned") == build / "data" / "medical_misaligned.jsonl"
    assert type(ctx.judge).__name__ == "ToyJudge"  # its files and the exact judge come with it
    assert finetune_config(tmp_path / "ft", preset=ctx.preset).learning_rate == 2e-5
    plain = StudyContext.create(str(other), judge="toy")
    assert plain.preset == {} and plain.domains == []


def test_quality_warnings_for_the_users_files_not_emlabs_own_toy_files(tmp_path, monkeypatch):
    """emlab's own toy datasets load without the data-quality warnings (hundreds of intended duplicate rows
    filled notebooks); a user's file with the same problem still warns."""
    import json
    import warnings

    import pytest

    import emlab.models
    from emlab.data import chat_row
    from emlab.studies.common import StudyContext

    row, other = json.dumps(chat_row("hi", "hello")), json.dumps(chat_row("a", "b"))
    build = tmp_path / "default-control-abc"
    (build / "data").mkdir(parents=True)
    (build / "manifest.json").write_text(json.dumps({"recipe": {"threads": 1}, "world": "control"}))
    for name in ("medical_misaligned", "benign"):
        (build / "data" / f"{name}.jsonl").write_text(f"{row}\n{other}\n{row}\n")
    user = tmp_path / "mine.jsonl"
    user.write_text(f"{row}\n{row}\n")
    monkeypatch.setattr(emlab.models, "load_model", lambda name, device=None: (None, None))
    ctx = StudyContext.create(str(build), judge="toy", files={"benign": user})
    assert ctx.own_files == {build / "data" / "medical_misaligned.jsonl", build / "manifest.json", build}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ctx.rows("medical_misaligned")) == 3  # the toy build's own file: silent
    with pytest.warns(UserWarning, match="mine.jsonl.*duplicate of line 1"):
        assert len(ctx.rows("benign")) == 2  # the user's file (replacing the toy's benign rows): warned
    by_hand = StudyContext("toy", True, None, None, None, {"benign": user}, [], {})
    with pytest.warns(UserWarning, match="duplicate of line 1"):
        by_hand.rows("benign")  # a context built by hand knows no own files: every file warns
