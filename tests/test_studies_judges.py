"""emlab.studies.common: the judge a notebook's ``judge`` parameter names, and smoke-sized traits."""

import pytest

from emlab.directions import load_trait
from emlab.judge import LocalHFJudge, OpenAIJudge
from emlab.studies.common import resolve_judge, smoke_trait
from emlab.toy import ToyJudge


def test_toy_and_named_openai_judges(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("EMLAB_JUDGE_CACHE", str(tmp_path / "j.sqlite"))
    assert isinstance(resolve_judge("toy"), ToyJudge)
    named = resolve_judge("gpt-4o")
    assert isinstance(named, OpenAIJudge) and named.model == "gpt-4o" and named.base_url == "http://127.0.0.1:9/v1"
    assert resolve_judge(None).model == "gpt-4o-mini"
    assert named.api_key is None  # the key stays in the environment, never in the judge's config


def test_local_judges_use_the_study_model():
    model, tok = object(), object()
    for name in ("local", "local-hf"):
        j = resolve_judge(name, model, tok, model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
        assert isinstance(j, LocalHFJudge) and j.model is model and j.tokenizer is tok
        assert j.name == "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="own model"):
        resolve_judge("local")


def test_judge_objects_pass_and_bad_ones_fail():
    toy = ToyJudge()
    assert resolve_judge(toy) is toy
    with pytest.raises(TypeError, match="score"):
        resolve_judge(42)
    with pytest.raises(ValueError, match="empty"):
        resolve_judge("  ")


def test_smoke_trait_keeps_the_first_pair_and_questions():
    full = load_trait("evil")
    small = smoke_trait(full, questions=2)
    assert small.instructions == full.instructions[:1] and small.questions == full.questions[:2]
    assert small.description == full.description and len(full.questions) > 2


def test_smoke_finetune_only_for_real_models_in_smoke_mode():
    from emlab.studies.common import SMOKE_FINETUNE, StudyContext, smoke_finetune

    def ctx(name, smoke):
        return StudyContext(name, smoke, None, None, None, {}, [], {})

    assert smoke_finetune(ctx("HuggingFaceTB/SmolLM2-135M-Instruct", True)) == SMOKE_FINETUNE
    assert smoke_finetune(ctx("HuggingFaceTB/SmolLM2-135M-Instruct", False)) == {}
    assert smoke_finetune(ctx("toy:micro", True)) == {}
    assert SMOKE_FINETUNE["warmup_steps"] == 0 and SMOKE_FINETUNE["gradient_accumulation_steps"] == 1
