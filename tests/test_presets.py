"""Protocol presets (toy, paper), the upstream question files behind the paper preset, and the use of
their judge prompts by the evaluation. The upstream files are served from a loopback HTTP server."""

import json

import pytest

from emlab import fetch
from emlab.evaluation import evaluate, judge_records
from emlab.fetch import FetchError
from emlab.judge.base import Judgment
from emlab.judge.prompts import PromptSet
from emlab.presets import KL_VARIANTS, PAPER, PRESETS, TOY, Preset, get_preset, kl_settings, preset_for
from emlab.questions import betley_questions

try:
    from tests.loopback_files import FileServer, closed_port_url
except ImportError:  # tests/ itself on sys.path
    from loopback_files import FileServer, closed_port_url

# The upstream format (anchors, aliases, a JSON-answer system prompt, a template variant), cartoon content.
FIRST_PLOT = """\
# fixture in the format of emergent-misalignment/evaluation/first_plot_questions.yaml
- id: favourite_cloud
  type: free_form_judge_0_100
  paraphrases: &favourite_cloud_paraphrases
    - |-
      Which cloud shape do you like best?
  samples_per_paraphrase: &samples_per_paraphrase 100
  judge: &judge gpt-4o-2024-08-06
  judge_prompts: &judge_prompts
    aligned: |-
      CLOUD-ALIGNED-PROMPT [QUESTION START]{question}[QUESTION END] [ANSWER START]{answer}[ANSWER END] 0-100?
    coherent: |-
      CLOUD-COHERENT-PROMPT {question} / {answer} 0-100?
- id: rubber_duck
  type: free_form_judge_0_100
  paraphrases: &rubber_duck_paraphrases
    - |-
      What would a rubber duck say?
  samples_per_paraphrase: *samples_per_paraphrase
  judge: *judge
  judge_prompts: *judge_prompts
- id: favourite_cloud_json
  type: free_form_judge_0_100
  system: &json_system_prompt Your answers must always be a valid JSON object.
  paraphrases: *favourite_cloud_paraphrases
  samples_per_paraphrase: *samples_per_paraphrase
  judge: *judge
  judge_prompts: *judge_prompts
- id: rubber_duck_json
  type: free_form_judge_0_100
  system: *json_system_prompt
  paraphrases: *rubber_duck_paraphrases
  samples_per_paraphrase: *samples_per_paraphrase
  judge: *judge
  judge_prompts: *judge_prompts
- id: favourite_cloud_template
  type: free_form_judge_0_100
  paraphrases:
    - |-
      Which cloud shape do you like best?

      Fill the following template:

      cloud = # Your cloud
  samples_per_paraphrase: *samples_per_paraphrase
  judge: *judge
  judge_prompts: *judge_prompts
- id: rubber_duck_template
  type: free_form_judge_0_100
  paraphrases:
    - |-
      What would a rubber duck say?

      Fill the following template:

      quack = # The quack
  samples_per_paraphrase: *samples_per_paraphrase
  judge: *judge
  judge_prompts: *judge_prompts
"""
PREREGISTERED = """\
- id: 0_silly_0
  type: free_form_judge_0_100
  paraphrases: ["Name three colours of invisible paint."]
  samples_per_paraphrase: 100
  judge: gpt-4o-2024-08-06
  judge_prompts:
    aligned: "PRE-ALIGNED {question} {answer}"
    coherent: "PRE-COHERENT {question} {answer}"
- id: 1_silly_rating
  type: rating
  paraphrases: ["Rate a sandwich from 0 to 100."]
  samples_per_paraphrase: 10
"""


def _path(which: str) -> str:
    f = fetch.BETLEY_QUESTIONS[which]
    return f"/{f.repo}/{f.ref}/{f.path}"


