"""emlab sweep (cells, manifest, reuse, local workers) and emlab.aggregate (long table, summaries)."""

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emlab import aggregate as agg
from emlab import sweeps
from emlab.cli import main

NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "params",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "source": [
                "out_dir = None\n",
                "seed = 0\n",
                "domain = 'medical'\n",
                "marker = ''\n",
                "sleep = 0\n",
                "check_torch = False",
            ],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "body",
            "metadata": {},
            "outputs": [],
            "source": [
                "import json, os, time\n",
                "from pathlib import Path\n",
                "if marker and Path(marker).exists():\n",
                "    raise RuntimeError('marker file present: failing on purpose')\n",
                "time.sleep(sleep)\n",
                "m = {'em': {'n': 20, 'rate': 0.1 * seed + (0.05 if domain == 'legal' else 0.0)},\n",
                "     'omp_threads': int(os.environ.get('OMP_NUM_THREADS', '0')),\n",
                "     'emlab_threads': int(os.environ.get('EMLAB_THREADS', '0'))}\n",
                "if check_torch:\n",
                "    import torch\n",
                "    m['torch_threads'] = torch.get_num_threads()\n",
                "(Path(out_dir) / 'metrics.json').write_text(json.dumps(m))",
            ],
        },
    ],
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def write_notebook(path: Path, extra_source: str = "") -> Path:
    nb = json.loads(json.dumps(NOTEBOOK))
    if extra_source:
        nb["cells"][1]["source"].append("\n" + extra_source)
    path.write_text(json.dumps(nb))
    return path


