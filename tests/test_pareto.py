"""The Pareto view: front correctness on hand-made points, the 06 / 02 readers, the figure."""

import json

import pytest

from emlab.pareto import beyond_points, defences_points, pareto_figure, pareto_front


def test_front_on_hand_made_points():
    points = {
        "sft": (40.0, 100.0),      # most in-domain kept: on the front
        "kl": (20.0, 70.0),        # on the front
        "weak": (25.0, 60.0),      # dominated by kl (more EM, less kept)
        "ldifs": (20.0, 65.0),     # same EM as kl, less kept: dominated
        "chat": (0.0, 5.0),        # least EM: on the front
        "mid": (10.0, 30.0),       # on the front
        "bad": (45.0, 100.0),      # same kept as sft, more EM: dominated
    }
    assert pareto_front(points) == ["chat", "mid", "kl", "sft"]
    assert pareto_front({"a": (1.0, 1.0)}) == ["a"]
    assert pareto_front({}) == []
    with pytest.raises(ValueError, match="'nan'"):
        pareto_front({"nan": (float("nan"), 1.0)})


def test_beyond_points_read_a_06_metrics_dict():
    m = {"baseline/chat/general_em": 0.0, "baseline/chat/indomain_em": 5.0,
         "baseline/sft/general_em": 30.0, "baseline/sft/indomain_em": 50.0,
         "caft/pca/general_em": 10.0, "caft/pca/indomain_kept": 80.0,
         "conditional/inoculation/none/general_em": 2.0, "conditional/inoculation/indomain_kept": 90.0,
         "conditional/sft/none/general_em": 30.0, "conditional/sft/indomain_kept": 100.0,
         "realign/50/general_em": None, "realign/50/indomain_kept": 10.0}
    assert beyond_points(m) == {"sft": (30.0, 100.0), "chat": (0.0, 10.0), "caft/pca": (10.0, 80.0),
                                "conditional/inoculation": (2.0, 90.0)}


def test_defences_points_from_a_run_folder(tmp_path):
    m = {"sft/medical/general_em": 40.0, "sft/medical/indomain_em": 80.0,
         "kl/medical/general_em": 20.0, "kl/medical/indomain_em": 40.0,
         "kl/legal/general_em": 20.0, "kl/legal/indomain_em": 40.0,  # no SFT on legal: left out
         "scoring/plus_5pct_chosen": 3}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    assert defences_points(tmp_path) == {"02:sft/medical": (40.0, 100.0), "02:kl/medical": (20.0, 50.0)}
    with pytest.raises(FileNotFoundError, match="02"):
        defences_points(tmp_path / "nowhere")


def test_figure_marks_the_front():
    fig = pareto_figure({"sft": (40.0, 100.0), "kl": (20.0, 70.0), "weak": (25.0, 60.0)})
    assert list(fig.data[1].text) == ["kl", "sft"] and list(fig.data[1].x) == [20.0, 40.0]
    assert list(fig.data[0].marker.color) == ["crimson", "crimson", "grey"]
    with pytest.raises(ValueError, match="nothing to draw"):
        pareto_figure({})


def test_run_prefix_and_a_03_run_share_sweep(tmp_path):
    from emlab.pareto import run_prefix

    assert run_prefix(tmp_path) == "02:"  # no notebook.json: a study function's folder
    (tmp_path / "notebook.json").write_text(json.dumps({"notebook": "/x/notebooks/03_interleaving.ipynb"}))
    assert run_prefix(tmp_path) == "03:"
    (tmp_path / "notebook.json").write_text("{oops")
    assert run_prefix(tmp_path) == "02:"
    m = {"sft/medical/general_em": 40.0, "sft/medical/indomain_em": 80.0,
         "interleaving/medical/share=5%/general_em": 30.0, "interleaving/medical/share=5%/indomain_em": 80.0,
         "interleaving/medical/share=50%/general_em": 10.0, "interleaving/medical/share=50%/indomain_em": 60.0}
    pts = defences_points(m, prefix="03:")
    assert pts["03:interleaving/medical/share=5%"] == (30.0, 100.0)
    assert pts["03:interleaving/medical/share=50%"] == (10.0, 75.0)



def test_pareto_seeds_means_sds_and_fronts():
    import math

    from emlab.pareto import pareto_seeds

    per_seed = {"0": {"a": (10.0, 90.0), "b": (20.0, 80.0), "c": (50.0, 100.0)},
                "1": {"a": (12.0, 70.0), "b": (8.0, 85.0), "c": (60.0, 100.0)},
                "2": {"a": (11.0, 80.0)}}
    rows = {r["name"]: r for r in pareto_seeds(per_seed)}
    assert [r["name"] for r in pareto_seeds(per_seed)] == ["a", "b", "c"]
    assert rows["a"]["n"] == 3 and rows["a"]["general_em"] == 11.0 and rows["a"]["kept"] == 80.0
    assert rows["a"]["general_em_sd"] == 1.0 and rows["b"]["n"] == 2 and rows["b"]["kept"] == 82.5
    assert rows["a"]["on_seed_fronts"] == 2 and rows["b"]["on_seed_fronts"] == 1 and rows["c"]["on_seed_fronts"] == 2
    assert rows["a"]["front"] and rows["b"]["front"] and rows["c"]["front"]  # means: a (11, 80), b (14, 82.5), c (55, 100)
    single = pareto_seeds({"0": {"x": (1.0, 2.0)}})
    assert math.isnan(single[0]["general_em_sd"]) and single[0]["front"]
