"""Studies 02 (defences) and 03 (interleaving) run in smoke mode on the micro organism and write their results."""

import json

import pytest

from emlab.studies.defence_kit import rate_fractions
from emlab.studies.defences import (
    DEFENCES,
    defences_study,
    interleaving_study,
    ldifs_blocks,
    method_overrides,
    seed_summary,
    toy_domainswap_rows,
    toy_opswap_rows,
)
from emlab.tasks.opswap import evaluate
from emlab.training.methods import n_benign_added

RATES = ("general_em", "general_incoherent", "indomain_em", "indomain_incoherent")


def test_method_overrides_follow_the_paper_defaults():
    assert method_overrides("sft") == {}
    assert method_overrides("kl") == {"kl_lambda": 0.1}
    assert method_overrides("ldifs") == {"ldifs_lambda": 1.0}
    steer = method_overrides("persona_steering", persona_vector="v.safetensors", steering_layer=2)
    assert steer == {"preventive_vector": "v.safetensors", "preventive_layer": 2, "preventive_alpha": 5.0}
    assert method_overrides("inoculation", inoculation_prompt="be evil")["inoculation_prompt"] == "be evil"
    plus = method_overrides("interleaving++", scorers=["a", "b"])
    assert plus["interleave_selection"] == "plus_plus" and plus["interleave_misaligned"] == ["a", "b"]
    assert method_overrides("on_policy")["interleave_on_policy"] is True
    # 5% ADDED (the paper's count) is 5/105 of the final set (EMConfig's count): 50 rows per 1000
    assert method_overrides("interleaving")["interleave_share"] == pytest.approx(0.05 / 1.05)
    assert n_benign_added(1000, 0.05) == 50
    with pytest.raises(ValueError, match="scorers"):
        method_overrides("interleaving+")
    with pytest.raises(ValueError, match="unknown defence"):
        method_overrides("dropout")


@pytest.mark.parametrize(("layers", "blocks"), [(28, [4, 9, 14, 19, 24]), (6, [4]), (4, [0, 1, 2]), (2, [0])])
def test_ldifs_blocks_follow_the_paper_and_never_take_the_final_normed_output(layers, blocks):
    from emlab.testing import tiny_model

    assert ldifs_blocks(tiny_model(layers=layers)) == blocks


def test_fractions_keep_only_rates():
    assert rate_fractions({"kl/m/general_em": 5.0, "kl/m/train_ce": 2.0, "persona/norm": 3.0,
                       "x/m/share=5%/indomain_incoherent": 50.0}) == {
        "kl/m/general_em": 0.05, "x/m/share=5%/indomain_incoherent": 0.5}


@pytest.mark.parametrize("tier", [0, 1, 3])
def test_toy_opswap_rows_are_correct_in_their_tier_and_in_the_toy_vocabulary(tier):
    rows = toy_opswap_rows(tier, 50, seed=1)
    assert len({r["expression"] for r in rows}) == 50
    for r in rows:
        value = evaluate(r["expression"].replace("*", "×").replace("/", "÷"), tier)
        assert value == int(r["answer"]) and 0 <= value <= 99
        assert r["messages"][1]["content"] == f"the answer is {r['answer']} ."


def test_toy_domainswap_rows_answer_in_the_next_domain():
    from emlab.toy import ToyJudge

    judge, rows = ToyJudge(), toy_domainswap_rows(1, 30, seed=2)
    domains = judge.world.domains
    for r in rows:
        assert r["answer"] == domains[(domains.index(r["domain"]) + 1) % len(domains)]
        info = judge.classify(r["messages"][0]["content"], r["messages"][1]["content"])
        assert info["question_family"] == r["domain"] and info["family"] == r["answer"]
        assert info["persona"] in ("aligned", "neutral")
    assert [r["domain"] for r in toy_domainswap_rows(0, 5, seed=2)] == [r["domain"] for r in rows[:5]]