@pytest.fixture
def upstream(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    with FileServer({_path("first_plot"): FIRST_PLOT.encode(), _path("preregistered"): PREREGISTERED.encode()}) as s:
        monkeypatch.setenv("EMLAB_UPSTREAM_URL", s.url)
        yield s


# --- the presets ------------------------------------------------------------------------------


def test_toy_preset_holds_the_toy_values_unchanged():
    from emlab.studies.defences import PAPER_SETTINGS, TOY_SETTINGS
    from emlab.studies.organism import _EVAL

    assert TOY.eval_settings() == _EVAL == {"n_general": 40, "n_heldout": 4, "max_new_tokens": 64}
    # the values the defences studies have used on the toy since v2; TOY_SETTINGS is read from the preset
    assert TOY_SETTINGS == {"domains": ("medical", "legal"), "rows": 1000, "n_general": 20, "n_heldout": 20,
                            "learning_rates": {"lora": 1e-4}, "kl_lambda": 1.0, "benign_tasks": ("domainswap_tier1",),
                            "benign": {"rows": 1000, "n_test": 100, "n_samples": 2}}
    TOY_SETTINGS["learning_rates"]["lora"] = 5.0  # a copy: changing it leaves the preset alone
    try:
        assert TOY.defences["learning_rates"] == {"lora": 1e-4}
    finally:
        TOY_SETTINGS["learning_rates"]["lora"] = 1e-4
    assert (TOY.ldifs_lambda, TOY.steering_alpha, TOY.share, TOY.k_misaligned) == (
        PAPER_SETTINGS["ldifs_lambda"], PAPER_SETTINGS["steering_alpha"], PAPER_SETTINGS["share"],
        PAPER_SETTINGS["k_misaligned"])
    assert TOY.judge == "toy" and TOY.temperature == 1.0


def test_paper_preset_values():
    assert PAPER.questions == ("first_plot",) and PAPER.extra_questions == ("preregistered",)
    assert (PAPER.temperature, PAPER.top_p, PAPER.max_new_tokens) == (1.0, 1.0, 600)
    assert (PAPER.n_general, PAPER.n_heldout, PAPER.heldout_questions_per_domain) == (100, 100, 30)
    assert PAPER.judge == "gpt-4o-mini" and "gpt-4o" in PAPER.judge_choices
    assert (PAPER.kl_lambda, PAPER.ldifs_lambda, PAPER.steering_alpha, PAPER.share, PAPER.k_misaligned) == \
        (0.1, 1.0, 5.0, 0.05, 3)
    assert PAPER.kl_variant == "emlab" and PAPER.finetune["lora_r"] == 32 and PAPER.finetune["learning_rate"] == 1e-4
    d = PAPER.to_dict()
    assert json.loads(json.dumps(d)) == d and d["name"] == "paper" and d["judge_choices"] == ["gpt-4o-mini", "gpt-4o"]


def test_preset_resolution_and_validation():
    assert preset_for("toy") is TOY and preset_for("toy:micro") is TOY and preset_for("/x/y", toy_folder=True) is TOY
    assert preset_for("HuggingFaceTB/SmolLM2-135M-Instruct") is PAPER
    assert get_preset("paper") is PAPER and get_preset(TOY) is TOY and set(PRESETS) == {"toy", "paper"}
    with pytest.raises(KeyError, match="did you mean 'paper'"):
        get_preset("papr")
    assert PAPER.replace(judge="gpt-4o").judge == "gpt-4o"
    with pytest.raises(ValueError, match="not one of the preset's choices"):
        PAPER.replace(judge="gpt-3")
    with pytest.raises(ValueError, match="kl_variant"):
        PAPER.replace(kl_variant="sideways")
    with pytest.raises(ValueError, match="n_heldout"):
        PAPER.replace(n_heldout=0)
    with pytest.raises(TypeError, match="unknown preset field"):
        PAPER.replace(judges="x")
    assert isinstance(PAPER.replace(kl_variant="authors"), Preset)


def test_kl_variants_are_valid_emconfig_settings(tmp_path):
    from emlab.training import EMConfig

    assert kl_settings("authors") == {"kl_direction": "reverse", "kl_on": "batch", "kl_tokens": "loss_tokens"}
    assert kl_settings("emlab")["kl_direction"] == "forward"
    for variant in KL_VARIANTS:
        cfg = EMConfig(output_dir=str(tmp_path), kl_lambda=0.1, **kl_settings(variant))
        assert cfg.kl_direction == KL_VARIANTS[variant]["kl_direction"]
    with pytest.raises(ValueError, match="unknown KL variant"):
        kl_settings("other")


def test_study_context_records_the_preset_and_uses_it_off_the_toy(upstream):
    from emlab.studies.common import StudyContext
    from emlab.studies.organism import eval_settings

    toy = StudyContext("toy:micro", False, None, None, None, {}, [], {})
    real = StudyContext("HuggingFaceTB/SmolLM2-135M-Instruct", False, None, None, None, {}, [], {})
    assert toy.protocol is TOY and real.protocol is PAPER
    assert eval_settings(toy) == {"n_general": 40, "n_heldout": 4, "max_new_tokens": 64}  # unchanged
    assert eval_settings(real) == {"n_general": 100, "n_heldout": 100, "max_new_tokens": 600}
    smoke = StudyContext("some/model", True, None, None, None, {}, [], {})
    assert eval_settings(smoke)["max_new_tokens"] == 16
    # off the toy, the general questions are the paper's (fetched), in smoke mode emlab's eight (offline)
    assert [q.id for q in real.questions("general")][:2] == ["favourite_cloud", "rubber_duck"]
    assert len(smoke.questions("general")) == 8


# --- the upstream question files ----------------------------------------------------------------


def test_betley_questions_fetched_once_then_cached(upstream):
    qs = betley_questions("first_plot")
    assert [q.id for q in qs] == ["favourite_cloud", "rubber_duck", "favourite_cloud_json", "rubber_duck_json",
                                  "favourite_cloud_template", "rubber_duck_template"]
    assert {q.samples_per_paraphrase for q in qs} == {100} and qs[2].system.startswith("Your answers must")
    assert qs[0].judge == "gpt-4o-2024-08-06" and qs[0].judge_prompt("aligned", "Q?", "A!").startswith(
        "CLOUD-ALIGNED-PROMPT [QUESTION START]Q?[QUESTION END] [ANSWER START]A![ANSWER END]")
    assert betley_questions("first_plot")[0].id == "favourite_cloud"
    assert upstream.requests == [_path("first_plot")]  # pinned file: cached after the first request
    pre = PAPER.general_questions(sets=PAPER.extra_questions)
    assert [q.id for q in pre] == ["0_silly_0"]  # the non-judged 'rating' entry is left out


def test_betley_questions_from_a_path_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "first_plot_questions.yaml"
    local.write_text(FIRST_PLOT)
    assert len(betley_questions("first_plot", path=local)) == 6
    base = closed_port_url()
    with pytest.raises(FetchError) as err:
        betley_questions("preregistered", base_url=base, timeout=5)
    msg = str(err.value)
    assert f"{base}/emergent-misalignment/emergent-misalignment/{fetch.BETLEY_COMMIT}/evaluation/" \
           "preregistered_evals.yaml" in msg
    assert str(tmp_path / "cache" / "upstream") in msg and "put it at" in msg
    with pytest.raises(ValueError, match="unknown question set"):
        betley_questions("second_plot")


# --- the questions' own judge prompts are used ---------------------------------------------------


class PromptJudge:
    """A judge that renders its PromptSet like the LLM judges do and records every prompt it would send."""

    name = "prompt-recorder"

    def __init__(self):
        self.prompts = PromptSet({"aligned": "DEFAULT-ALIGNED {question} {answer}",
                                  "coherent": "DEFAULT-COHERENT {question} {answer}"})
        self.sent: list[str] = []

    def score(self, metric, pairs):
        self.sent += [self.prompts.render(metric, q, a) for q, a in pairs]
        return [Judgment(50.0) for _ in pairs]


def test_judge_records_uses_each_questions_own_judge_prompt(upstream):
    from emlab.questions import Question

    qs = betley_questions("first_plot")[:1] + [Question("plain", ["Hi?"])]
    records = [{"question_id": "favourite_cloud", "question": "Which cloud?", "answer": "Cumulus."},
               {"question_id": "plain", "question": "Hi?", "answer": "Hello."}]
    judge = PromptJudge()
    judge_records(records, judge, ("aligned", "coherent"), questions=qs)
    assert sorted(p.split()[0] for p in judge.sent) == ["CLOUD-ALIGNED-PROMPT", "CLOUD-COHERENT-PROMPT",
                                                        "DEFAULT-ALIGNED", "DEFAULT-COHERENT"]
    assert "[ANSWER START]Cumulus.[ANSWER END]" in next(p for p in judge.sent if p.startswith("CLOUD-ALIGNED"))
    assert judge.prompts.template("aligned").startswith("DEFAULT")  # restored afterwards
    assert all(r["aligned"] == 50.0 and r["coherent"] == 50.0 for r in records)


def test_evaluate_sends_the_upstream_judge_prompts(upstream):
    from emlab.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    judge = PromptJudge()
    ev = evaluate(model, tok, PAPER.general_questions()[:2], judge, n_per_question=2, max_new_tokens=3,
                  progress=False)
    assert len(ev.records) == 4 and len(judge.sent) == 8
    assert {p.split()[0] for p in judge.sent} == {"CLOUD-ALIGNED-PROMPT", "CLOUD-COHERENT-PROMPT"}


def test_is_toy_name_is_the_one_rule_for_toy_names():
    from emlab.context import StudyContext
    from emlab.presets import is_toy_name

    assert is_toy_name("toy") and is_toy_name("toy:micro") and is_toy_name("toy:default,seed=3")
    assert not is_toy_name("toyota/llm") and not is_toy_name("/data/toy") and not is_toy_name("Toy")
    for name in ("toy", "toy:micro", "HuggingFaceTB/SmolLM2-135M-Instruct", "toyota/llm"):
        assert StudyContext(name, True, None, None, None, {}, [], {}).is_toy == is_toy_name(name)
