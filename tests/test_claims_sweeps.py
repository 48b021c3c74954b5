"""emlab claims-sweeps: the scorecard's sweeps in one command, on tiny stand-in notebooks."""

from __future__ import annotations

import json

import pytest

from emlab import claims_sweeps as CS
from emlab import scorecard as SC
from emlab import sweeps
from emlab.cli import main
from emlab.toy.world import load_world_config

# A stand-in for notebook 05: writes the keys of the 001/narrow_solution claims and a config.json with the kind.
NB05 = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "id": "params", "metadata": {"tags": ["parameters"]},
         "outputs": [], "source": ["out_dir = None\n", "seed = 0\n", "domain = 'medical'\n", "kind = 'steering_vector'"]},
        {"cell_type": "code", "execution_count": None, "id": "body", "metadata": {}, "outputs": [],
         "source": ["import json\n", "from pathlib import Path\n",
                    "m = {'general_em_general': 30.0 + seed + (10.0 if kind == 'lora' else 0.0), 'general_em_narrow': 20.0}\n",
                    "Path(out_dir, 'metrics.json').write_text(json.dumps(m))\n",
                    "Path(out_dir, 'config.json').write_text(json.dumps({'kind': kind, 'domain': domain}))"]},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                 "language_info": {"name": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_the_plan_covers_every_toy_domain_and_seed_domain_by_domain():
    plan = CS.scorecard_plan()
    assert [s.name for s in plan] == ["01", "05-steering_vector", "02", "05-lora", "03"]
    domains = list(load_world_config()["domains"])
    assert len(domains) == 6
    for s in plan:
        assert len(s.cells) == 30 and [c["seed"] for c in s.cells[:6]] == [0, 1, 2, 3, 4, 0]
        assert [c.get("domain") or c["domains"][0] for c in s.cells[::5]] == domains
        assert "smoke" not in s.cells[0]
    by = {s.name: s for s in plan}
    assert all(c["other_domain"] != c["domain"] for c in by["01"].cells)
    assert {c["kind"] for c in by["05-lora"].cells} == {"lora"}
    assert {c["kind"] for c in by["05-steering_vector"].cells} == {"steering_vector"}
    assert by["02"].cells[0]["methods"][-1] == "ldifs_no_grad" and "sft" in by["02"].cells[0]["methods"]
    small = CS.scorecard_plan(seeds=[3], domains=["legal"], only=["03"], smoke=True)
    assert [(s.name, s.notebook, s.cells) for s in small] == [
        ("03", "03_interleaving.ipynb", [{"domain": "legal", "shares": [0.05, 0.5], "seed": 3, "smoke": True}])]
    with pytest.raises(ValueError, match="unknown scorecard sweep.*'04'"):
        CS.scorecard_plan(only=["04"])
    with pytest.raises(ValueError, match="at least one seed"):
        CS.scorecard_plan(seeds=[])


def test_run_records_the_command_continues_and_scores_per_kind(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    (books / "05_narrow_vs_general.ipynb").write_text(json.dumps(NB05))
    out = tmp_path / "claims"
    plan = CS.scorecard_plan(seeds=[0, 1], domains=["medical"], only=["05-steering_vector"])
    with pytest.raises(FileNotFoundError, match="05_narrow_vs_general.ipynb"):
        CS.run_scorecard_sweeps(out, plan, notebooks=tmp_path / "elsewhere")
    ex = sweeps.LocalExecutor(workers=2, threads=1)
    res = CS.run_scorecard_sweeps(out, plan, notebooks=books, executor=ex, command="emlab claims-sweeps A",
                                  log=None, max_seconds=240)
    assert res["05-steering_vector"].ok
    lora = CS.scorecard_plan(seeds=[0, 1], domains=["medical"], only=["05-lora"])
    CS.run_scorecard_sweeps(out, lora, notebooks=books, executor=ex, command="emlab claims-sweeps B", log=None,
                            max_seconds=240)
    again = CS.run_scorecard_sweeps(out, plan, notebooks=books, executor=ex, command="emlab claims-sweeps A",
                                    log=None, max_seconds=240)
    assert again["05-steering_vector"].counts() == {"ok": 0, "failed": 0, "skipped": 2}
    assert SC.plan_commands(out) == ["emlab claims-sweeps B", "emlab claims-sweeps A"]
    assert SC.plan_sweep_dirs(out) == [out / "05-steering_vector", out / "05-lora"]
    assert SC.expand_sweeps([out, tmp_path / "x"]) == [out / "05-steering_vector", out / "05-lora", tmp_path / "x"]
    assert SC.plan_sweep_dirs(tmp_path) is None and SC.read_plan(tmp_path) is None

    card = SC.scorecard([out], claims=[c for c in CS_claims() if c.notebook == "05_narrow_vs_general"]).set_index("claim")
    assert card.loc["001/narrow_solution", "n"] == 2 and card.loc["001/narrow_solution", "mean"] == pytest.approx(20.5)
    assert card.loc["001/narrow_solution/steering_vector", "mean"] == pytest.approx(10.5)
    assert card.loc["001/efficiency", "verdict"] == "not measured"

    (out / SC.PLAN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="claims_sweeps.json: not valid JSON"):
        SC.plan_sweep_dirs(out)


def CS_claims():
    """The 05 claims of the registry, built without paper data (they have no paper number)."""
    from emlab.claims import study05_claims

    return study05_claims("lora") + study05_claims("steering_vector")


def test_cli_dry_run_and_bad_input(tmp_path, capsys):
    rc = main(["claims-sweeps", "--out-dir", str(tmp_path / "c"), "--dry-run", "--seeds", "0,1", "--domains",
               "sport", "--only", "05-lora,03"])
    text = capsys.readouterr().out
    assert rc == 0 and "05-lora: 2 cells of notebooks/05_narrow_vs_general.ipynb" in text
    assert "{'domain': 'sport', 'shares': [0.05, 0.5], 'seed': 1}" in text and not (tmp_path / "c").exists()
    assert main(["claims-sweeps", "--out-dir", str(tmp_path / "c"), "--only", "nope"]) == 2
    assert "unknown scorecard sweep" in capsys.readouterr().err
    rc = main(["claims-sweeps", "--out-dir", str(tmp_path / "c"), "--only", "03", "--notebooks", str(tmp_path)])
    assert rc == 2 and "03_interleaving.ipynb" in capsys.readouterr().err
