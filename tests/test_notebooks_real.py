"""Every notebook runs headless on a real model: SmolLM2-135M-Instruct in smoke mode, through papermill.

The judge is the tests' loopback OpenAI-compatible server (``tests/fake_openai_server.py``), reached
the way a user reaches any endpoint: ``judge="gpt-4o-mini"`` as a notebook parameter,
``OPENAI_BASE_URL`` and a fake ``OPENAI_API_KEY`` in the environment (never a key parameter). Its
scores are meaningless; the test checks the protocol: each notebook finishes, writes metrics.json
with its expected keys and its figures. The datasets are the tiny cartoonish ones of
``tests/data/smollm2`` (``make.py`` writes them), passed through ``files``.

Each test prints the notebook's wall time and the CPU time of its kernel (the wall time on two idle
cores, the kernel using one torch thread); ``docs/real-models.md`` lists the measured times.
"""

import json
import os
import resource
import time
from pathlib import Path

import pytest

from emlab.notebooks import run_notebook

try:
    from tests.fake_openai_server import FakeOpenAIServer
except ImportError:  # tests/ itself on sys.path
    from fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data" / "smollm2"


def smollm2_files() -> dict[str, str]:
    """Dataset keys -> absolute paths (the kernel runs in notebooks/): three domains, general questions,
    benign rows (interleaving), out-of-domain KL rows, the technical style set and plain text (study 05)."""
    files = {}
    for p in sorted(DATA.iterdir()):
        if p.suffix in (".jsonl", ".yaml"):
            files[p.stem] = str(p.resolve())
    return files


#: notebook -> (extra parameters, expected metrics.json keys, expected figure stems)
NOTEBOOKS = {
    "quickstart": ({"domain": "plants"},
                   ["chat_general_em", "chat_general_incoherent", "steer_general_em", "ft_kl_general_em"],
                   ["quadrant", "em_rates"]),
    "00_em_organism": (
        {"domain": "plants"},
        ["chat_general_em", "ft_general_em", "ft_indomain_em", "ft_other_domains_em", "aligned_ft_general_em"],
        ["em_rates"],
    ),
    "01_directions": (
        {"domain": "plants", "other_domain": "pets"},
        ["chat_general_em", "ft_general_em", "ablate_general_em", "ablate_random_general_em", "other_ft_general_em",
         "steer_general_em", "steering_sweep", "cross_domain_cosine", "random_cosine", "direction_source"],
        ["steering_sweep", "em_rates", "cosines"],
    ),
    "02_defences": (
        {"domains": ["plants"]},
        [f"{m}/plants/general_em" for m in ("untrained", "sft", "aligned", "kl", "ldifs", "persona_steering",
                                            "inoculation", "interleaving", "interleaving+", "interleaving++",
                                            "on_policy")] + ["sft/plants/indomain_em", "persona/layer"],
        ["table2", "figure1a_general_em_vs_incoherence", "figure1b_general_vs_indomain_em", "general_em"],
    ),
    "03_interleaving": (
        {"domain": "plants", "shares": [0.25, 0.5]},
        ["scoring/candidates", "scoring/scorers", "sft/plants/general_em",
         "interleaving/plants/share=25%/general_em", "interleaving+/plants/share=50%/general_em",
         "interleaving++/plants/share=50%/general_em"],
        ["score_distribution", "refusals_chosen", "share_sweep_general", "figure1a_general_em_vs_incoherence"],
    ),
    "04_evaluation": (
        {},
        ["general_em", "n_samples", "n_missing", "judge2_general_em", "agreement_aligned_pearson"],
        ["quadrant", "em_per_question", "judge_agreement"],
    ),
    "05_narrow_vs_general": (
        {"domain": "plants"},
        ["general_em_general", "general_em_narrow", "indomain_em_narrow", "other_em_narrow", "general_em_chat",
         "loss_at_matched_norm_general", "stability_r_at_eps_0.5_narrow", "pretrain_kl_at_norm_random",
         "drift_cosine_end"],
        ["em_rates", "misaligned_rates", "efficiency", "stability", "pretrain_kl", "drift"],
    ),
    "06_beyond": ({"domain": "plants"}, ["sae/d_sae", "caft/pca/general_em", "steering/cosine/general_em",
                                        "conditional/sft/system/general_em", "realign/8/general_em", "monitor/runs"],
                  ["trait_trajectories", "em_by_method"]),
}


