"""The papermill runner on tiny fixture notebooks (tests/data/notebooks); three kernel starts in all."""

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from emlab import notebooks as nbs
from emlab._cli import notebooks as cli
from emlab.plots import storage

FIXTURES = Path(__file__).parent / "data" / "notebooks"


def emlab(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="emlab")
    cli.register(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(autouse=True)
def no_static_export(monkeypatch):
    monkeypatch.setattr(storage, "_static", lambda fig, fmt: None)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """`emlab reproduce` on the fixtures (quickstart ok, b_fails raises in cell 3, c_after still runs)."""
    root = tmp_path_factory.mktemp("repro")
    shutil.copytree(FIXTURES, root / "notebooks")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = emlab("reproduce", "-p", "n", "3")
    finally:
        os.chdir(cwd)
    return root, rc, out.getvalue() + err.getvalue()


def test_parse_value():
    assert nbs.parse_value("3") == 3 and isinstance(nbs.parse_value("3"), int)
    assert nbs.parse_value("1e-4") == 1e-4 and nbs.parse_value("-.5") == -0.5
    assert nbs.parse_value("false") is False and nbs.parse_value("null") is None
    assert nbs.parse_value("[medical, legal]") == ["medical", "legal"]
    assert nbs.parse_value("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B" and nbs.parse_value("a: [") == "a: ["


def test_find_notebooks_puts_the_quickstart_first(tmp_path):
    for name in ("b.ipynb", "01_quickstart.ipynb", "00_data.ipynb", "_draft.ipynb", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in nbs.find_notebooks(tmp_path)] == ["01_quickstart.ipynb", "00_data.ipynb", "b.ipynb"]
    with pytest.raises(FileNotFoundError):
        nbs.find_notebooks(tmp_path / "missing")


def test_reproduce_reports_the_failing_cell_and_runs_the_rest(reproduced):
    root, rc, log = reproduced
    assert rc == 1
    assert "1 FAILED:" in log
    assert 'b_fails.ipynb failed in cell 3 (`raise ValueError("boom in cell 3")`): ValueError: boom in cell 3' in log

    runs = root / "runs"
    (ok_run,) = (runs / "quickstart").iterdir()
    assert json.loads((ok_run / "metrics.json").read_text()) == {
        "sft": {"toy": {"general_em": 0.30000000000000004}},
        "label": "toy",
    }
    info = json.loads((ok_run / "notebook.json").read_text())
    assert info["status"] == "ok" and info["parameters"] == {"n": 3, "out_dir": str(ok_run.resolve())}
    (bad_run,) = (runs / "b_fails").iterdir()
    assert json.loads((bad_run / "notebook.json").read_text())["cell"] == 3
    assert (bad_run / "b_fails.ipynb").exists()  # the executed copy, with the traceback
    assert json.loads((bad_run / "status.json").read_text())["status"] == "failed"
    (after_run,) = (runs / "c_after").iterdir()  # a failure does not stop the other notebooks
    assert json.loads((after_run / "status.json").read_text())["status"] == "ok"

    assert (root / "figures" / "quickstart" / "em.html").exists()
    summary = (runs / "summary.md").read_text()
    assert "| quickstart | ok | quickstart/" in summary and "| b_fails | **failed** (cell 3) |" in summary
    assert (
        "| c_after | ok |" in summary
        and "| sft/toy/general_em | 0.3 |" in summary
        and "| label | toy |" in summary
    )
    assert "Parameters: `n=3`" in summary
    readme = (root / "figures" / "README.md").read_text()
    assert "[em](quickstart/em.html)" in readme and "../runs/quickstart/" in readme


def test_figures_are_redrawn_from_stored_runs(reproduced, monkeypatch, capsys):
    root, _, _ = reproduced
    shutil.rmtree(root / "figures")
    (ok_run,) = (root / "runs" / "quickstart").iterdir()
    (ok_run / "figures" / "em.html").unlink()
    calls = []
    monkeypatch.setitem(nbs.FIGURE_BUILDERS, "quickstart", lambda run_dir: calls.append(run_dir) or [])
    monkeypatch.chdir(root)
    assert emlab("figures") == 0
    assert [p.resolve() for p in calls] == [ok_run.resolve()]
    assert (ok_run / "figures" / "em.html").exists() and (root / "figures" / "quickstart" / "em.html").exists()
    assert "quickstart: 1 figure(s) redrawn" in capsys.readouterr().out
    assert "| quickstart | ok |" in (root / "figures" / "README.md").read_text()
    assert emlab("figures", "--runs-dir", "nowhere") == 1


def test_run_with_yaml_parameters_and_out_dir(tmp_path, capsys):
    out = tmp_path / "my-run"
    assert (
        emlab(
            "run",
            FIXTURES / "c_after.ipynb",
            "-p",
            "flag",
            "true",
            "-p",
            "items",
            "[a, b]",
            "-p",
            "rate",
            "1e-4",
            "--out-dir",
            out,
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text()) == {"flag": True, "n_items": 2, "rate": 0.0001}
    assert (out / "c_after.ipynb").exists()
    assert f"-> {out}" in capsys.readouterr().out


def test_run_refuses_undeclared_parameters_and_missing_notebooks(tmp_path, capsys):
    assert emlab("run", FIXTURES / "c_after.ipynb", "-p", "flg", "1", "--runs-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert "declares no parameter 'flg' (did you mean 'flag'?)" in err and "out_dir, flag, items, rate" in err
    assert emlab("reproduce", "--notebooks-dir", FIXTURES, "-p", "lable", "x", "--runs-dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert "declares a parameter 'lable' (did you mean 'label'?)" in err
    assert emlab("run", tmp_path / "nope.ipynb") == 2
    assert not any(tmp_path.iterdir())


def test_keep_going_runs_the_rest(tmp_path, monkeypatch):
    def fake_run(nb, params, **kwargs):
        out = Path(kwargs["runs_dir"]) / nb.stem / kwargs["stamp"]
        out.mkdir(parents=True, exist_ok=True)
        result = nbs.NotebookResult(nb, out, "ok", params)
        if nb.stem == "b_fails":
            result.status, result.cell, result.error = "failed", 3, f"{nb} failed in cell 3: ValueError: boom"
            raise nbs.NotebookFailed(result)
        return result

    monkeypatch.setattr(nbs, "run_notebook", fake_run)
    kw = {"runs_dir": tmp_path / "runs", "figures_dir": tmp_path / "figs", "log": None}
    results = nbs.reproduce(FIXTURES, {"n": 5, "flag": True}, keep_going=True, **kw)
    assert [(r.notebook.stem, r.status) for r in results] == [
        ("quickstart", "ok"),
        ("b_fails", "failed"),
        ("c_after", "ok"),
    ]
    assert results[0].parameters == {"n": 5} and results[2].parameters == {"flag": True}
    stopped = nbs.reproduce(FIXTURES, keep_going=False, **kw)
    assert [r.status for r in stopped] == ["ok", "failed", "not run"]


def test_collect_figures_replaces_stale_files(tmp_path):
    run = tmp_path / "run"
    (run / "figures" / "sub").mkdir(parents=True)
    for rel in ("a.png", "figures/b.svg", "figures/sub/c.html", "metrics.json", "x.ipynb"):
        (run / rel).write_text("x")
    dest = tmp_path / "figs"
    dest.mkdir()
    (dest / "old.png").write_text("stale")
    copied = nbs.collect_figures(run, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in copied) == ["a.png", "b.svg", "sub/c.html"]
    assert not (dest / "old.png").exists()


def test_summary_keeps_tables_out_of_cells(tmp_path):
    from emlab.notebooks import NotebookResult, write_summary

    run = tmp_path / "runs" / "a" / "1"
    run.mkdir(parents=True)
    log = [{"loss": 0.5, "step": i} for i in range(40)]
    (run / "metrics.json").write_text(json.dumps({"em": 12.5, "ci": [3, 9], "training": {"general": log}}))
    page = write_summary([NotebookResult(Path("a.ipynb"), run, "ok", {}, None, None, 1.0, None)],
                         tmp_path / "runs" / "summary.md", figures_dir=tmp_path / "figures")
    text = page.read_text()
    assert "| em | 12.5 |" in text and "| ci | [3, 9] |" in text
    assert "| training/general | 40 rows (in the run's metrics.json) |" in text and "'loss'" not in text