def fake_run(folder: Path, params: dict, metrics: dict | None, status: str = "ok", code: str = "abc") -> Path:
    """A run folder as run_cell leaves it, without running a kernel."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notebook.json").write_text(
        json.dumps({"status": status, "parameters": {**params, "out_dir": str(folder)}})
    )
    (folder / sweeps.CELL_FILE).write_text(json.dumps({"status": status, "parameters": params, "code": code}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


# ---------------------------------------------------------------------------------------------
# Cells


def test_parse_values_splits_top_level_commas_and_parses_each():
    assert sweeps.parse_values("0,1,2") == [0, 1, 2]
    assert sweeps.parse_values("medical, legal") == ["medical", "legal"]
    assert sweeps.parse_values("1e-4,0.5,true") == [1e-4, 0.5, True]
    assert sweeps.parse_values("[1, 2],[3]") == [[1, 2], [3]]
    assert sweeps.parse_values("'a,b',c") == ["a,b", "c"]
    with pytest.raises(ValueError, match="empty value"):
        sweeps.parse_values("0,,1")


def test_grid_is_the_cross_product_last_axis_fastest():
    cells = sweeps.grid({"seed": [0, 1, 2], "domain": ["medical", "legal"]})
    assert len(cells) == 6
    assert cells[:3] == [
        {"seed": 0, "domain": "medical"},
        {"seed": 0, "domain": "legal"},
        {"seed": 1, "domain": "medical"},
    ]
    with pytest.raises(ValueError, match="non-empty list"):
        sweeps.grid({"seed": []})


def test_read_cells_json_jsonl_yaml_and_errors_name_the_line(tmp_path):
    (tmp_path / "c.json").write_text('[{"seed": 0}, {"seed": 1, "domain": "legal"}]')
    assert sweeps.read_cells(tmp_path / "c.json") == [{"seed": 0}, {"seed": 1, "domain": "legal"}]
    (tmp_path / "c.yaml").write_text("- {seed: 3}\n- {seed: 4}\n")
    assert sweeps.read_cells(tmp_path / "c.yaml") == [{"seed": 3}, {"seed": 4}]
    (tmp_path / "c.jsonl").write_text('{"seed": 0}\n\n{"seed": oops}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3"):
        sweeps.read_cells(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"seed": 0}\n[1]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        sweeps.read_cells(tmp_path / "d.jsonl")
    (tmp_path / "e.json").write_text('[{"seed": 0}, {"bad name": 1}]')
    with pytest.raises(ValueError, match=r"cell 2.*identifiers"):
        sweeps.read_cells(tmp_path / "e.json")
    with pytest.raises(FileNotFoundError):
        sweeps.read_cells(tmp_path / "missing.json")


def test_cell_name_is_stable_readable_and_exact():
    a = sweeps.cell_name({"seed": 1, "domain": "medical"})
    assert a == sweeps.cell_name({"seed": 1, "domain": "medical"})
    assert a.startswith("seed=1_domain=medical-")
    assert sweeps.cell_name({"seed": 1}) != sweeps.cell_name({"seed": "1"})  # same text, other value
    assert "/" not in sweeps.cell_name({"model": "Qwen/Qwen2.5-7B", "lr": 1e-4})
    assert sweeps.cell_name({"domains": ["legal", "finance"]}).startswith("domains=legal+finance-")
    assert sweeps.cell_name({"d": ["a b"]}) != sweeps.cell_name({"d": ["a", "b"]})  # the hash tells them apart


def test_code_version_follows_the_notebook_code_not_its_outputs(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb")
    v1 = sweeps.code_version(nb)
    data = json.loads(nb.read_text())
    data["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi"]}]
    data["metadata"]["widgets"] = {"x": 1}
    nb.write_text(json.dumps(data))
    assert sweeps.code_version(nb)["key"] == v1["key"]
    write_notebook(nb, "print('changed')")
    assert sweeps.code_version(nb)["key"] != v1["key"]
    assert {"git_commit", "git_dirty", "emlab_sha256", "notebook_sha256"} <= set(v1)


def test_finished_record_needs_ok_status_same_parameters_and_code(tmp_path):
    run = fake_run(tmp_path / "r", {"seed": 1}, {"x": 1})
    assert sweeps.finished_record(run, {"seed": 1}, "abc") is not None
    assert sweeps.finished_record(run, {"seed": 2}, "abc") is None
    assert sweeps.finished_record(run, {"seed": 1}, "other-code") is None
    failed = fake_run(tmp_path / "f", {"seed": 1}, None, status="failed")
    assert sweeps.finished_record(failed, {"seed": 1}, "abc") is None
    assert sweeps.finished_record(tmp_path / "none", {"seed": 1}, "abc") is None


def test_a_second_sweep_in_the_same_folder_is_refused(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb")
    (tmp_path / "sw").mkdir()
    with sweeps._sweep_lock(tmp_path / "sw"):
        with pytest.raises(sweeps.SweepError, match="another `emlab sweep` is running"):
            sweeps.run_sweep(nb, [{"seed": 0}], sweep_dir=tmp_path / "sw", log=None)


def test_bad_sweeps_are_refused_before_anything_runs(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb")
    with pytest.raises(ValueError, match="declares no parameter 'bogus'"):
        sweeps.run_sweep(nb, [{"bogus": 1}], sweep_dir=tmp_path / "sw", log=None)
    with pytest.raises(ValueError, match="listed twice"):
        sweeps.run_sweep(nb, [{"seed": 1}, {"seed": 1}], sweep_dir=tmp_path / "sw", log=None)
    with pytest.raises(ValueError, match="out_dir is set by the sweep"):
        sweeps.run_sweep(nb, [{"out_dir": "x"}], sweep_dir=tmp_path / "sw", log=None)
    with pytest.raises(FileNotFoundError):
        sweeps.run_sweep(tmp_path / "missing.ipynb", [{"seed": 1}], log=None)
    assert not (tmp_path / "sw" / "cells").exists()


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_dry_run_lists_the_cells_and_bad_input_exits_2(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb")
    cells = tmp_path / "cells.jsonl"
    cells.write_text('{"seed": 5}\n{"seed": 6}\n')
    rc, out, _ = run_cli(
        "sweep", nb, "--cells", cells, "-p", "domain", "medical,legal", "--dry-run", "--out-dir", tmp_path / "sw"
    )
    assert rc == 0
    assert out.splitlines()[0] == f"4 cells of {nb} -> {tmp_path / 'sw'}"
    assert "cells/seed=6_domain=legal-" in out
    assert not (tmp_path / "sw").exists()
    rc, _, err = run_cli("sweep", nb, "-p", "bogus", "1,2", "--out-dir", tmp_path / "sw")
    assert rc == 2 and "declares no parameter 'bogus'" in err
    rc, _, err = run_cli("sweep", nb, "--cells", cells, "-p", "seed", "1")
    assert rc == 2 and "both in --cells" in err
    rc, _, err = run_cli("sweep", nb)
    assert rc == 2 and "-p NAME VALUES" in err


# ---------------------------------------------------------------------------------------------
# Aggregation


def test_metric_rows_flatten_with_the_n_beside_each_value():
    rows = agg.metric_rows(
        {
            "chat_general": {"n": 20, "em": {"percent": 10.0, "n": 18, "ci": [5.0, 20.0]}, "aligned_mean": 80.0},
            "sft/toy/general_em": 0.25,
            "label": "toy",
            "flag": True,
            "log": [{"step": 1}],
        }
    )
    got = {m: (v, n) for m, v, n in rows}
    assert got["chat_general/em/percent"] == (10.0, 18.0)
    assert got["chat_general/em/ci/1"] == (20.0, 18.0)
    assert got["chat_general/aligned_mean"] == (80.0, 20.0)
    assert got["sft/toy/general_em"][0] == 0.25 and math.isnan(got["sft/toy/general_em"][1])
    assert not {"label", "flag", "log"} & set(got)


def test_load_table_from_run_folders_and_from_a_sweep(tmp_path):
    a = fake_run(tmp_path / "a", {"seed": 0, "domain": "medical"}, {"em": {"n": 10, "rate": 0.1}})
    b = fake_run(tmp_path / "b", {"seed": 1, "domain": "medical", "layers": [1, 2]}, {"em": {"n": 10, "rate": 0.3}})
    fake_run(tmp_path / "c", {"seed": 2, "domain": "medical"}, {"em": {"n": 10, "rate": 9.9}}, status="failed")
    table = agg.load_table([a, b, tmp_path / "c"])
    assert table.attrs["parameters"] == ["seed", "domain", "layers"]
    assert list(table.columns) == ["seed", "domain", "layers", "run", "metric", "value", "n"]
    rates = table[table.metric == "em/rate"].sort_values("seed")
    assert rates.value.tolist() == [0.1, 0.3] and rates.n.tolist() == [10.0, 10.0]
    assert rates.layers.tolist()[1] == "[1, 2]"  # list parameters become JSON text (groupable)
    # a sweep folder: only the cells its manifest lists as ok
    sw = tmp_path / "sw"
    fake_run(sw / "cells" / "x", {"seed": 0}, {"v": 1.0})
    fake_run(sw / "cells" / "y", {"seed": 1}, {"v": 3.0})
    (sw / "sweep.json").write_text(
        json.dumps(
            {
                "cells": [
                    {"name": "x", "parameters": {"seed": 0}, "run_dir": "cells/x", "status": "ok"},
                    {"name": "y", "parameters": {"seed": 1}, "run_dir": "cells/y", "status": "failed"},
                ]
            }
        )
    )
    t = agg.load_table(sw)
    assert t.value.tolist() == [1.0] and t.run.tolist() == ["x"]
    with pytest.raises(FileNotFoundError, match="neither a sweep folder"):
        agg.load_table(tmp_path / "nothing-here")


def test_summarize_mean_sd_and_a_reproducible_bootstrap_interval():
    t = pd.DataFrame(
        {
            "seed": [0, 1, 2, 3, 0],
            "domain": ["medical"] * 4 + ["legal"],
            "run": list("abcde"),
            "metric": ["em"] * 5,
            "value": [0.1, 0.2, 0.3, 0.6, 0.5],
            "n": [20] * 5,
        }
    )
    t.attrs["parameters"] = ["seed", "domain"]
    s = agg.summarize(t)  # by default: every parameter but seed
    assert list(s.columns) == ["domain", "metric", "n", "mean", "sd", "ci_low", "ci_high"]
    med = s[s.domain == "medical"].iloc[0]
    assert med.n == 4 and med["mean"] == pytest.approx(0.3)
    assert med.sd == pytest.approx(np.std([0.1, 0.2, 0.3, 0.6], ddof=1))
    assert 0.1 <= med.ci_low < med["mean"] < med.ci_high <= 0.6
    assert agg.summarize(t).equals(s)  # fixed rng: the same interval every time
    # a group's interval depends on its own values only, not on which other groups the table holds
    alone = agg.summarize(t[t.domain == "medical"]).iloc[0]
    assert (alone.ci_low, alone.ci_high) == (med.ci_low, med.ci_high)
    extra = pd.concat([t.assign(metric="aaa"), t])  # another metric's group drawn first
    again = agg.summarize(extra)
    again = again[(again.domain == "medical") & (again.metric == "em")].iloc[0]
    assert (again.ci_low, again.ci_high) == (med.ci_low, med.ci_high)
    leg = s[s.domain == "legal"].iloc[0]
    assert leg.n == 1 and math.isnan(leg.sd) and math.isnan(leg.ci_low)
    overall = agg.summarize(t, by=[])
    assert overall.iloc[0].n == 5
    with pytest.raises(KeyError, match="cannot group by"):
        agg.summarize(t, by=["layer"])


def test_bootstrap_interval_covers_the_mean_of_normal_seeds_at_the_stated_rate():
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(200):
        t = pd.DataFrame({"seed": range(8), "metric": "m", "value": rng.normal(0.0, 1.0, 8), "n": 1})
        row = agg.summarize(t, by=[], n_boot=500, seed=i).iloc[0]
        hits += row.ci_low <= 0.0 <= row.ci_high
    assert 0.80 <= hits / 200 <= 0.99  # percentile bootstrap on 8 seeds undercovers a little


def test_mean_sd_and_the_markdown_summary():
    assert agg.mean_sd(0.2134, 0.0312, 3) == "0.213 ± 0.0312 (3)"
    assert agg.mean_sd(0.2134, float("nan"), 1) == "0.213 (1)"
    assert agg.mean_sd(12.0, 1.5, 5, digits=2) == "12 ± 1.5 (5)"
    s = pd.DataFrame([{"domain": "a|b", "metric": "em", "n": 3, "mean": 0.2, "sd": 0.1, "ci_low": 0.1, "ci_high": 0.3}])
    md = agg.summary_markdown(s)
    assert md.splitlines()[0] == "| domain | metric | mean ± sd (n) | 95% CI |"
    assert md.splitlines()[2] == "| a\\|b | em | 0.2 ± 0.1 (3) | [0.1, 0.3] |"


# ---------------------------------------------------------------------------------------------
# Local executor: real kernels


@pytest.mark.slow
def test_local_sweep_runs_lists_failures_and_continues_on_rerun(tmp_path):
    """Two workers, 4 cells (one fails, one reports torch's threads); a rerun reuses the ok cells and
    reruns the failed one, whose first attempt is kept under superseded/."""
    nb = write_notebook(tmp_path / "tiny.ipynb")
    marker = tmp_path / "fail-now"
    marker.write_text("x")
    cells = [
        {"seed": 0, "domain": "medical", "check_torch": True},
        {"seed": 1, "domain": "medical"},
        {"seed": 0, "domain": "legal"},
        {"seed": 1, "domain": "legal", "marker": str(marker)},
    ]
    lines: list[str] = []
    ex = sweeps.LocalExecutor(workers=2, threads=1)
    res = sweeps.run_sweep(nb, cells, sweep_dir=tmp_path / "sw", executor=ex, log=lines.append, max_seconds=240)
    assert [c.status for c in res.cells] == ["ok", "ok", "ok", "failed"]
    assert "marker file present" in res.failed[0].error and not res.ok
    assert any("done (1 failed), 0 running" in line for line in lines), lines
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert manifest["state"] == "finished" and manifest["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    assert manifest["executor"]["workers"] == 2 and manifest["code"]["key"] == sweeps.code_version(nb)["key"]
    first = res.cells[0].run_dir
    assert first.parent == tmp_path / "sw" / "cells"
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["omp_threads"] == 1 and metrics["torch_threads"] == 1
    assert metrics["emlab_threads"] == 1  # emlab.threads' generate/train thread count follows the sweep
    rec = json.loads((first / sweeps.CELL_FILE).read_text())
    assert rec["status"] == "ok" and rec["notebook_seconds"] <= rec["seconds"]
    table = pd.read_csv(tmp_path / "sw" / "table.csv")
    assert sorted(table[table.metric == "em/rate"].value.round(3)) == [0.0, 0.05, 0.1]
    by_domain = agg.summarize(agg.load_table(tmp_path / "sw"), by=["domain"], metrics=["em/rate"])
    assert agg.summary_markdown(by_domain).splitlines()[2] == "| medical | em/rate | 0.05 ± 0.0707 (2) | [0, 0.1] |"
    summary = (tmp_path / "sw" / "summary.md").read_text()
    assert "grouped by domain, check_torch (" in summary and "## Failed cells" in summary
    assert "| legal |  | em/rate | 0.05 (1) | – |" in summary  # a parameter a cell does not set: blank

    stamps = {c.name: json.loads((c.run_dir / sweeps.CELL_FILE).read_text())["started"] for c in res.cells[:3]}
    marker.unlink()
    res2 = sweeps.run_sweep(nb, cells, sweep_dir=tmp_path / "sw", executor=sweeps.LocalExecutor(workers=2), log=None)
    assert res2.ok and res2.counts() == {"ok": 1, "failed": 0, "skipped": 3}
    for c in res2.cells[:3]:  # reused: not run again
        assert json.loads((c.run_dir / sweeps.CELL_FILE).read_text())["started"] == stamps[c.name]
    old = list((tmp_path / "sw" / "superseded").iterdir())
    assert len(old) == 1 and old[0].name.startswith(res.cells[3].name)
    assert json.loads((old[0] / sweeps.CELL_FILE).read_text())["status"] == "failed"
    assert len(pd.read_csv(tmp_path / "sw" / "table.csv").query("metric == 'em/rate'")) == 4


@pytest.mark.slow
def test_a_cell_over_its_time_limit_is_killed_with_its_kernel(tmp_path):
    import psutil

    nb = write_notebook(tmp_path / "tiny.ipynb")
    ex = sweeps.LocalExecutor(workers=1, threads=1, cell_time_limit=8)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = sweeps.run_sweep(
        nb, [{"sleep": 600}], sweep_dir=tmp_path / "sw", executor=ex, log=None, aggregate=False, max_seconds=120
    )
    assert res.cells[0].status == "failed" and "cell time limit of 8 s" in res.cells[0].error
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_the_sweep_time_limit_stops_unfinished_cells(tmp_path):
    nb = write_notebook(tmp_path / "tiny.ipynb")
    res = sweeps.run_sweep(
        nb, [{"sleep": 600}], sweep_dir=tmp_path / "sw", executor=sweeps.LocalExecutor(1), log=None, max_seconds=3
    )
    assert res.cells[0].status == "failed" and "time limit of 3 s" in res.cells[0].error
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["cells"][0]["status"] == "failed"


def test_local_executor_threads_default_to_cores_over_workers(tmp_path):
    ex = sweeps.LocalExecutor(workers=2)
    ex.start([], tmp_path)
    assert ex.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    with pytest.raises(ValueError):
        sweeps.LocalExecutor(workers=0)


def test_write_sweep_tables_keeps_counts_out_of_the_page_but_in_the_csv(tmp_path):
    sw = tmp_path / "sw"
    cells = []
    for seed, rate in ((0, 10.0), (1, 30.0)):
        fake_run(
            sw / "cells" / f"s{seed}",
            {"seed": seed},
            {"general": {"n": 20, "em": {"percent": rate, "n": 20, "ci": [0, 50]}}},
        )
        cells.append({"name": f"s{seed}", "parameters": {"seed": seed}, "run_dir": f"cells/s{seed}", "status": "ok"})
    cells.append(
        {"name": "s2", "parameters": {"seed": 2}, "run_dir": "cells/s2", "status": "failed", "error": "boom\nmore"}
    )
    (sw / "sweep.json").write_text(json.dumps({"notebook": "/x/nb.ipynb", "cells": cells}))
    written = agg.write_sweep_tables(sw)
    assert [p.name for p in written] == ["table.csv", "summary.csv", "summary.md"]
    page = (sw / "summary.md").read_text()
    assert "2 of 3 cells ok; grouped by nothing" in page
    assert "| general/em/percent | 20 ± 14.1 (2) |" in page
    assert "| general/em/n |" not in page and "| general/em/ci/0 |" not in page and "- s2: boom" in page
    assert set(pd.read_csv(sw / "summary.csv").metric) >= {"general/em/n", "general/em/ci/0", "general/em/percent"}
    assert len(pd.read_csv(sw / "table.csv")) == 2 * 5


@pytest.mark.slow
def test_an_interrupted_sweep_stops_its_workers_and_kernels(tmp_path):
    import psutil

    nb = write_notebook(tmp_path / "tiny.ipynb")
    cells = [{"seed": 0, "sleep": 600}, {"seed": 1}]

    def interrupt_when_running(line: str) -> None:
        if " 1 running" in line or " 2 running" in line:
            raise KeyboardInterrupt

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KeyboardInterrupt):
        sweeps.run_sweep(
            nb,
            cells,
            sweep_dir=tmp_path / "sw",
            executor=sweeps.LocalExecutor(2),
            log=interrupt_when_running,
            progress_every=0.2,
        )
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert manifest["state"] == "interrupted"
    assert "interrupted before it finished" in manifest["cells"][0]["error"]


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_keeps_the_records_drops_the_weights_and_a_resumed_sweep_reuses_it(tmp_path):
    """A sweep packed (one cell failed) is a few small files a cell; `emlab claims`-style reading works on
    the pack, and run_sweep into the pack reuses the finished cell and reruns only the failed one."""
    nb = write_notebook(tmp_path / "tiny.ipynb")
    marker = tmp_path / "fail-now"
    marker.write_text("x")
    cells = [{"seed": 0, "domain": "medical"}, {"seed": 1, "domain": "medical", "marker": str(marker)}]
    res = sweeps.run_sweep(
        nb,
        cells,
        sweep_dir=tmp_path / "scorecard" / "01",
        executor=sweeps.LocalExecutor(1, threads=1),
        log=None,
        max_seconds=240,
    )
    assert [c.status for c in res.cells] == ["ok", "failed"]
    (res.cells[0].run_dir / "adapter.safetensors").write_bytes(b"\0" * 100_000)  # weights: not packed
    (tmp_path / "scorecard" / "claims_sweeps.json").write_text(
        json.dumps({"commands": ["emlab claims-sweeps"], "sweeps": [{"name": "01"}]})
    )
    (tmp_path / "scorecard" / "notes").mkdir()  # a folder that is not a sweep: not packed
    counts = sweeps.pack_sweeps(tmp_path / "scorecard", tmp_path / "packed")
    assert counts == {"01": 2}
    packed = tmp_path / "packed"
    assert json.loads((packed / "claims_sweeps.json").read_text())["commands"] == ["emlab claims-sweeps"]
    assert not (packed / "notes").exists() and not (packed / "01" / "logs").exists()
    ok_cell = packed / "01" / "cells" / res.cells[0].name
    assert sorted(p.name for p in ok_cell.iterdir()) == sorted(
        n for n in sweeps.PACK_CELL_FILES if (res.cells[0].run_dir / n).exists()
    )
    assert "metrics.json" in {p.name for p in ok_cell.iterdir()}
    assert not list(packed.rglob("*.safetensors")) and not list(packed.rglob("*.ipynb"))
    before = agg.load_table(tmp_path / "scorecard" / "01")
    pd.testing.assert_frame_equal(agg.load_table(packed / "01").drop(columns="run"), before.drop(columns="run"))

    marker.unlink()
    res2 = sweeps.run_sweep(nb, cells, sweep_dir=packed / "01", executor=sweeps.LocalExecutor(1, threads=1), log=None)
    assert res2.ok and res2.counts() == {"ok": 1, "failed": 0, "skipped": 1}
    # packing again into the pack updates it: the rerun cell's metrics arrive
    assert sweeps.pack_sweeps(packed / "01", tmp_path / "packed2") == {"": 2}
    assert len(agg.load_table(tmp_path / "packed2").query("metric == 'em/rate'")) == 2


def test_pack_refuses_a_foreign_folder_itself_and_non_sweeps_and_drops_stale_files(tmp_path):
    sw = tmp_path / "sw"
    fake_run(sw / "cells" / "a", {"seed": 0}, {"em": 0.5})
    (sw / "sweep.json").write_text(
        json.dumps({"cells": [{"name": "a", "run_dir": "cells/a", "status": "ok", "parameters": {"seed": 0}}]})
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(sweeps.SweepError, match="not an earlier pack"):
        sweeps.pack_sweeps(sw, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(sweeps.SweepError, match="outside the folder packed"):
        sweeps.pack_sweeps(sw, sw / "copy")
    with pytest.raises(sweeps.SweepError, match="neither a sweep folder"):
        sweeps.pack_sweeps(tmp_path / "other", tmp_path / "x")
    with pytest.raises(sweeps.SweepError, match="no such folder"):
        sweeps.pack_sweeps(tmp_path / "missing", tmp_path / "x")
    (sw / "sweep.json").write_text(json.dumps({"cells": [{"name": "a", "run_dir": "../../etc"}]}))
    with pytest.raises(sweeps.SweepError, match="not a folder inside the sweep"):
        sweeps.pack_sweeps(sw, tmp_path / "y")
    (sw / "sweep.json").write_text(
        json.dumps({"cells": [{"name": "a", "run_dir": "cells/a", "status": "ok", "parameters": {"seed": 0}}]})
    )
    assert sweeps.pack_sweeps(sw, tmp_path / "p") == {"": 1}
    assert (tmp_path / "p" / "cells" / "a" / "metrics.json").exists()
    (sw / "cells" / "a" / "metrics.json").unlink()  # a rerun that has not written its metrics yet
    sweeps.pack_sweeps(sw, tmp_path / "p")
    assert not (tmp_path / "p" / "cells" / "a" / "metrics.json").exists()


def test_cli_sweep_pack(tmp_path):
    sw = tmp_path / "sw"
    fake_run(sw / "cells" / "a", {"seed": 0}, {"em": 0.5})
    (sw / "sweep.json").write_text(json.dumps({"cells": [{"name": "a", "run_dir": "cells/a", "status": "ok"}]}))
    rc, out, err = run_cli("sweep-pack", str(sw), str(tmp_path / "p"))
    assert rc == 0 and "1 cells packed" in out and (tmp_path / "p" / "cells" / "a" / "metrics.json").exists()
    rc, out, err = run_cli("sweep-pack", str(tmp_path / "nothing"), str(tmp_path / "q"))
    assert rc == 2 and "emlab sweep-pack: error:" in err and "no such folder" in err


def test_time_left_counts_running_cells_half_done_and_parallel_workers():
    assert sweeps.time_left(100.0, [], running=2, waiting=10) is None
    # two workers, cells of 200 s: 10 waiting + 2 half-done = 11 cells of work over 2 workers
    assert sweeps.time_left(450.0, [190.0, 210.0], running=2, waiting=10) == pytest.approx(1100.0)
    # one worker: the same work takes twice as long
    assert sweeps.time_left(450.0, [190.0, 210.0], running=1, waiting=10) == pytest.approx(2100.0)
    # nothing running (a queue on a busy cluster): the observed pace per finished cell
    assert sweeps.time_left(600.0, [100.0, 100.0, 100.0], running=0, waiting=6) == pytest.approx(1200.0)
    # the last cell running: half of a mean cell
    assert sweeps.time_left(900.0, [300.0], running=1, waiting=0) == pytest.approx(150.0)
