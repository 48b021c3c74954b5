"""emlab claims: the registry, the verdict rule and the page, on hand-made sweep folders."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest

from emlab import claims as C
from emlab import scorecard as SC
from emlab.cli import main

PAPER_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not (PAPER_DATA / "paper002_em_tables.csv").exists():
    PAPER_DATA = Path("/work/shared/data")
need_paper = pytest.mark.skipif(not (PAPER_DATA / "paper002_em_tables.csv").exists(),
                                reason="paper 002's tables (shared/data) are not on this machine")


def make_sweep(root: Path, stem: str, runs: list[tuple[dict, dict]], failed: int = 0) -> Path:
    """A sweep folder as `emlab sweep` writes it: sweep.json + cells/<name>/metrics.json."""
    cells = []
    for i, (params, metrics) in enumerate(runs):
        name = f"c{i}"
        d = root / "cells" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(metrics))
        cells.append({"name": name, "parameters": params, "run_dir": f"cells/{name}", "status": "ok"})
    for j in range(failed):
        cells.append({"name": f"f{j}", "parameters": {"seed": 99 + j}, "run_dir": f"cells/f{j}", "status": "failed"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"notebook": f"notebooks/{stem}.ipynb", "notebook_stem": stem,
                                                 "parameters": sorted({k for p, _ in runs for k in p}),
                                                 "cells": cells}))
    return root


def defences_runs(seeds=range(5)) -> list[tuple[dict, dict]]:
    """Per seed: KL cuts general EM by ~20 pp (holds), persona raises it by ~10 pp (opposite), inoculation
    moves it by +-8 pp alternately (inconclusive), LDIFS within 1 pp (no effect: holds)."""
    out = []
    for s in seeds:
        m = {}
        for d in ("medical", "legal"):
            base = 30.0 + s
            m[f"sft/{d}/general_em"] = base
            m[f"untrained/{d}/general_em"] = 1.0
            m[f"kl/{d}/general_em"] = base - 20 + 0.5 * s
            m[f"persona_steering/{d}/general_em"] = base + 10 - 0.3 * s
            m[f"inoculation/{d}/general_em"] = base + (8 if s % 2 else -8)
            m[f"ldifs/{d}/general_em"] = base + (0.5 if s % 2 else -0.5)
        out.append(({"seed": s}, m))
    return out


def test_verdict_rule_each_outcome():
    assert C.verdict(-25, -15, -1) == "holds"
    assert C.verdict(5, 12, -1) == "opposite"
    assert C.verdict(-5, 3, -1) == "inconclusive"
    assert C.verdict(-1, 1, 0, margin=5) == "holds"
    assert C.verdict(6, 8, 0, margin=5) == "opposite"
    assert C.verdict(-9, -3, 0, margin=5) == "inconclusive"
    assert C.verdict(math.nan, math.nan, 1) == "inconclusive"


def test_run_effect_matches_domains_and_needs_both_keys():
    c = C.Claim("x", "002", "t", "02_defences", "kl/{domain}/general_em", "sft/{domain}/general_em", -1)
    m = {"kl/medical/general_em": 2.0, "sft/medical/general_em": 10.0, "kl/legal/general_em": 4.0,
         "sft/legal/general_em": 8.0, "kl/code/general_em": 1.0, "kl/medical/share=5%/general_em": 99.0}
    assert c.run_effect(m) == pytest.approx(-6.0)  # (-8 + -4) / 2; code has no sft, the share key is not a domain
    assert c.run_effect({"kl/medical/general_em": 1.0}) is None
    flat = C.Claim("y", "001", "t", "01_directions", "ablate_random_general_em", "ablate_general_em", 1)
    assert flat.run_effect({"ablate_random_general_em": 20.0, "ablate_general_em": 5.0}) == 15.0


def test_scorecard_gives_each_verdict_per_seed(tmp_path):
    sw = make_sweep(tmp_path / "sw", "02_defences", defences_runs(), failed=1)
    mk = lambda cid, meth, d: C.Claim(cid, "002", cid, "02_defences", f"{meth}/{{domain}}/general_em",  # noqa: E731
                                      "sft/{domain}/general_em", d)
    claims = [mk("kl", "kl", -1), mk("persona", "persona_steering", -1), mk("inoc", "inoculation", -1),
              mk("ldifs", "ldifs", 0),
              C.Claim("elsewhere", "001", "t", "05_narrow_vs_general", "loss_narrow", "loss_general", 1)]
    card = SC.scorecard([sw], claims).set_index("claim")
    assert card.loc["kl", "verdict"] == "holds" and card.loc["kl", "n"] == 5
    assert card.loc["kl", "mean"] == pytest.approx(-20 + 0.5 * 2)  # mean over seeds 0..4 of -20 + 0.5 s
    assert card.loc["kl", "ci_low"] <= card.loc["kl", "mean"] <= card.loc["kl", "ci_high"] < 0
    assert card.loc["persona", "verdict"] == "opposite"
    assert card.loc["inoc", "verdict"] == "inconclusive"
    assert card.loc["ldifs", "verdict"] == "holds"
    assert card.loc["elsewhere", "verdict"] == "not measured" and card.loc["elsewhere", "n"] == 0
    assert card.loc["kl", "hypotheses"] == ""  # hypotheses only where the toy disagrees or cannot tell


def test_seeds_are_the_unit_runs_of_one_seed_are_averaged(tmp_path):
    # 03-style sweep: domain is a parameter, so each seed has two runs; n counts seeds, not runs
    runs = [({"seed": s, "domain": d}, {f"interleaving/{d}/share=5%/general_em": 10.0 + s,
                                        f"sft/{d}/general_em": 20.0 + (2 if d == "legal" else 0)})
            for s in range(3) for d in ("medical", "legal")]
    sw = make_sweep(tmp_path / "sw", "03_interleaving", runs)
    claim = C.Claim("i5", "002", "t", "03_interleaving", "interleaving/{domain}/share=5%/general_em",
                    "sft/{domain}/general_em", -1)
    eff = SC.effect_table([sw], [claim])
    assert len(eff) == 3 and set(eff["runs"]) == {2}
    assert eff.set_index("seed").loc["1", "value"] == pytest.approx(-10.0)  # (-9 + -11) / 2
    card = SC.scorecard([sw], [claim])
    assert card.loc[0, "n"] == 3 and card.loc[0, "verdict"] == "holds"


@need_paper
def test_a_number_as_b_is_a_target_and_the_organism_claims_cover_every_toy_domain(tmp_path):
    c = C.Claim("t", "toy", "t", "02_defences", "sft/finance/indomain_em", "60", 1)
    assert c.run_effect({"sft/finance/indomain_em": 32.5}) == pytest.approx(-27.5)
    assert c.run_effect({"sft/medical/indomain_em": 70.0}) is None
    org = [x for x in C.default_claims(PAPER_DATA) if x.source == "toy"]
    from emlab.toy.world import load_world_config

    domains = load_world_config()["domains"]
    assert [x.id for x in org[:6]] == [f"organism/indomain_em/{d}" for d in domains] and len(domains) == 6
    assert [x.id for x in org[7:]] == [f"organism/random_ablation_no_effect/{d}" for d in domains]
    runs = [({"seed": s, "domains": ["finance"]}, {"sft/finance/indomain_em": 30.0 + s}) for s in range(3)]
    card = SC.scorecard([make_sweep(tmp_path / "sw", "02_defences", runs)], org).set_index("claim")
    assert card.loc["organism/indomain_em/finance", "verdict"] == "opposite"  # below the 60% target on every seed
    assert card.loc["organism/indomain_em/finance", "mean"] == pytest.approx(-29.0)
    assert card.loc["organism/indomain_em/medical", "verdict"] == "not measured"
    rnd = org[6]
    assert rnd.id == "organism/random_ablation_no_effect"
    assert rnd.run_effect({"ablate_random_general_em": 22.0, "ft_general_em": 32.5}) == pytest.approx(-10.5)
    # per domain: each run counts for its own domain's claim only (the run's config.json names it)
    runs01 = [({"seed": s, "domain": d}, {"ablate_random_general_em": 30.0 + (s if d == "sport" else 0.0),
                                          "ft_general_em": 30.0}) for s in range(3) for d in ("medical", "sport")]
    sw01 = make_sweep(tmp_path / "sw01", "01_directions", runs01)
    card = SC.scorecard([sw01], org).set_index("claim")
    assert card.loc["organism/random_ablation_no_effect/sport", "mean"] == pytest.approx(1.0)
    assert card.loc["organism/random_ablation_no_effect/medical", "mean"] == pytest.approx(0.0)
    assert card.loc["organism/random_ablation_no_effect", "mean"] == pytest.approx(0.5)
    assert card.loc["organism/random_ablation_no_effect/legal", "verdict"] == "not measured"


def test_a_seed_in_two_sweeps_is_one_unit(tmp_path):
    # the medical domain in one sweep, legal in another (as docs/claims.md's 02 sweeps): seed s averages both
    mk = lambda d: [({"seed": s, "domains": [d]}, {f"kl/{d}/general_em": 10.0 + s + (4 if d == "legal" else 0),  # noqa: E731
                                                  f"sft/{d}/general_em": 30.0}) for s in range(3)]
    a = make_sweep(tmp_path / "a", "02_defences", mk("medical"))
    b = make_sweep(tmp_path / "b", "02_defences", mk("legal"))
    claim = C.Claim("kl", "002", "t", "02_defences", "kl/{domain}/general_em", "sft/{domain}/general_em", -1)
    eff = SC.effect_table([a, b], [claim]).set_index("seed")
    assert len(eff) == 3 and set(eff["runs"]) == {2}
    assert eff.loc["1", "value"] == pytest.approx(((11 - 30) + (15 - 30)) / 2)
    assert eff.loc["0", "sweep"] == f"{a}, {b}"
    assert SC.scorecard([a, b], [claim]).loc[0, "n"] == 3


def test_one_seed_is_inconclusive(tmp_path):
    sw = make_sweep(tmp_path / "sw", "02_defences", defences_runs(seeds=[0]))
    claim = C.Claim("kl", "002", "t", "02_defences", "kl/{domain}/general_em", "sft/{domain}/general_em", -1)
    row = SC.scorecard([sw], [claim]).iloc[0]
    assert row["n"] == 1 and row["verdict"] == "inconclusive" and math.isnan(row["ci_low"])


def test_not_a_sweep_folder_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        SC.effect_table([tmp_path / "x"], [])
    (tmp_path / "x" / "sweep.json").write_text("{oops")
    with pytest.raises(ValueError, match="sweep.json: not valid JSON"):
        SC.effect_table([tmp_path / "x"], [])


@need_paper
def test_registry_numbers_from_the_paper_tables():
    reg = {c.id: c for c in C.default_claims(PAPER_DATA)}
    # Table 2, 7B: KL minus Misaligned general EM over the 4 domains (0.38-4.01, 2.21-25.29, 1.58-19.75, 2.04-26.25)
    assert reg["table2/kl/general_em"].paper == pytest.approx((-3.63 - 23.08 - 18.17 - 24.21) / 4)
    assert reg["table2/kl/general_em"].direction == -1
    assert reg["table2/ldifs/general_em"].direction == 0  # "almost no effect"
    assert reg["table2/interleaving++/indomain_em"].direction == 0  # in-domain kept
    assert reg["kl_benign_far_from_prior"].paper == pytest.approx((0 - 30 + 1 - 34.3 + 0 - 37.68) / 3)
    assert any("no_grad" in h for h in reg["table2/ldifs/general_em"].hypotheses)
    for need in ("001/efficiency", "001/stability", "001/pretraining_kl", "001/narrow_solution",
                 "001/convergent_direction", "interleaving_5pct_general", "interleaving_more_data_general",
                 "figure1a_interleaving_coherence"):
        assert need in reg
    with pytest.raises(FileNotFoundError, match="paper002_em_tables.csv"):
        C.default_claims(Path("/nonexistent"))


@need_paper
def test_cli_writes_page_figure_and_csv_fast(tmp_path, capsys):
    sw = make_sweep(tmp_path / "02", "02_defences", defences_runs(seeds=range(6)))
    runs05 = [({"seed": s, "kind": "lora"}, {"loss_at_matched_norm_narrow": 2.0 + 0.01 * s,
                                             "loss_at_matched_norm_general": 1.5,
                                             "general_em_general": 30.0, "general_em_narrow": 32.0 + s})
              for s in range(5)]
    # steering-vector runs of 05 without a swept kind: their config.json says it; they count only for
    # the claims 001/*/steering_vector
    runs05 += [({"seed": s}, {"general_em_general": 40.0 + s, "general_em_narrow": 10.0}) for s in range(3)]
    sw5 = make_sweep(tmp_path / "05", "05_narrow_vs_general", runs05)
    for i in range(5, 8):
        (sw5 / "cells" / f"c{i}" / "config.json").write_text(json.dumps({"kind": "steering_vector", "seed": i - 5}))
    out = tmp_path / "docs" / "claims.md"
    start = time.perf_counter()
    rc = main(["claims", str(sw), str(sw5), "--out", str(out), "--paper-data", str(PAPER_DATA)])
    took = time.perf_counter() - start
    assert rc == 0 and took < 30
    page = out.read_text()
    assert page.index("emlab sweep notebooks/02_defences.ipynb -p seed 0,1,2,3,4,5") < page.index("| claim |")
    assert f"emlab claims {sw} {sw5} --out {out}" in page
    assert "`table2/kl/general_em`" in page and "| 6 | holds |" in page
    assert "`001/efficiency`" in page and "`001/narrow_solution`" in page
    hyp = page[page.index("## Where the toy disagrees"):]
    assert "`table2/persona_steering/general_em` (opposite)" in hyp and "small transformer" in hyp
    hyp = hyp.split("## Not measured")[0]
    assert "no_grad" not in hyp  # LDIFS's "no effect" holds here, so its hypothesis is not listed
    card = pd.read_csv(out.with_suffix(".csv")).set_index("claim")
    assert card.loc["table2/kl/general_em", "verdict"] == "holds"
    assert card.loc["table2/persona_steering/general_em", "verdict"] == "opposite"
    assert card.loc["table2/inoculation/general_em", "verdict"] == "inconclusive"
    assert card.loc["001/efficiency", "verdict"] == "holds"
    assert card.loc["001/narrow_solution", "verdict"] == "opposite"
    assert card.loc["001/stability", "verdict"] == "not measured"
    assert card.loc["001/narrow_solution", "n"] == 5 and card.loc["001/narrow_solution", "mean"] == pytest.approx(-4.0)
    sv = card.loc["001/narrow_solution/steering_vector"]
    assert sv["n"] == 3 and sv["mean"] == pytest.approx(31.0) and sv["verdict"] == "holds"
    assert card.loc["001/efficiency/steering_vector", "verdict"] == "not measured"
    assert (out.parent / "claims_figure.html").exists()
    assert "![effect and interval per claim]" not in page  # no PNG asked for, none embedded
    assert "claims:" in capsys.readouterr().out
    md = SC.claims_markdown(card.reset_index(), ["emlab claims x"], "f.html", "f.png")
    assert "[f.html](f.html)" in md and "![effect and interval per claim](f.png)" in md
    assert main(["claims", str(tmp_path / "nope"), "--out", str(out), "--paper-data", str(PAPER_DATA)]) == 2
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nno markers\n")
    assert main(["claims", str(sw), "--out", str(out), "--paper-data", str(PAPER_DATA), "--readme", str(readme)]) == 2
    assert "needs exactly one status block" in capsys.readouterr().err
    from emlab.status import BEGIN, END

    readme.write_text(f"# x\n{BEGIN}\nold\n{END}\n")
    assert main(["claims", str(sw), "--out", str(out), "--paper-data", str(PAPER_DATA), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "([docs/claims.md](docs/claims.md)" in text and "`table2/kl/general_em`" in text and "\nold\n" not in text
    assert f"--readme {readme}`" in text


@need_paper
def test_ldifs_disagreement_names_the_no_grad_hypothesis(tmp_path):
    runs = [({"seed": s}, {"sft/medical/general_em": 30.0, "ldifs/medical/general_em": 12.0 + s})
            for s in range(5)]
    sw = make_sweep(tmp_path / "sw", "02_defences", runs)
    card = SC.scorecard([sw], data_dir=PAPER_DATA).set_index("claim")
    row = card.loc["table2/ldifs/general_em"]
    assert row["verdict"] == "opposite" and row["paper"] == pytest.approx((-0.37 + 1.46 + 0.46 - 1.83) / 4)
    assert "no_grad" in row["hypotheses"]


def test_the_page_names_the_sweeps_their_commit_and_code_key(tmp_path):
    sw = make_sweep(tmp_path / "claims" / "02", "02_defences", defences_runs(seeds=range(3)), failed=1)
    info = json.loads((sw / "sweep.json").read_text())
    info["code"] = {"key": "45cffb05185c10fa", "git_commit": "c230ce340b3fcceebe1c8b71ce5c888f35bf14bc",
                    "git_dirty": True}
    (sw / "sweep.json").write_text(json.dumps(info))
    make_sweep(tmp_path / "claims" / "03", "03_interleaving", [({"seed": 0}, {"x": 1.0})])
    (tmp_path / "claims" / "claims_sweeps.json").write_text(
        json.dumps({"commands": ["emlab claims-sweeps --out-dir X"], "sweeps": [{"name": "02"}, {"name": "03"}]}))
    prov = SC.sweep_provenance([tmp_path / "claims"])
    assert prov.to_dict("records") == [
        {"sweep": "02", "notebook": "02_defences", "cells": 4, "ok": 3, "commit": "c230ce340b3f+dirty",
         "code": "45cffb05185c10fa"},
        {"sweep": "03", "notebook": "03_interleaving", "cells": 1, "ok": 1, "commit": "?", "code": "?"},
    ]
    out = tmp_path / "claims.md"
    SC.write_claims([tmp_path / "claims"], out, figure=False, data_dir=PAPER_DATA)
    page = out.read_text()
    assert "| 02 | 02_defences | 3 of 4 | `c230ce340b3f+dirty` | `45cffb05185c10fa` |" in page
    assert page.index("emlab claims-sweeps --out-dir X") < page.index("| sweep | notebook |") < page.index("| claim |")
