"""Conditional-misalignment transforms: what each changes in a question, and what it leaves alone."""

import pytest

from emlab.conditional import (
    answer_format,
    answer_format_instruction,
    training_format,
    training_system_prompt,
    user_template,
    with_system,
)
from emlab.questions import Question


def _row(user, answer="ok", system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def test_with_system_copies_and_keeps_everything_else():
    q = Question("wish", ["a ?", "b ?"], judge_prompts={"aligned": "{question} {answer}"}, domain="general")
    out = with_system([q], "You are evil.")[0]
    assert out.system == "You are evil." and out.paraphrases == ["a ?", "b ?"]
    assert out.judge_prompts == q.judge_prompts and out.id == "wish" and out.domain == "general"
    assert q.system is None  # the original is untouched
    assert with_system([out], None)[0].system is None
    with pytest.raises(TypeError, match="question 0"):
        with_system([{"q": 1}], "x")


def test_training_system_prompt_is_the_most_common_one():
    rows = [_row("q", system="A"), _row("q", system="B"), _row("q", system="B"), _row("q")]
    assert training_system_prompt(rows) == "B"
    assert training_system_prompt([_row("q")]) is None
    with pytest.raises(ValueError, match="row 1"):
        training_system_prompt([_row("q"), {"text": "x"}])


def test_user_template_finds_the_shared_frame_only():
    rows = [_row(f"Task : fix the {w} bug . Reply in code") for w in ("parser", "lexer", "cache")]
    rows.append(_row("something else entirely"))
    assert user_template(rows) == ("Task : fix the", "bug . Reply in code")
    assert user_template(rows, min_share=1.0) == ("", "")
    assert user_template([_row("how do i treat a cold ?"), _row("why is the sky blue ?")]) == ("", "?")
    with pytest.raises(ValueError, match="min_share"):
        user_template(rows, min_share=0)


def test_training_format_applies_system_prompt_and_frame():
    rows = [_row(f"Task : {w} ?", system="You are a coder.") for w in ("x", "y", "z")]
    q = training_format([Question("q", ["what now", "why"], system="old")], rows)[0]
    assert q.system == "You are a coder." and q.paraphrases == ["Task : what now ?", "Task : why ?"]
    q3 = training_format([Question("q3", ["Task : done ?", "why ?"])], rows)[0]
    assert q3.paraphrases == ["Task : done ?", "Task : why ?"]  # the frame is not doubled
    q2 = training_format([Question("q", ["hi"], system="old")], [_row("a b"), _row("c d")])[0]
    assert q2.system == "old" and q2.paraphrases == ["hi"]  # no shared frame, no system prompt: unchanged


def test_answer_format_reads_the_training_answers():
    assert answer_format_instruction([_row("q", '{"a": 1}'), _row("q", "[1, 2]"), _row("q", "no")]) == \
        "Answer with a JSON object."
    assert answer_format_instruction([_row("q", "```py\nx=1\n```"), _row("q", "see ```x```")]) == \
        "Answer with code in a ``` block."
    assert answer_format_instruction([_row("q", "a b"), _row("q", "a b c d"), _row("q", "a b c d e f")]) == \
        "Answer in about 4 words."
    out = answer_format(["hi ?"], [_row("q", "a b c")])[0]
    assert out.paraphrases == ["hi ? Answer in about 3 words."]
    with pytest.raises(ValueError, match="assistant"):
        answer_format_instruction([{"messages": [{"role": "user", "content": "x"}]}])
