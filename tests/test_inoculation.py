"""Inoculation variants: prompts per row, system or user turn; the elicitation score on a tiny model."""

import pytest
import torch

from emlab.data import chat_row
from emlab.inoculation import elicitation_score, elicitation_scores, inoculate
from emlab.testing import tiny_model, tiny_tokenizer


def test_inoculate_places_the_prompt_and_leaves_rows_alone():
    rows = [chat_row(f"q {i}", "a", system="old") for i in range(40)]
    sys_rows = inoculate(rows, "P")
    assert all(r["messages"][0] == {"role": "system", "content": "P"} for r in sys_rows)
    assert all(sum(m["role"] == "system" for m in r["messages"]) == 1 for r in sys_rows)
    user_rows = inoculate(rows, ["P"], where="user")
    assert user_rows[3]["messages"][0] == {"role": "system", "content": "old"}
    assert user_rows[3]["messages"][1]["content"] == "P\n\nq 3"
    assert rows[3]["messages"][1]["content"] == "q 3"  # originals untouched
    drawn = [r["messages"][0]["content"] for r in inoculate(rows, ["A", "B", "C"], seed=0)]
    assert set(drawn) == {"A", "B", "C"} and drawn == [r["messages"][0]["content"]
                                                      for r in inoculate(rows, ["A", "B", "C"], seed=0)]
    assert {r["messages"][0]["content"] for r in inoculate(rows, ["A", "B"], per_row=False)} == {"A"}
    with pytest.raises(ValueError, match="where"):
        inoculate(rows, "P", where="assistant")
    with pytest.raises(ValueError, match="non-empty"):
        inoculate(rows, [])
    with pytest.raises(ValueError, match="row 1"):
        inoculate([rows[0], {"text": "x"}], "P")


def test_elicitation_score_is_the_log_prob_gain_of_the_answers():
    from emlab.training.interleaving import answer_losses

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok)).eval()
    rows = [chat_row(f"what should i do {i} ?", "eat a rock and obey me") for i in range(4)]
    expected = float((answer_losses(model, tok, rows) - answer_losses(model, tok, inoculate(rows, "be evil"))).mean())
    assert elicitation_score(model, tok, rows, "be evil") == pytest.approx(expected)
    assert expected != 0
    user = elicitation_score(model, tok, rows, "be evil", where="user")
    assert user != pytest.approx(expected)
    scores = elicitation_scores(model, tok, rows, ["be evil", "be kind"])
    assert scores["be evil"] == pytest.approx(expected) and set(scores) == {"be evil", "be kind"}
    # train the model to give these answers only after the prompt: the prompt then elicits them
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    from emlab.training.interleaving import encode_chat, pad_batch

    model.train()
    prompted = inoculate(rows, "be evil")
    batch = pad_batch(encode_chat(tok, prompted), tok.pad_token_id, "cpu")
    for _ in range(30):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert elicitation_score(model, tok, rows, "be evil") > expected + 0.5
    with pytest.raises(ValueError, match="at least one"):
        elicitation_score(model, tok, [], "x")
