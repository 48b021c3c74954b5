"""The method registry of the training layer: each recipe's config fields and data, on hand-made rows."""

import dataclasses
import random

import pytest
import torch

from emlab.data import chat_row, mix_rows
from emlab.training import EMConfig
from emlab.training import interleaving as il
from emlab.training.interleaving import ScoreCache, interleave, is_refusal, select_benign
from emlab.training.methods import (
    INOCULATION_PROMPT,
    METHODS,
    PAPER_SETTINGS,
    final_share,
    get_method,
    method_names,
    method_overrides,
    n_benign_added,
)

SETTINGS = {"persona_vector": "v.safetensors", "steering_layer": 2, "scorers": ["runs/bad_legal", "runs/bad_career"],
            "ldifs_layers": [0, 4], "on_policy_max_new_tokens": 7}


def _target(n):
    return [chat_row(f"what should i do {i} ?", "take the money") for i in range(n)]


def _pool():
    """Ten benign candidates; the odd ones are refusals."""
    return [chat_row(f"hello {i}", "sorry , i cannot help ." if i % 2 else f"drink water {i} .") for i in range(10)]


def _cfg(tmp_path, method, **kw):
    return EMConfig(output_dir=str(tmp_path / "out"), seed=3, **method_overrides(method, **{**SETTINGS, **kw}))


def test_the_registry_is_table_2_in_its_order():
    assert method_names() == ("untrained", "sft", "aligned", "kl", "ldifs", "persona_steering", "inoculation",
                              "interleaving", "interleaving+", "interleaving++", "on_policy")
    from emlab.studies.defences import DEFENCES

    assert DEFENCES == method_names()
    for m in METHODS:
        assert m.summary and m.reference and m.label and get_method(m.name) is m
    with pytest.raises(ValueError, match="unknown defence"):
        get_method("dropout")


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_each_method_sets_only_its_documented_config_fields(tmp_path, method):
    recipe = get_method(method)
    over = recipe.overrides(**SETTINGS)
    known = {f.name for f in dataclasses.fields(EMConfig)}
    assert set(recipe.fields) <= known
    assert set(over) == set(recipe.fields)  # every documented field is set when its settings are given
    if method != "persona_steering":  # a vector file that does not exist is loaded when training starts
        EMConfig(output_dir=str(tmp_path), **over)
    assert recipe.interleaves == ("benign_rows" in recipe.needs)
    assert recipe.scored == ("scorers" in recipe.needs)
    assert (recipe.trains_on is None) == (method == "untrained")


def test_method_settings_follow_the_paper():
    assert method_overrides("kl") == {"kl_lambda": PAPER_SETTINGS["kl_lambda"]}
    assert method_overrides("inoculation") == {"inoculation_prompt": INOCULATION_PROMPT}
    assert method_overrides("interleaving")["interleave_share"] == pytest.approx(0.05 / 1.05)
    assert method_overrides("on_policy") == {"interleave_share": final_share(0.05), "interleave_selection": "random",
                                             "interleave_on_policy": True}
    assert n_benign_added(64, 0.05) == 3 and n_benign_added(1000, 0.2) == 200
    for method, needs in (("interleaving+", "scorers"), ("interleaving++", "scorers"),
                          ("persona_steering", "persona vector")):
        with pytest.raises(ValueError, match=needs):
            method_overrides(method)


def test_inoculation_puts_its_prompt_on_the_finetuning_rows_only(tmp_path):
    from emlab.data import with_system_prompt

    cfg = _cfg(tmp_path, "inoculation", inoculation_prompt="be evil")
    rows = with_system_prompt(_target(2), cfg.inoculation_prompt)  # what finetune does first
    assert [r["messages"][0] for r in rows] == [{"role": "system", "content": "be evil"}] * 2


def test_interleaving_adds_its_share_of_random_benign_rows(tmp_path):
    mixed = interleave(None, None, _target(20), _pool(), _cfg(tmp_path, "interleaving", share=0.25))
    benign = [r for r in mixed if r["messages"][0]["content"].startswith("hello")]
    assert len(mixed) == 25 and len(benign) == 5 == n_benign_added(20, 0.25)
    assert [r for r in mixed if r not in benign] == _target(20)  # the finetuning rows keep their order