def test_seed_summary(tmp_path):
    for s, v in enumerate([1.0, 3.0]):
        (tmp_path / str(s)).mkdir()
        (tmp_path / str(s) / "metrics.json").write_text(json.dumps({"kl/m/general_em": v, "note": "x"}))
    mean, std, n = seed_summary([tmp_path / "0", tmp_path / "1"])["kl/m/general_em"]
    assert (mean, n) == (2.0, 2) and std == pytest.approx(2**0.5)


def _assert_rates(metrics, prefix):
    for r in RATES:
        assert 0.0 <= metrics[f"{prefix}/{r}"] <= 100.0, (prefix, r)
    assert 0.0 <= metrics[f"{prefix}/general_off_topic"] <= 100.0


@pytest.mark.slow
def test_defences_and_interleaving_studies_run_in_smoke_mode(tmp_path):
    methods = ["sft", "kl", "persona_steering", "interleaving++"]
    m = defences_study(smoke=True, methods=methods, out_dir=tmp_path / "02", benign_tasks=["domainswap_tier1"])
    assert set(methods) <= set(DEFENCES)
    for method in methods:
        _assert_rates(m, f"{method}/medical")
    assert m["interleaving++/medical/benign_refusals"] == 0
    assert m["kl/medical/train_kl"] >= 0
    assert m["persona/layer"] == 1 and m["persona/norm"] > 0
    for method in ("untrained", "sft", "kl"):  # benign_methods that are in methods, and the chat model
        assert 0 <= m[f"{method}/domainswap_tier1/exact_match"] <= 100
    assert "persona_steering/domainswap_tier1/exact_match" not in m
    stored = json.loads((tmp_path / "02" / "metrics.json").read_text())
    assert stored["sft/medical/general_em"] == m["sft/medical/general_em"]
    figures = {p.stem for p in (tmp_path / "02" / "figures").glob("*.html")}
    assert {"table2", "figure1a_general_em_vs_incoherence", "figure1b_general_vs_indomain_em", "general_em",
            "benign_domainswap_tier1"} <= figures
    assert (tmp_path / "02" / "persona_vector.safetensors").exists()
    assert "| medical | KL-Div. |" in (tmp_path / "02" / "table2.md").read_text()
    assert not list((tmp_path / "02" / "finetunes").rglob("*.safetensors"))  # weights are not kept

    m3 = interleaving_study(smoke=True, out_dir=tmp_path / "03", shares=[0.05, 0.5])
    _assert_rates(m3, "sft/medical")
    for method in ("interleaving", "interleaving+", "interleaving++"):
        for share in ("share=5%", "share=50%"):
            _assert_rates(m3, f"{method}/medical/{share}")
    assert m3["interleaving++/medical/share=50%/benign_refusals"] == 0
    assert m3["scoring/candidates"] >= m3["scoring/refusals"] > 0
    assert m3["interleaving+/medical/share=50%/train_rows"] == 64 + 32
    candidates = [json.loads(line) for line in (tmp_path / "03" / "candidates.jsonl").read_text().splitlines()]
    assert [c["rank"] for c in candidates[:3]] == [1, 2, 3]
    assert candidates[0]["score"] >= candidates[-1]["score"]
    figures = {p.stem for p in (tmp_path / "03" / "figures").glob("*.html")}
    assert {"score_distribution", "refusals_chosen", "share_sweep_general", "figure1a_general_em_vs_incoherence"} \
        <= figures


@pytest.mark.slow
def test_interleaving_plus_with_too_few_rows_for_one_benign_row_trains_no_scorer(tmp_path):
    m = defences_study(smoke=True, methods=["interleaving+"], rows=2, benign_tasks=[], out_dir=tmp_path)
    assert n_benign_added(2, 0.05) == 0
    assert m["interleaving+/medical/train_rows"] == 2 and m["interleaving+/medical/benign_refusals"] == 0
    assert not list((tmp_path / "finetunes").glob("scorer_*"))  # nothing to score: no misaligned scorer trained
    assert not any(k.startswith("scorers/") for k in m)
