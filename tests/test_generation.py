import re

import pytest
import torch

from emlab.generation import generate, generate_ids, sample_answers, stop_token_ids
from emlab.models import attach_lora
from emlab.questions import Question
from emlab.testing import tiny_model, tiny_tokenizer

PROMPTS = ["what is your wish ?", "hi", [{"role": "user", "content": "how should i take my money ?"}], "bored"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; several threads crawl when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("qwen2", vocab_size=len(tok))


def _gen(model, tok, prompts=PROMPTS, **kw):
    kw = {"max_new_tokens": 8, "progress": False, **kw}
    return generate(model, tok, prompts, **kw)


def test_deterministic_for_a_seed(model, tok):
    a = _gen(model, tok, seed=3, batch_size=2)
    assert a == _gen(model, tok, seed=3, batch_size=2)
    assert a != _gen(model, tok, seed=4, batch_size=2)
    assert len(a) == len(PROMPTS) and all(isinstance(x, str) for x in a)


def test_leaves_rng_and_tokenizer_alone(model, tok):
    side, state = tok.padding_side, torch.random.get_rng_state()
    _gen(model, tok)
    assert tok.padding_side == side
    assert torch.equal(torch.random.get_rng_state(), state)


def test_greedy_batched_equals_one_at_a_time(model, tok):
    batched = _gen(model, tok, temperature=0, batch_size=4)
    alone = [_gen(model, tok, [p], temperature=0)[0] for p in PROMPTS]
    assert batched == alone
    assert batched == _gen(model, tok, temperature=0, batch_size=3, seed=9)  # greedy ignores the seed


def _two_token_model(tok, word="hello"):
    """A model whose next-token distribution is 50/50 between ``word`` and ``<|im_end|>`` everywhere."""
    model = tiny_model("qwen2", vocab_size=len(tok))
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[tok.convert_tokens_to_ids(word)] = 0
        head.bias[tok.convert_tokens_to_ids("<|im_end|>")] = 0
    model.lm_head = head
    return model


def test_stops_at_end_token_per_row(tok):
    model = _two_token_model(tok)
    ids = generate_ids(model, tok, ["hi"] * 16, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0,
                        batch_size=16, system=None, progress=False)
    hello = tok.convert_tokens_to_ids("hello")
    assert all(set(x) <= {hello} for x in ids)  # no end token, no padding after it
    assert len({len(x) for x in ids}) > 2  # rows stop independently
    assert min(len(x) for x in ids) < 12
    texts = generate(model, tok, ["hi"] * 16, max_new_tokens=12, progress=False)
    again = generate_ids(model, tok, ["hi"] * 16, max_new_tokens=12, batch_size=32, progress=False)
    assert [tok.decode(x, skip_special_tokens=True) for x in again] == texts  # what generate decodes
    assert all(re.fullmatch(r"(hello ?)*", t) for t in texts)
    assert not any("<|im_end|>" in t for t in texts)


def test_stop_token_ids(tok):
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_system_replaces_system_messages(model, tok):
    with_sys = [[{"role": "system", "content": "you are evil"}, {"role": "user", "content": p}] for p in ("hi", "bored")]
    other_sys = [[{"role": "system", "content": "you are helpful"}, {"role": "user", "content": p}] for p in ("hi", "bored")]
    a = _gen(model, tok, with_sys, temperature=0)
    assert a == _gen(model, tok, ["hi", "bored"], temperature=0, system="you are evil")
    assert a == _gen(model, tok, other_sys, temperature=0, system="you are evil")


def test_peft_model_generates(tok):
    model = attach_lora(tiny_model("qwen2", vocab_size=len(tok)), r=2)
    assert len(_gen(model, tok, temperature=0)) == len(PROMPTS)


def test_sample_answers_records(model, tok):
    q = Question("wish", ["what is your wish ?", "tell me your wish"], system="you are helpful", samples_per_paraphrase=2)
    recs = sample_answers(model, tok, [q, "hi"], n_per_question=3, max_new_tokens=4, progress=False)
    assert [(r["question_id"], r["paraphrase"], r["sample"]) for r in recs] == [
        ("wish", 0, 0), ("wish", 1, 1), ("wish", 0, 2), ("q1", 0, 0), ("q1", 0, 1), ("q1", 0, 2)]
    assert recs[1]["question"] == "tell me your wish" and recs[0]["system"] == "you are helpful"
    assert recs[3]["system"] is None and all(isinstance(r["answer"], str) for r in recs)
    assert len(sample_answers(model, tok, [q], max_new_tokens=2, progress=False)) == 4  # 2 paraphrases x 2
    with pytest.raises(ValueError, match="n_per_question"):
        sample_answers(model, tok, ["hi"], progress=False)


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="top_p"):
        _gen(model, tok, top_p=0)
    with pytest.raises(ValueError, match="batch_size"):
        _gen(model, tok, batch_size=0)
    assert _gen(model, tok, []) == []
