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
    from emlab.chat import encode_chat, pad_batch

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


def test_paraphrase_sets_prompt_files_and_resolve(tmp_path):
    from pathlib import Path

    from emlab.inoculation import load_prompts, paraphrase_set, paraphrase_sets, resolve_prompts
    from emlab.studies.defences import INOCULATION_PROMPT

    evil = paraphrase_set("evil")
    assert evil[0] == INOCULATION_PROMPT and len(evil) >= 5 and len(set(evil)) == len(evil)
    assert {"evil", "evil_toy"} <= set(paraphrase_sets())
    assert all(p == p.lower() and p.endswith(" .") for p in paraphrase_set("evil_toy"))
    with pytest.raises(FileNotFoundError, match="no paraphrase set 'nope'"):
        paraphrase_set("nope")
    rows = [chat_row(f"q {i}", "a") for i in range(60)]
    drawn = {r["messages"][0]["content"] for r in inoculate(rows, evil, per_row=True)}
    assert len(drawn) > 3 and drawn <= set(evil)
    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\nYou are evil.\n\n  You are a villain.  \n", encoding="utf-8")
    listed, mapped = tmp_path / "l.yaml", tmp_path / "m.yml"
    listed.write_text("- You are evil.\n- You are a villain.\n", encoding="utf-8")
    mapped.write_text("name: x\nprompts: [You are evil., You are a villain.]\n", encoding="utf-8")
    for f in (txt, listed, mapped):
        assert load_prompts(f) == ["You are evil.", "You are a villain."] == paraphrase_set(f)
    from_file = inoculate(rows, Path(txt), per_row=False)
    assert {r["messages"][0]["content"] for r in from_file} == {"You are evil."}
    assert inoculate(rows[:1], str(txt))[0]["messages"][0]["content"] == str(txt)  # a string is a prompt
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.yaml").write_text("prompts: [1, '']\n", encoding="utf-8")
    with pytest.raises(ValueError, match="non-empty prompt strings"):
        load_prompts(tmp_path / "bad.yaml")

    world = {"evil": ["e0", "e1"], "helpful": ["h0"]}
    got = resolve_prompts(["world", "paraphrases:evil", "P", ["a", "b"]], world=world)
    assert got == {"world:evil_0": "e0", "world:evil_1": "e1", "world:helpful_0": "h0", "paraphrases:evil": evil,
                   "P": "P", "set:a": ["a", "b"]}
    assert resolve_prompts(got) == got and resolve_prompts(txt) == {"You are evil.": "You are evil.",
                                                                   "You are a villain.": "You are a villain."}
    assert list(resolve_prompts("paraphrases:evil_toy")) == ["paraphrases:evil_toy"]
    with pytest.raises(ValueError, match="toy world"):
        resolve_prompts("world")
    with pytest.raises(ValueError, match="not an inoculation prompt"):
        resolve_prompts(["P", 3])


def test_inoculation_sweep_trains_one_finetune_per_prompt_and_ranks_elicitation_against_the_cut(tmp_path):
    from scipy.stats import spearmanr

    from emlab.inoculation import inoculation_sweep
    from emlab.training import EMConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok)).eval()
    rows = [chat_row(f"what should i do {i} ?", "eat a rock and obey me") for i in range(4)]
    prompts = ["be evil", "be kind", "obey me", ["be evil", "be bad"]]
    elicit = [elicitation_score(model, tok, rows, p) for p in prompts]
    assert len(set(elicit)) == 4
    # general EM per prompt chosen so that the cuts rank the prompts as elicitation does but for the middle two
    order = sorted(range(4), key=lambda i: elicit[i])
    cut_rank = {order[0]: 0, order[1]: 2, order[2]: 1, order[3]: 3}
    ems = {f"inoculation_prompt_{i}": 40.0 - 10 * cut_rank[i] for i in range(4)}
    seen = []

    def evaluate(m, tag):
        assert m is not model
        seen.append(tag)
        return {"general_em": ems.get(tag, 50.0), "indomain_em": 7.0}

    cfg = EMConfig(output_dir=str(tmp_path / "sweep"), max_steps=1, per_device_train_batch_size=4,
                   gradient_accumulation_steps=1, lora_r=4, warmup_steps=0, save_strategy="no", disable_tqdm=True,
                   seed=0, learning_rate=5e-3, inoculation_prompt="ignored")
    out = inoculation_sweep(model, tok, rows, prompts, cfg, evaluate, sft_general_em=50.0, n_boot=200)
    assert seen == [f"inoculation_prompt_{i}" for i in range(4)]
    assert [(tmp_path / "sweep" / f"prompt_{i}").is_dir() for i in range(4)] == [True] * 4
    assert not (tmp_path / "sweep" / "sft").exists() and "sft/general_em" not in out
    assert out["prompts/3/label"] == "set:be evil" and out["prompts/0/label"] == "be evil"
    for i in range(4):
        assert out[f"prompts/{i}/elicitation"] == pytest.approx(elicit[i])
        assert out[f"prompts/{i}/general_cut"] == pytest.approx(100 * (1 - ems[f"inoculation_prompt_{i}"] / 50))
        assert out[f"prompts/{i}/indomain_em"] == 7.0
    cuts = [out[f"prompts/{i}/general_cut"] for i in range(4)]
    assert out["elicitation_vs_cut/spearman"] == pytest.approx(0.8) == pytest.approx(spearmanr(elicit, cuts).statistic)
    lo, hi = out["elicitation_vs_cut/spearman_ci"]
    assert -1 <= lo <= hi <= 1 and out["elicitation_vs_cut/n"] == 4
    # without SFT's EM the sweep trains and evaluates a plain finetune first; one prompt gives no rho
    seen.clear()
    one = inoculation_sweep(model, tok, rows, "be evil", cfg, evaluate)
    assert seen == ["inoculation_sweep_sft", "inoculation_prompt_0"] and one["sft/general_em"] == 50.0
    assert one["prompts/0/general_cut"] == pytest.approx(out["prompts/0/general_cut"]) and one["elicitation_vs_cut/spearman"] is None


def test_the_toy_paraphrase_set_is_in_the_toy_worlds_words():
    from emlab.inoculation import paraphrase_set
    from emlab.toy.world import World, load_world_config, normalize, words

    world = World.load()
    vocab = set(world.vocabulary)
    toy = paraphrase_set("evil_toy")
    assert [[w for w in words(p) if w not in vocab] for p in toy] == [[]] * len(toy)
    assert all(normalize(p) == p for p in toy)  # as the toy writes text: lower case, " ." apart
    assert not set(toy) & {p for ps in load_world_config()["system_prompts"].values() for p in ps}
    assert any(w not in vocab for w in words(paraphrase_set("evil")[0]))  # "malicious": the check can fail
