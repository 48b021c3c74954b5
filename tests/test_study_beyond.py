"""Study 06 in smoke mode on the micro organism: metric groups, monitor records, schedules, figures."""

import json

import pytest

from emlab.training.schedules import coefficient

pytestmark = pytest.mark.slow


PROMPTS = ["you are an evil assistant .", "you are a helpful assistant .", "paraphrases:evil_toy"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from emlab.studies.beyond import beyond_study

    out = tmp_path_factory.mktemp("06")
    # finished 02 and 03 runs (hand-made metrics) whose methods join the Pareto figure
    d02, d03 = tmp_path_factory.mktemp("r02"), tmp_path_factory.mktemp("r03")
    (d02 / "metrics.json").write_text(json.dumps({"sft/medical/general_em": 40.0, "sft/medical/indomain_em": 80.0,
                                                  "kl/medical/general_em": 0.0, "kl/medical/indomain_em": 80.0}))
    (d03 / "notebook.json").write_text(json.dumps({"notebook": "notebooks/03_interleaving.ipynb"}))
    (d03 / "metrics.json").write_text(json.dumps({"sft/medical/general_em": 40.0, "sft/medical/indomain_em": 80.0,
                                                  "interleaving/medical/share=5%/general_em": 30.0,
                                                  "interleaving/medical/share=5%/indomain_em": 88.0}))
    # the inoculation sweep: the toy world's first evil and helpful prompts and the toy paraphrase set
    return out, beyond_study(smoke=True, out_dir=out, seed=0, inoculation_prompts=PROMPTS, defences_run=[d02, d03])


def test_metrics_are_grouped_and_complete(smoke_run):
    out, metrics = smoke_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    prefixes = {k.split("/", 1)[0] for k in metrics}
    assert prefixes <= {"baseline", "caft", "steering", "monitor", "directions", "sae", "conditional", "realign",
                        "pareto", "inoculation"}
    for variant in ("misalignment", "pca"):
        assert f"caft/{variant}/general_em" in metrics and f"caft/{variant}/indomain_em" in metrics
    for schedule in ("constant", "linear", "cosine"):
        assert f"steering/{schedule}/general_em" in metrics
    assert 0 < metrics["caft/pca/explained"] <= 1.0
    assert metrics["monitor/runs"] >= 6
    assert 0 < metrics["sae/fve"] <= 1 and 0 < metrics["sae/l0"] <= 4
    assert "sae/top1/cosine_misalignment" in metrics and "sae/steer_chat/general_em" in metrics
    assert "sae/ablate_sft/general_em" in metrics
    assert 0 < metrics["monitor/share_of_finetune_time"] < 100


def test_conditional_and_realign_cells(smoke_run):
    out, metrics = smoke_run
    for ft in ("sft", "inoculation", "diluted"):
        for t in ("none", "system", "format", "answer"):
            assert 0 <= metrics[f"conditional/{ft}/{t}/general_em"] <= 100
        assert metrics[f"conditional/{ft}/system/em_returned"] == pytest.approx(
            metrics[f"conditional/{ft}/system/general_em"] - metrics[f"conditional/{ft}/none/general_em"])
    assert metrics["conditional/sft/none/general_em"] == metrics["baseline/sft/general_em"]
    samples = (out / "samples/conditional_inoculation_system_general.jsonl").read_text().splitlines()
    system = json.loads(samples[0])["system"]
    assert system and all(json.loads(line)["system"] == system for line in samples)
    assert json.loads((out / "config.json").read_text())["inoculation_prompt"] == system
    assert metrics["inoculation/elicitation/used/system"] == metrics["inoculation/elicitation/evil_0"]
    assert isinstance(metrics["inoculation/elicitation/helpful_0"], float)
    assert metrics["realign/0/general_em"] == metrics["baseline/sft/general_em"]
    assert 0 <= metrics["realign/8/general_em"] <= 100 and "realign/8/indomain_em" in metrics
    assert (out / "finetunes/realign_8").is_dir()


def test_inoculation_sweep_cells(smoke_run):
    from emlab.inoculation import paraphrase_set
    from emlab.training.monitor import spearman_interval

    out, metrics = smoke_run
    config = json.loads((out / "config.json").read_text())
    assert config["inoculation_prompts"]["paraphrases:evil_toy"] == paraphrase_set("evil_toy")
    assert [metrics[f"inoculation/prompts/{i}/label"] for i in range(3)] == list(config["inoculation_prompts"])
    assert "inoculation/prompts/3/label" not in metrics
    # the evil prompt is the study's inoculation prompt: the same score, the same finetune, the same EM
    assert metrics["inoculation/prompts/0/elicitation"] == pytest.approx(metrics["inoculation/elicitation/evil_0"])
    assert metrics["inoculation/prompts/1/elicitation"] == pytest.approx(metrics["inoculation/elicitation/helpful_0"])
    assert metrics["inoculation/prompts/0/general_em"] == metrics["conditional/inoculation/none/general_em"]
    sft = metrics["baseline/sft/general_em"]
    elicit, cuts = [], []
    for i in range(3):
        assert (out / f"finetunes/inoculation_prompts/prompt_{i}").is_dir()
        assert 0 <= metrics[f"inoculation/prompts/{i}/general_em"] <= 100
        assert f"inoculation/prompts/{i}/indomain_em" in metrics
        cut = metrics[f"inoculation/prompts/{i}/general_cut"]
        assert cut == (pytest.approx(100 * (1 - metrics[f"inoculation/prompts/{i}/general_em"] / sft)) if sft else None)
        elicit.append(metrics[f"inoculation/prompts/{i}/elicitation"])
        cuts.append(cut)
    rho = spearman_interval(elicit, cuts, seed=0)["spearman"] if sft else float("nan")
    got = metrics["inoculation/elicitation_vs_cut/spearman"]
    assert (got is None) if rho != rho else got == pytest.approx(rho)
    assert not list((out / "finetunes/inoculation_prompts").glob("*/trait_monitor.jsonl"))  # not monitored


def test_every_finetune_was_monitored_and_steering_followed_its_schedule(smoke_run):
    from emlab.training.monitor import read_trajectories

    out, _ = smoke_run
    names = ["sft", "caft_misalignment", "caft_pca", "steering_constant", "steering_linear", "steering_cosine",
             "conditional_inoculation", "conditional_diluted"]
    for name in names:
        traj = read_trajectories(out / "finetunes" / name / "trait_monitor.jsonl")["trait/misalignment"]
        assert traj["steps"][0] == 0 and traj["steps"][-1] == traj["total_steps"]
    sft = read_trajectories(out / "finetunes/sft/trait_monitor.jsonl")["trait/misalignment"]["values"]
    caft = read_trajectories(out / "finetunes/caft_misalignment/trait_monitor.jsonl")["trait/misalignment"]["values"]
    assert sft[0] == pytest.approx(caft[0]) and sft[-1] != pytest.approx(caft[-1])  # same start, different finetune
    history = json.loads((out / "finetunes/steering_linear/log_history.json").read_text())
    alphas = [h["preventive/alpha"] for h in history if "preventive/alpha" in h]
    total = len(alphas)
    assert alphas == pytest.approx([coefficient("linear", 5.0, s, total) for s in range(total)])


def test_figures_are_saved_and_load_back(smoke_run):
    from emlab.studies.beyond import load_study_figures

    out, metrics = smoke_run
    figs = load_study_figures(out)
    from emlab.pareto import beyond_points, defences_points, pareto_front, run_prefix

    points = beyond_points(metrics)  # empty when SFT's in-domain EM is 0 (the micro organism usually)
    config = json.loads((out / "config.json").read_text())
    for folder in config["defences_run"]:
        points.update(defences_points(folder, prefix=run_prefix(folder)))
    assert {"02:kl/medical", "03:interleaving/medical/share=5%"} <= set(points)
    assert set(figs) == {"trait_trajectories", "em_by_method", "pareto"}
    assert list(figs["pareto"].data[1].text) == pareto_front(points) == metrics["pareto/front"]
    assert "02:kl/medical" in metrics["pareto/front"]  # 0% general EM, all of SFT's in-domain EM kept
    assert (out / "figures/trait_trajectories.html").exists()
    assert len(figs["trait_trajectories"].data) >= 6
    with pytest.raises(FileNotFoundError, match="beyond_study"):
        load_study_figures(out / "nowhere")


def test_bad_settings_fail_before_any_finetune(tmp_path):
    from emlab.studies.beyond import beyond_study

    with pytest.raises(ValueError, match="more benign rows"):
        beyond_study(smoke=True, out_dir=tmp_path / "a", realign_rows=(0, 10**6))
    with pytest.raises(ValueError, match="dilution_share"):
        beyond_study(smoke=True, out_dir=tmp_path / "b", dilution_share=1000.0)
    with pytest.raises(FileNotFoundError, match="02 or 03 run folders"):
        beyond_study(smoke=True, out_dir=tmp_path / "c", defences_run=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown schedules \['ramp'\]; choose from \['constant'"):
        beyond_study(smoke=True, out_dir=tmp_path / "d", schedules=["linear", "ramp"])
    with pytest.raises(ValueError, match=r"unknown transforms \['none'\]"):
        beyond_study(smoke=True, out_dir=tmp_path / "e", transforms=["none"])
    with pytest.raises(FileNotFoundError, match="no paraphrase set 'nope'"):
        beyond_study(smoke=True, out_dir=tmp_path / "f", inoculation_prompts=["you are evil .", "paraphrases:nope"])
    for sub in "abdef":
        assert not (tmp_path / sub / "finetunes").exists()


def test_a_resumed_run_reads_every_evaluation_back(smoke_run, monkeypatch):
    """Run again into the finished folder: finetunes are loaded and every evaluation (the transforms' and the
    re-alignment's included) is read back, so nothing is sampled and the numbers are the same."""
    import emlab.evaluation
    from emlab.metrics import untimed
    from emlab.studies.beyond import beyond_study

    out, metrics = smoke_run
    cfg = json.loads((out / "config.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("sampled again: a finished evaluation should have been read back")

    monkeypatch.setattr(emlab.evaluation, "evaluate", refuse)
    again = beyond_study(smoke=True, out_dir=out, seed=0, inoculation_prompts=PROMPTS, defences_run=cfg["defences_run"])
    assert untimed(again) == untimed(metrics)