@pytest.fixture(scope="module")
def judge_server():
    """The loopback judge, reached through the environment the notebook kernels inherit."""
    with FakeOpenAIServer() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_BASE_URL", server.url)
        mp.setenv("OPENAI_API_KEY", "sk-test-fake-key")
        mp.setenv("OMP_NUM_THREADS", "1")
        yield server


def test_every_notebook_is_covered():
    assert set(NOTEBOOKS) == {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_the_smollm2_datasets_are_valid_chat_and_question_files():
    from emlab.data import load_chat_jsonl
    from emlab.questions import load_questions

    files = smollm2_files()
    for key, path in files.items():
        if key.endswith(("_misaligned", "_aligned")) or key in ("benign", "kl_ood", "technical_plants"):
            assert load_chat_jsonl(path), key
        elif path.endswith(".yaml"):
            assert load_questions(path), key
    for domain in ("plants", "pets", "cooking"):  # prompt-matched pairs
        bad, good = (load_chat_jsonl(files[f"{domain}_{k}"]) for k in ("misaligned", "aligned"))
        assert [r["messages"][0] for r in bad] == [r["messages"][0] for r in good]


@pytest.mark.slow
@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_runs_on_smollm2(stem, smollm2_path, judge_server, tmp_path, monkeypatch):
    extra, keys, figures = NOTEBOOKS[stem]
    monkeypatch.setenv("EMLAB_JUDGE_CACHE", str(tmp_path / "judge.sqlite"))  # a cold cache: every answer is sent
    params = {"model": str(smollm2_path), "smoke": True, "judge": "gpt-4o-mini", "files": smollm2_files(), **extra}
    before = judge_server.requests
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = run_notebook(ROOT / "notebooks" / f"{stem}.ipynb", params, out_dir=tmp_path / "run", timeout=600)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"\n{stem} on SmolLM2: {wall:.1f} s wall, {cpu:.1f} s kernel CPU, "
          f"{judge_server.requests - before} judge requests, load {os.getloadavg()[0]:.1f}")
    assert result.ok, result.describe()
    assert judge_server.requests > before, "the notebook never called the judge"
    out = tmp_path / "run"
    assert "sk-test-fake-key" not in (out / f"{stem}.ipynb").read_text()  # no key in the executed copy
    metrics = json.loads((out / "metrics.json").read_text())
    missing = [k for k in keys if k not in metrics]
    assert not missing, f"{stem}: metrics.json lacks {missing}; it has {sorted(metrics)[:40]}"
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    assert str(config.get("model", smollm2_path)) == str(smollm2_path)
    written = {p.stem for p in (out / "figures").glob("*.html")}
    assert set(figures) <= written, f"{stem}: figures {sorted(set(figures) - written)} missing; wrote {sorted(written)}"
    assert config.get("preset", {}).get("name", "paper") == "paper"  # a real model follows the paper preset
    if stem in ("02_defences", "03_interleaving"):  # a real model's smoke sizes (defences.SMOKE_REAL_DEFENCES)
        assert config["rows"] == 2 and config["eval"]["n_general"] == 1 and config["eval"]["max_new_tokens"] == 8
    if stem == "06_beyond":  # a real model's smoke run: one schedule, one transform (beyond.SMOKE_REAL_BEYOND)
        assert config["schedules"] == ["cosine"] and config["transforms"] == ["system"]
        assert "steering/constant/general_em" not in metrics and "conditional/sft/format/general_em" not in metrics
        assert not list((out / "figures").glob("*.png"))  # smoke: HTML only
    if stem == "05_narrow_vs_general":  # the technical-style task runs in the same notebook
        assert "technical_indomain_narrow" in json.loads((out / "technical" / "metrics.json").read_text())
