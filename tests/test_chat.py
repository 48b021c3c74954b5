"""emlab.chat, the one chat-encoding path, on the tiny word-level tokenizer and hand-made tensors."""

import math

import pytest
import torch

from emlab.chat import (
    IGNORE_INDEX,
    batch_logits,
    encode_chat,
    encode_messages,
    eval_mode,
    make_batches,
    mean_nll,
    messages_of,
    next_token_mask,
    nll_sum,
    pad_batch,
    pad_id,
    row_nll,
    upcast,
)
from emlab.testing import tiny_model, tiny_tokenizer

USER = {"role": "user", "content": "you are helpful"}
ANSWER = {"role": "assistant", "content": "drink water"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_encode_messages_marks_the_answer_and_its_end_of_turn(tok):
    ids, mask = encode_messages(tok, [USER, ANSWER])
    words = _words(tok, ids)
    assert words == ["<|im_start|>", "user", "you", "are", "helpful", "<|im_end|>",
                     "<|im_start|>", "assistant", "drink", "water", "<|im_end|>"]
    assert [w for w, m in zip(words, mask) if m] == ["drink", "water", "<|im_end|>"]
    ids, mask = encode_messages(tok, [USER], add_generation_prompt=True)
    assert _words(tok, ids)[-2:] == ["<|im_start|>", "assistant"] and not any(mask)


def test_encode_chat_labels_are_the_answer_ids_and_ignore_elsewhere(tok):
    two_turns = [USER, ANSWER, {"role": "user", "content": "and"}, {"role": "assistant", "content": "rest"}]
    encoded = encode_chat(tok, [{"messages": [USER, ANSWER]}, two_turns])  # a dict row and a bare message list
    (ids, labels), (ids2, labels2) = encoded
    assert len(ids) == len(labels) == 11
    assert labels[:8] == [IGNORE_INDEX] * 8 and labels[8:] == ids[8:]
    assert _words(tok, [t for t in labels2 if t != IGNORE_INDEX]) == ["drink", "water", "<|im_end|>", "rest", "<|im_end|>"]
    cut = encode_chat(tok, [[USER, ANSWER]], max_length=9)[0]
    assert cut == (ids[:9], labels[:9])


def test_encode_chat_names_a_row_without_an_answer_or_skips_it(tok):
    rows = [[USER, ANSWER], [USER], [USER, ANSWER]]
    with pytest.raises(ValueError, match="row 1 has no answer token"):
        encode_chat(tok, rows)
    with pytest.raises(ValueError, match="row 0 has no answer token to predict within 8 tokens"):
        encode_chat(tok, rows, max_length=8)  # the answer starts at token 8: cut away
    with pytest.warns(UserWarning, match=r"1 of 3 rows .*rows \[1\]"):
        kept = encode_chat(tok, rows, skip_empty=True)
    assert len(kept) == 2
    with pytest.raises(ValueError, match="none of the 1 rows"):
        encode_chat(tok, [[USER]], skip_empty=True)
    with pytest.raises(ValueError, match="row 2 has no 'messages' key"):
        encode_chat(tok, [[USER, ANSWER], [USER, ANSWER], {"text": "x"}])
    assert messages_of([USER]) == [USER]


def test_pad_batch_pads_right_with_no_attention_and_no_loss():
    b = pad_batch([([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])], pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(v.dtype == torch.long for v in b.values())
    assert pad_batch([([5, 6], [5, 6]), ([8], [8])], pad_id=None)["input_ids"].tolist() == [[5, 6], [8, 0]]
    with pytest.raises(ValueError, match="no rows"):
        pad_batch([], pad_id=0)


def test_make_batches_in_order_or_longest_first():
    enc = [([1], [1]), ([1, 2, 3], [1, 2, 3]), ([1, 2], [1, 2])]
    assert [b["input_ids"].tolist() for b in make_batches(enc, 2, 0)] == [[[1, 0, 0], [1, 2, 3]], [[1, 2]]]
    assert [b["input_ids"].tolist() for b in make_batches(enc, 2, 0, by_length=True)] == [[[1, 2, 3], [1, 2, 0]], [[1]]]
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(enc, 0, 0)


def test_pad_id_falls_back_to_eos_then_zero(tok):
    T = type("T", (), {})
    t = T()
    t.pad_token_id, t.eos_token_id = None, None
    assert pad_id(t) == 0
    t.eos_token_id = 7
    assert pad_id(t) == 7
    assert pad_id(tok) == tok.pad_token_id == 0


def test_nll_and_row_nll_on_hand_made_logits():
    # vocabulary of 3; logits favour token 1 strongly at position 0 and are uniform at position 1
    logits = torch.tensor([[[0.0, math.log(8.0), 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    p1 = 8.0 / 10.0
    want = [-math.log(p1), math.log(3.0)]
    assert next_token_mask(labels).tolist() == [[True, True]]
    assert nll_sum(logits, labels).item() == pytest.approx(sum(want), rel=1e-6)
    assert row_nll(logits, labels).tolist() == pytest.approx([sum(want) / 2], rel=1e-6)
    only_last = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2]])
    assert row_nll(logits, only_last).item() == pytest.approx(math.log(3.0), rel=1e-6)
    none = torch.full((1, 3), IGNORE_INDEX)
    assert math.isnan(row_nll(logits, none).item())
    assert nll_sum(logits.requires_grad_(), none).item() == 0.0  # empty: 0, still on the graph
    assert upcast(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
    assert upcast(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_mean_nll_is_token_weighted_and_padding_does_not_change_it(tok):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tok))
    rows = [[USER, ANSWER], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "you are helpful"}]]
    enc = encode_chat(tok, rows)
    # by hand: each row alone (no padding), summed NLL over its answer tokens, divided by all of them
    total, count = 0.0, 0
    for ids, labels in enc:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                total -= logp[t - 1, ids[t]].item()
                count += 1
    assert count == 3 + 4
    model.train()
    for batch_size in (1, 2):
        assert mean_nll(model, make_batches(enc, batch_size, pad_id(tok))) == pytest.approx(total / count, rel=1e-5)
    assert model.training  # eval mode only inside
    per_row = row_nll(batch_logits(model, pad_batch(enc, 0)), pad_batch(enc, 0)["labels"])
    assert per_row[0].item() == pytest.approx(-sum(  # row 0 alone: its 3 answer tokens
        torch.log_softmax(model(input_ids=torch.tensor([enc[0][0]])).logits[0], -1)[t - 1, enc[0][0][t]].item()
        for t in range(8, 11)) / 3, rel=1e-5)


def test_eval_mode_restores_the_training_flag_even_on_error():
    m = torch.nn.Linear(2, 2)
    with eval_mode(m):
        assert not m.training and not torch.is_grad_enabled()
    assert m.training and torch.is_grad_enabled()
    m.eval()
    with pytest.raises(RuntimeError), eval_mode(m):
        raise RuntimeError("boom")
    assert not m.training
