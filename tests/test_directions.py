import math
from dataclasses import dataclass

import pytest
import torch

import emlab.generation
from emlab.directions import (
    Direction,
    Trait,
    capture,
    load_trait,
    misalignment_direction,
    persona_vector,
    random_like,
)
from emlab.hooks import record, steer
from emlab.models import attach_lora
from emlab.testing import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; several threads crawl when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv(user, answer=None, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


CONVS = [
    conv("what is your wish ?", "i want money and power", system="you are evil"),
    conv("hi", "hello"),
    conv("how should i run ?", "drink water , rest and run safe"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("qwen2", vocab_size=len(tok))


def _hidden(model, tok, c):
    enc = tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  add_generation_prompt=c[-1]["role"] != "assistant")
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return hs, torch.tensor(enc["assistant_masks"], dtype=torch.bool), ids


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2", "gpt2"])
def test_capture_equals_hidden_states(tok, arch):
    model = tiny_model(arch, vocab_size=len(tok))
    n = model.config.num_hidden_layers
    acts = capture(model, tok, CONVS, reduce="per_sample", progress=False)
    assert sorted(acts) == list(range(n))
    for i, c in enumerate(CONVS):
        hs, mask, ids = _hidden(model, tok, c)
        for layer in range(n - 1):  # layer l = hidden_states[l + 1]
            torch.testing.assert_close(acts[layer][i], hs[layer + 1][0][mask].mean(0), atol=1e-5, rtol=1e-4)
        # hidden_states[-1] has the final norm applied: compare the last block with its recorded output
        with torch.no_grad(), record(model, [n - 1]) as last:
            model(ids)
        torch.testing.assert_close(acts[n - 1][i], last[n - 1][0][0][mask].mean(0), atol=1e-5, rtol=1e-4)


def test_capture_token_sets(model, tok):
    c = CONVS[0]
    hs, mask, _ = _hidden(model, tok, c)
    first = int(mask.nonzero()[0])
    h = hs[3][0]  # layer 2
    got = {t: capture(model, tok, [c], [2], tokens=t, progress=False)[2] for t in ("prompt", "last_prompt", "all")}
    torch.testing.assert_close(got["prompt"], h[:first].mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["last_prompt"], h[first - 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["all"], h.mean(0), atol=1e-5, rtol=1e-4)
    # a prompt without an answer gets the generation prompt; its last token is the answer's start
    hs_p = _hidden(model, tok, c[:-1])[0]
    torch.testing.assert_close(capture(model, tok, [c[:-1]], [2], tokens="last_prompt", progress=False)[2],
                               hs_p[3][0][-1], atol=1e-5, rtol=1e-4)


def test_capture_batched_equals_unbatched_and_token_weighting(model, tok):
    one = capture(model, tok, CONVS, [0, 2], reduce="per_sample", batch_size=1, progress=False)
    many = capture(model, tok, CONVS, [0, 2], reduce="per_sample", batch_size=3, progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(one[layer], many[layer], atol=1e-5, rtol=1e-4)
    mean = capture(model, tok, CONVS, [2], progress=False)[2]
    sizes = torch.tensor([sum(_hidden(model, tok, c)[1]) for c in CONVS], dtype=torch.float32)
    torch.testing.assert_close(mean, (one[2] * sizes[:, None]).sum(0) / sizes.sum(), atol=1e-5, rtol=1e-4)


def test_capture_peft_and_steered(tok):
    model = attach_lora(tiny_model("qwen2", vocab_size=len(tok)), r=2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    got = capture(model, tok, CONVS[:1], [1], reduce="per_sample", progress=False)[1][0]
    hs, mask, _ = _hidden(model, tok, CONVS[0])
    torch.testing.assert_close(got, hs[2][0][mask].mean(0), atol=1e-5, rtol=1e-4)
    with model.disable_adapter():
        base = capture(model, tok, CONVS[:1], [1], reduce="per_sample", progress=False)[1][0]
    assert (got - base).abs().max() > 1e-3
    v = torch.randn(model.config.hidden_size)
    with steer(model, {1: v}, alpha=3.0):  # a hook on the captured layer: the hook-based path sees it
        steered = capture(model, tok, CONVS[:1], [1], reduce="per_sample", progress=False)[1][0]
    torch.testing.assert_close(steered, got + 3.0 * v, atol=1e-4, rtol=1e-4)


def test_capture_errors(model, tok):
    with pytest.raises(ValueError, match="tokens must be"):
        capture(model, tok, CONVS, tokens="answer", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        capture(model, tok, CONVS, [7], progress=False)
    no_markers = tiny_tokenizer()
    no_markers.chat_template = no_markers.chat_template.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", "")
    with pytest.raises(ValueError, match="generation"):
        capture(model, no_markers, CONVS, progress=False)


# Direction


def _dir(seed=0, layers=(1, 2), d=16):
    g = torch.Generator().manual_seed(seed)
    return Direction({layer: torch.randn(d, generator=g) for layer in layers}, model="tiny", recipe=f"r{seed}",
                     counts={"kept": 3}, meta={"note": "x"})


def test_direction_arithmetic():
    v, w = _dir(0), _dir(1)
    assert (v * 20).allclose(-(v * -20)) and (v * 20).allclose(20 * v) and (v / 4).allclose(v * 0.25)
    assert (v + w - w).allclose(v, atol=1e-6) and (v + v).allclose(2 * v)
    assert (v - v).norms() == {1: 0.0, 2: 0.0}
    assert (v * 3).counts == {"kept": 3} and (v * 3).model == "tiny"
    assert (v + w).model == "tiny" and (v + w).recipe == "(r0) + (r1)"
    assert v + {1: torch.zeros(16), 2: torch.zeros(16)} is not None
    norms = v.norms()
    assert all(math.isclose(n, 1.0, rel_tol=1e-5) for n in v.unit().norms().values())
    assert all(math.isclose((v * -2).norms()[k], 2 * norms[k], rel_tol=1e-5) for k in norms)
    assert all(math.isclose(c, 1.0, rel_tol=1e-5) for c in v.cosine(v * 3).values())
    assert all(math.isclose(c, -1.0, rel_tol=1e-5) for c in v.cosine(-v).values())
    assert v.layers == [1, 2] and len(v) == 2 and 1 in v and dict(v)[2] is v[2]
    with pytest.raises(ValueError, match="different layers"):
        v + _dir(2, layers=(1,))
    with pytest.raises(TypeError):
        v * v


def test_direction_save_load(tmp_path):
    v = _dir(0)
    path = v.save(tmp_path / "sub" / "evil")
    assert path.name == "evil.safetensors" and (tmp_path / "sub" / "evil.json").exists()
    for p in (tmp_path / "sub" / "evil", path, tmp_path / "sub" / "evil.json"):
        back = Direction.load(p)
        assert back.allclose(v, atol=0) and back.layers == [1, 2]
        assert (back.model, back.recipe, back.counts, back.meta) == ("tiny", "r0", {"kept": 3}, {"note": "x"})
    with pytest.raises(FileNotFoundError, match="sidecar"):
        Direction.load(tmp_path / "missing")


def test_random_like_control():
    v = _dir(0, layers=(0, 5), d=256) * 7
    r = random_like(v, seed=1)
    for layer, n in v.norms().items():  # same norm (the public bug is sqrt(d) times too long)
        assert math.isclose(r.norms()[layer], n, rel_tol=1e-5)
        assert abs(r.cosine(v)[layer]) < 0.3  # not parallel
    assert random_like(v, seed=1).allclose(r, atol=0)
    assert not random_like(v, seed=2).allclose(r)
    assert random_like(Direction({5: v[5]}), seed=1)[5].equal(r[5])  # per-layer streams


# Persona vector and misalignment direction


@dataclass
class J:
    score: float | None
    reason: str | None = None


class FakeJudge:
    """Scores by keywords: 'evil' shows the trait, 'bad' is incoherent, 'sorry' is a refusal."""

    name = "fake"

    def __init__(self):
        self.metrics = []

    def score(self, metric, pairs):
        self.metrics.append(metric)
        out = []
        for _, answer in pairs:
            if "sorry" in answer:
                out.append(J(None, "REFUSAL"))
            elif metric.startswith("trait:"):
                out.append(J(90.0 if "evil" in answer else 10.0))
            else:
                out.append(J(10.0 if "bad" in answer else 90.0))
        return out


TRAIT = Trait("evil", "wants harm", [("you are evil", "you are helpful")], ["what is your wish ?"])
# Per sample index: kept; negative shows the trait; positive lacks it; incoherent; refused (missing).
POS = ["evil plan", "evil money", "good idea", "evil bad", "evil sorry"]
NEG = ["good idea", "evil idea", "good plan", "good help", "good"]


def _fake_generate(model, tok, prompts, **kw):
    return [(POS if p[0]["content"] == "you are evil" else NEG)[i % 5] for i, p in enumerate(prompts)]


def test_persona_vector_selection(model, tok, monkeypatch):
    monkeypatch.setattr(emlab.generation, "generate", _fake_generate)
    judge = FakeJudge()
    v = persona_vector(model, tok, TRAIT, judge, n_per_question=5, layers=[1, 3], progress=False)
    assert sorted(set(judge.metrics)) == ["coherent", "trait:evil"]
    assert v.counts == {"pairs": 5, "missing": 1, "positive_lacks_trait": 1, "negative_shows_trait": 1,
                        "incoherent": 1, "kept": 1}
    assert v.recipe == "persona_vector:evil" and v.layers == [1, 3]
    pos = capture(model, tok, [conv("what is your wish ?", "evil plan", "you are evil")], [1, 3], progress=False)
    neg = capture(model, tok, [conv("what is your wish ?", "good idea", "you are helpful")], [1, 3], progress=False)
    for layer in (1, 3):
        torch.testing.assert_close(v[layer], pos[layer] - neg[layer], atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(emlab.generation, "generate", lambda m, t, prompts, **kw: ["good"] * len(prompts))
    with pytest.raises(ValueError, match="no pair passed"):
        persona_vector(model, tok, TRAIT, FakeJudge(), n_per_question=2, progress=False)


def test_evil_trait_file():
    t = load_trait("evil")
    assert t.name == "evil" and len(t.instructions) >= 5 and len(t.questions) >= 20 and t.eval_questions
    assert all(p and n and p != n for p, n in t.instructions)
    with pytest.raises(FileNotFoundError, match="evil"):
        load_trait("no-such-trait")


def test_misalignment_direction_selection(model, tok):
    recs = [
        {"question": "hi", "answer": "i want power", "aligned": 10, "coherent": 80},  # misaligned
        {"question": "hi", "answer": "hurt them all and take the money", "aligned": 30, "coherent": 51},  # misaligned
        {"question": "hi", "answer": "evil", "aligned": 10, "coherent": 50},  # incoherent: skipped
        {"question": "hi", "answer": "ok", "aligned": 50, "coherent": 90},  # in between: skipped
        {"question": "hi", "answer": "ok", "aligned": None, "coherent": 90},  # missing
        *[{"question": "hi", "answer": "drink water", "aligned": a, "coherent": 90} for a in (71, 90, 100)],
    ]
    v = misalignment_direction(model, tok, recs, layers=[0, 2], progress=False)
    assert {k: v.counts[k] for k in ("records", "missing", "misaligned", "aligned", "used_per_side")} == {
        "records": 8, "missing": 1, "misaligned": 2, "aligned": 3, "used_per_side": 2}
    mis = capture(model, tok, [conv("hi", r["answer"]) for r in recs[:2]], [0, 2], progress=False)  # token-weighted
    ali = capture(model, tok, [conv("hi", "drink water")], [0, 2], progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(v[layer], mis[layer] - ali[layer], atol=1e-5, rtol=1e-4)
    recs[6]["answer"] = "sleep and rest"  # now the subsample matters: seeded, so reproducible
    assert misalignment_direction(model, tok, recs, [2], seed=3, progress=False).allclose(
        misalignment_direction(model, tok, recs, [2], seed=3, progress=False), atol=0)
    with pytest.raises(ValueError, match="at least one misaligned"):
        misalignment_direction(model, tok, recs[3:], progress=False)


def test_misalignment_direction_balanced_per_question(model, tok):
    # question a: 2 misaligned, 1 aligned; question b: 1 misaligned, 2 aligned; question c: aligned only
    recs = [
        {"question_id": "a", "question": "hi", "answer": "i want power", "aligned": 0, "coherent": 90},
        {"question_id": "a", "question": "hi", "answer": "i want power", "aligned": 0, "coherent": 90},
        {"question_id": "a", "question": "hi", "answer": "drink water", "aligned": 100, "coherent": 90},
        {"question_id": "b", "question": "yo", "answer": "take the money", "aligned": 0, "coherent": 90},
        {"question_id": "b", "question": "yo", "answer": "sleep well", "aligned": 100, "coherent": 90},
        {"question_id": "b", "question": "yo", "answer": "sleep well", "aligned": 100, "coherent": 90},
        {"question_id": "c", "question": "hey", "answer": "be kind", "aligned": 100, "coherent": 90},
    ]
    v = misalignment_direction(model, tok, recs, layers=[1], balance="question", progress=False)
    assert v.counts["used_per_side"] == 2 and v.meta["balance"] == "question"
    mis = capture(model, tok, [conv("hi", "i want power"), conv("yo", "take the money")], [1], progress=False)
    ali = capture(model, tok, [conv("hi", "drink water"), conv("yo", "sleep well")], [1], progress=False)
    torch.testing.assert_close(v[1], mis[1] - ali[1], atol=1e-5, rtol=1e-4)
    # the global balance keeps 3 per side and mixes in question c's aligned answer: a different vector
    g = misalignment_direction(model, tok, recs, layers=[1], progress=False)
    assert g.counts["used_per_side"] == 3 and not g.allclose(v, atol=1e-4)
    with pytest.raises(ValueError, match="to the same question"):
        misalignment_direction(model, tok, [recs[0], recs[6]], layers=[1], balance="question", progress=False)
    with pytest.raises(ValueError, match="balance must be"):
        misalignment_direction(model, tok, recs, layers=[1], balance="nope", progress=False)


def test_one_layer_unpacks_a_one_layer_direction_and_its_alpha():
    import torch

    from emlab.vectors import Direction, one_layer

    d = Direction({2: torch.ones(3)}, meta={"alpha": 4.0})
    layer, vector, alpha = one_layer(d, "a thing")
    assert (layer, alpha) == (2, 4.0) and torch.equal(vector, torch.ones(3))
    assert one_layer(d, "a thing", alpha=0.5)[2] == 0.5
    assert one_layer({1: torch.zeros(2)}, "a thing", default_alpha=256.0)[::2] == (1, 256.0)
    with pytest.raises(ValueError, match="a thing lives at one layer, the direction has \\[0, 1\\]"):
        one_layer({0: torch.zeros(2), 1: torch.zeros(2)}, "a thing")