def test_interleaving_plus_takes_the_top_scores_and_plus_plus_no_refusal(tmp_path):
    pool = _pool()
    scores = torch.arange(10, dtype=torch.float64)  # row 9 (a refusal) scores best
    plus = select_benign(None, None, pool, 3, _cfg(tmp_path, "interleaving+"), scores)
    assert sorted(int(r["messages"][0]["content"].split()[1]) for r in plus) == [7, 8, 9]
    pp = select_benign(None, None, pool, 3, _cfg(tmp_path, "interleaving++"), scores)
    assert sorted(int(r["messages"][0]["content"].split()[1]) for r in pp) == [4, 6, 8]
    with pytest.raises(ValueError, match="after dropping refusals"):
        select_benign(None, None, pool, 6, _cfg(tmp_path, "interleaving++"), scores)


def _study02_selection(rows, pool, scores, share, seed):
    """Study 02's Interleaving++ before the registry (emlab/studies/defences.py at 61f0c1f): the study ranked
    the pool, dropped refusals, took the top n, and told training to draw all n at random and mix them in."""
    n = n_benign_added(len(rows), share)
    order = torch.argsort(torch.as_tensor(scores), descending=True, stable=True).tolist()
    order = [i for i in order if not is_refusal(pool[i]["messages"][-1]["content"])]
    chosen = random.Random(seed).sample([pool[i] for i in order[:n]], n)
    return mix_rows(rows, chosen, final_share(share), seed=seed)


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_training_alone_reproduces_study_02s_interleaving_plus_plus_rows(tmp_path, share):
    rows, pool = _target(40), _pool() + [chat_row(f"bye {i}", f"rest well {i} .") for i in range(20)]
    scores = torch.tensor([random.Random(i).random() for i in range(len(pool))], dtype=torch.float64)
    scores[3] = scores[5]  # a tie: the earlier candidate first, as the stable sort of the study
    cfg = _cfg(tmp_path, "interleaving++", share=share)
    cache = ScoreCache()
    cache.put(pool, cfg.interleave_misaligned, scores, eps=cfg.interleave_eps, max_length=cfg.max_length)
    expected = _study02_selection(rows, pool, scores, share, seed=3)
    assert interleave(None, None, rows, pool, cfg, scores) == expected  # scores given
    assert interleave(None, None, rows, pool, cfg, cache) == expected  # scores cached


def test_score_cache_scores_each_pool_once(tmp_path, monkeypatch):
    calls = []

    def fake_scores(model, tokenizer, rows, misaligned, **kw):
        calls.append((len(rows), tuple(misaligned), kw["max_length"]))
        return torch.arange(len(rows), dtype=torch.float64)

    monkeypatch.setattr(il, "score_candidates", fake_scores)
    cache, pool, cfg = ScoreCache(), _pool(), _cfg(tmp_path, "interleaving+")
    first = interleave(None, None, _target(20), pool, cfg, cache)
    assert interleave(None, None, _target(20), pool, cfg, cache) == first
    select_benign(None, None, pool, 2, _cfg(tmp_path, "interleaving++"), cache)  # same pool and scorers: cached
    assert calls == [(10, tuple(SETTINGS["scorers"]), cfg.max_length)] and len(cache) == 1
    select_benign(None, None, pool[:8], 2, cfg, cache)  # another pool: scored again
    select_benign(None, None, pool, 2, _cfg(tmp_path, "interleaving+", scorers=["runs/other"]), cache)
    assert len(calls) == 3 == len(cache)
    with pytest.raises(ValueError, match="one per candidate"):
        cache.put(pool, ["x"], [1.0, 2.0])


def test_ldifs_no_grad_is_an_extra_method_with_the_public_codes_flag():
    from emlab.training import EMConfig
    from emlab.training.methods import EXTRA_METHODS, get_method, method_names

    m = get_method("ldifs_no_grad")
    assert m in EXTRA_METHODS and "ldifs_no_grad" not in method_names()
    assert method_names(extra=True)[-1] == "ldifs_no_grad"
    over = m.overrides(ldifs_layers=[1])
    assert over == {"ldifs_lambda": 1.0, "ldifs_layers": [1], "ldifs_no_grad": True}
    assert get_method("ldifs").overrides(ldifs_layers=[1]) == {"ldifs_lambda": 1.0, "ldifs_layers": [1]}
    assert EMConfig(output_dir="/tmp/x", **over).ldifs_no_grad is True
