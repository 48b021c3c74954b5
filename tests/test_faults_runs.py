"""Fault injection for the notebook runner and the run folders (issue 15, observations 1, 2, 3, 6, 8).

Real processes where the fault needs them: a cell that hangs, a kernel that dies, SIGKILL of a live
`emlab run`, two concurrent runs into one folder, a key passed as a parameter. Every notebook is a
tiny one written by the test; each kernel start costs a few seconds on a loaded machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from emlab import notebook_engine, notebook_results, runs
from emlab import notebooks as nbs
from emlab.cli import main as emlab_main

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-" + "test-FAULTS0123456789abcdefXYZ"  # a fake key, never a real one (split so key scanners skip it)


def write_nb(path: Path, params: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop(runs.OWNER_ENV, None)
    return e


def emlab_cli(*argv: object, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emlab.cli", *map(str, argv)],
        cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_for(cond, what: str, limit: float = 120) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.2)


def kill_pid_file(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Observation 1: hangs, dead kernels, and reproduce running every notebook


@pytest.mark.slow
def test_reproduce_stops_hangs_and_dead_kernels_and_runs_every_notebook(tmp_path):
    nbdir = tmp_path / "nbs"
    write_nb(nbdir / "a_slow.ipynb", "out_dir = None", "import time\ntime.sleep(3)", "time.sleep(3)", "time.sleep(600)")
    write_nb(nbdir / "b_dies.ipynb", "out_dir = None", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    write_nb(nbdir / "c_hangs.ipynb", "out_dir = None", "import threading\nthreading.Event().wait()")
    write_nb(nbdir / "d_ok.ipynb", "out_dir = None", "import json, pathlib\npathlib.Path(out_dir, 'metrics.json').write_text(json.dumps({'x': 1}))")
    t0 = time.monotonic()
    res = emlab_cli("reproduce", "--notebooks-dir", "nbs", "--cell-timeout", 4, "--notebook-timeout", 5, cwd=tmp_path)
    took = time.monotonic() - t0
    log = res.stdout + res.stderr
    assert res.returncode == 1, log
    assert took < 200, took
    # the notebook limit ran out in a_slow's second sleep; c_hangs's cell hit the cell limit
    assert "a_slow.ipynb stopped in cell 3 (`time.sleep(3)`): the notebook time limit (5 s" in log, log
    assert "b_dies.ipynb failed in cell 2 (`import os, signal`): the kernel died" in log, log
    assert "c_hangs.ipynb stopped in cell 2 (`import threading`): the cell ran past its time limit (4 s" in log, log
    assert "1 of 4 notebooks ran" in log and "3 FAILED:" in log
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert "| d_ok | ok |" in summary and "| c_hangs | **failed** (cell 2) |" in summary
    for stem in ("a_slow", "b_dies", "c_hangs"):
        (run,) = (tmp_path / "runs" / stem).iterdir()
        status = runs.run_status(run)
        assert status.status == "failed" and "cell" in status.reason
        nbformat.read(str(run / f"{stem}.ipynb"), as_version=4)  # the executed copy is a whole notebook


def test_headless_output_widget_sends_nothing_to_the_kernel():
    """The mimic nbclient builds for an Output widget: its state echo on the shell socket is the hang's trigger."""
    notebook_engine.register_engine()
    from papermill.engines import papermill_engines

    engine = papermill_engines.get_engine(nbs.ENGINE)
    assert engine.__name__ == "Engine"
    from nbclient.output_widget import OutputWidget

    class Shell:
        def send(self, msg):
            raise AssertionError("a comm_msg was sent on the shell socket")

    class KC:
        shell_channel = Shell()
        session = None

    widget_cls = next(
        c for c in OutputWidget.__subclasses__() if c.__name__ == "HeadlessOutputWidget"
    )
    w = widget_cls("c1", {"outputs": []}, KC(), executor=type("E", (), {"widget_state": {"c1": {}}})())
    w.sync_state()  # would raise if it reached the socket
    msg = {"header": {"msg_type": "display_data"}, "parent_header": {"msg_id": "m"}, "msg_type": "display_data", "content": {"data": {"text/plain": "x"}, "metadata": {}}}
    w.output([], msg, None, 0)
    assert [o["data"] for o in w.outputs] == [{"text/plain": "x"}]


def test_show_sets_the_output_widget_state_without_capture(monkeypatch):
    import IPython
    import ipywidgets
    import plotly.graph_objects as go
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")  # what a kernel gets

    from emlab import widgets

    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # "in a kernel"
    out = ipywidgets.Output()
    entered = []
    monkeypatch.setattr(type(out), "__enter__", lambda self: entered.append(1))
    widgets._show(out, go.Figure([go.Bar(x=[1], y=[2])]))
    assert not entered  # no `with out:` capture: nothing for a headless client to mimic
    (o,) = out.outputs
    assert o["output_type"] == "display_data" and "application/vnd.plotly.v1+json" in o["data"]


@pytest.mark.slow
def test_output_widget_capture_does_not_stall_cells(tmp_path):
    """`with out: display(fig)` in 30 cells: upstream papermill stalled 3 of 30 such cells until the
    time limit (13 of 80 in another measurement; docs/failures.md), and forever without one."""
    body = "o = W.Output()\nwith o:\n    display(fig)\no"
    setup = "import ipywidgets as W\nimport plotly.graph_objects as go\nfrom IPython.display import display\n" \
            "fig = go.Figure([go.Bar(x=['a', 'b'], y=[2, 3])])"  # fmt: skip
    nb = write_nb(tmp_path / "cap.ipynb", "out_dir = None", setup, *[body] * 30)
    result = nbs.run_notebook(nb, out_dir=tmp_path / "run", timeout=20)
    executed = nbformat.read(str(result.output), as_version=4)
    durations = [c.metadata["papermill"]["duration"] for c in executed.cells[3:]]
    assert len(durations) == 30 and max(durations) < 10, durations
    state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    captured = [v["state"]["outputs"] for v in state.values() if v["model_name"] == "OutputModel"]
    assert len(captured) == 30 and all(len(o) == 1 for o in captured)  # the saved widgets keep their output


def test_time_limits_come_from_arguments_then_environment(monkeypatch):
    monkeypatch.delenv(nbs.CELL_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(nbs.NOTEBOOK_TIMEOUT_ENV, raising=False)
    assert nbs.time_limits() == (nbs.DEFAULT_CELL_TIMEOUT, nbs.DEFAULT_NOTEBOOK_TIMEOUT)
    monkeypatch.setenv(nbs.CELL_TIMEOUT_ENV, "30")
    monkeypatch.setenv(nbs.NOTEBOOK_TIMEOUT_ENV, "0")
    assert nbs.time_limits() == (30.0, None)
    assert nbs.time_limits(5, 7) == (5.0, 7.0) and nbs.time_limits(0, None) == (None, None)
    monkeypatch.setenv(nbs.CELL_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="EMLAB_CELL_TIMEOUT='soon'"):
        nbs.time_limits()


def test_kernel_start_timeout_reaches_papermill(tmp_path, monkeypatch):
    # papermill's 60 s kernel start failed a sweep cell on the loaded 2-core machine: emlab waits 300 s
    monkeypatch.delenv(notebook_engine.KERNEL_START_ENV, raising=False)
    assert notebook_engine.kernel_start_timeout() == 300.0
    monkeypatch.setenv(notebook_engine.KERNEL_START_ENV, "0")
    assert notebook_engine.kernel_start_timeout() == 300.0
    monkeypatch.setenv(notebook_engine.KERNEL_START_ENV, "45")
    assert notebook_engine.kernel_start_timeout() == 45.0
    import papermill

    seen = {}

    def fake_execute(*args, **kw):
        seen.update(kw)
        Path(kw["save_to"]).write_text(Path(args[0]).read_text())

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    nb = write_nb(tmp_path / "k.ipynb", "out_dir = None", "x = 1")
    nbs.run_notebook(nb, out_dir=tmp_path / "run", strict=False)
    assert seen["start_timeout"] == 45.0


# ---------------------------------------------------------------------------------------------
# Observations 2 and 6: concurrent runs, SIGKILL, resume, overwrite, relative paths


@pytest.mark.slow
def test_concurrent_runs_kill_resume_and_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the later runs are in-process: only the first needs its own process
    nb = write_nb(
        tmp_path / "nbs" / "slow.ipynb",
        "out_dir = None\nseed = 0\nsleep = 0",
        "import os, pathlib, time\n"
        "pathlib.Path(out_dir, 'kernel.pid').write_text(str(os.getpid()))\n"
        "marker = pathlib.Path(out_dir, 'progress.txt')\n"
        "marker.write_text(marker.read_text() + 'x' if marker.exists() else 'x')\n"
        "time.sleep(sleep)",
        "import json\npathlib.Path(out_dir, 'metrics.json').write_text(json.dumps({'seed': seed, 'runs': len(marker.read_text())}))",
    )
    run = tmp_path / "shared"
    (run).mkdir()
    (run / "notes.md").write_text("my notes")  # the user's file, there before the run
    first = subprocess.Popen(
        [sys.executable, "-m", "emlab.cli", "run", nb, "-p", "out_dir", "shared", "-p", "sleep", "600"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (run / "kernel.pid").exists(), "the first run's kernel")
        assert runs.run_status(run).status == "running"
        assert not (tmp_path / "nbs" / "shared").exists()  # relative to the caller, not the kernel's folder
        t0 = time.monotonic()
        assert emlab_main(["run", str(nb), "-p", "out_dir", "shared", "-p", "seed", "1"]) == 2
        assert "is in use by a live run" in capsys.readouterr().err
        assert time.monotonic() - t0 < 10  # at once
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        kill_pid_file(run / "kernel.pid")
    wait_for(lambda: runs.run_status(run).status == "incomplete", "the killed run to read incomplete", 30)
    nbformat.read(str(run / "slow.ipynb"), as_version=4)  # never a 0-byte or half-written notebook
    assert notebook_results.load_result(run, "slow").status == "incomplete"

    assert emlab_main(["run", str(nb), "-p", "out_dir", "shared", "-p", "seed", "1"]) == 2
    assert "incomplete run (killed?) with another config" in capsys.readouterr().err

    # Resume: the same parameters as the killed run keep its files (progress.txt grows to "xx").
    assert emlab_main(["run", str(nb), "-p", "out_dir", "shared", "-p", "sleep", "600", "--cell-timeout", "3"]) == 1
    assert "cell ran past its time limit" in capsys.readouterr().err
    assert (run / "progress.txt").read_text() == "xx" and (run / "notes.md").read_text() == "my notes"

    assert emlab_main(["run", str(nb), "-p", "out_dir", "shared", "-p", "seed", "1"]) == 2
    assert "already holds a finished run (status failed" in capsys.readouterr().err
    assert emlab_main(["run", str(nb), "-p", "out_dir", "shared", "-p", "seed", "1", "--overwrite"]) == 0
    assert f"-> {run.resolve()}" in capsys.readouterr().out  # the printed location is the real one
    assert json.loads((run / "metrics.json").read_text()) == {"seed": 1, "runs": 1}  # emlab's old files went
    assert (run / "notes.md").read_text() == "my notes"  # the user's file survived
    assert runs.run_status(run).status == "ok"


def test_start_run_lock_resume_and_overwrite_keep_user_files(tmp_path):
    d = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from emlab.runs import start_run\n"
         f"start_run({str(d)!r}, {{'a': 1}}, seed=0).log_metrics({{'m': 1}}); print('ready', flush=True); time.sleep(600)"],
        env=env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        with pytest.raises(runs.RunLockedError, match="in use by a live run"):
            runs.start_run(d, {"a": 1}, seed=0)
        assert time.monotonic() - t0 < 2
        assert runs.run_status(d).status == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert runs.run_status(d).status == "incomplete"
    (d / "mine.txt").write_text("user")  # added after the kill: counts as the killed run's (documented)
    with pytest.raises(runs.RunExistsError, match="another config"):
        runs.start_run(d, {"a": 2}, seed=0)
    run = runs.start_run(d, {"a": 1}, seed=0)  # same config: resumed, files kept
    assert run.metrics == {"m": 1} and (d / "mine.txt").exists()
    assert any("resumed" in n for n in run.env["notes"])
    run.finish()
    assert runs.run_status(d).status == "ok"
    with pytest.raises(runs.RunExistsError, match="finished run"):
        runs.start_run(d, {"a": 1}, seed=0)
    (d / "later.txt").write_text("added after it finished")
    with runs.start_run(d, {"a": 3}, overwrite=True) as run3:
        run3.log_metrics({"n": 3})
    assert (d / "later.txt").exists() and not (d / "mine.txt").exists()
    assert json.loads((d / "metrics.json").read_text()) == {"n": 3} and runs.run_status(d).ok
    with pytest.raises(RuntimeError, match="boom"):
        with runs.start_run(tmp_path / "f", {}):
            raise RuntimeError("boom")
    assert runs.run_status(tmp_path / "f").describe() == "failed: RuntimeError: boom"
    with pytest.raises(runs.RunExistsError, match="status failed"):  # a failed run is finished too
        runs.start_run(tmp_path / "f", {})


def test_overwrite_removes_only_emlab_files_of_a_finished_run(tmp_path):
    d = tmp_path / "r"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.jsonl").write_text("{}\n")
    run = runs.start_run(d, {"a": 1})
    run.write_records("data/samples", [{"q": 1}])
    run.log_metrics({"x": 1})
    run.finish()
    runs.start_run(d, {"a": 2}, overwrite=True).finish()
    assert (d / "data" / "train.jsonl").exists() and not (d / "data" / "samples.jsonl").exists()
    assert not (d / "metrics.json").exists()


def test_run_status_reads_killed_and_legacy_folders(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "status.json").write_text(json.dumps({"status": "running", "started": "2026-01-01T00:00:00+00:00"}))
    (killed / "metrics.json").write_text('{"em": 0.1}')
    st = runs.run_status(killed)
    assert st.status == "incomplete" and "never finished" in st.reason and not st.complete
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "metrics.json").write_text('{"em": 0.2}')
    assert runs.run_status(legacy).status == "incomplete"  # no notebook.json: never "ok"
    (legacy / "notebook.json").write_text(json.dumps({"status": "ok"}))
    assert runs.run_status(legacy).status == "ok"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.json").write_text("{}")
    assert runs.run_status(bare).status == "unknown" and runs.run_status(tmp_path / "none").status == "empty"

    from emlab.widgets import run_comparer

    w = run_comparer([killed, legacy])
    assert sorted(w.runs.options) == ["killed (incomplete)", "legacy"]
    results = [notebook_results.load_result(killed, "killed"), notebook_results.load_result(legacy, "legacy")]
    page = nbs.write_summary(results, tmp_path / "summary.md", figures_dir=tmp_path / "figs").read_text()
    assert "| killed | **incomplete** (killed before it finished) |" in page and "| legacy | ok |" in page


# ---------------------------------------------------------------------------------------------
# Observation 3: secrets


@pytest.mark.slow
def test_a_key_passed_as_a_parameter_is_never_written_or_printed(tmp_path):
    write_nb(
        tmp_path / "nbs" / "judge.ipynb",
        "out_dir = None\nopenai_api_key = None\njudge = None",
        "from emlab.runs import start_run\nrun = start_run(out_dir, {'openai_api_key': openai_api_key, 'judge': judge})\n"
        "print('using', openai_api_key, judge)\nrun.log_metrics({'ok': 1})",
        "raise ValueError(f'bad key {openai_api_key}')",
    )
    res = emlab_cli("reproduce", "--notebooks-dir", "nbs", "-p", "openai_api_key", KEY, "-p", "judge", "sk-" + "J" * 30,
                    cwd=tmp_path)  # fmt: skip
    log = res.stdout + res.stderr
    assert res.returncode == 1, log  # the second cell raises, with the key in its message
    assert KEY not in log and "J" * 30 not in log
    assert "export OPENAI_API_KEY=" in log and "parameter judge holds a credential" in log
    assert "ValueError: bad key <redacted>" in log
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"judge.ipynb", "summary.md", "README.md", "notebook.json", "config.json", "status.json"} <= names
    leaks = [p for p in written if KEY in p.read_text(errors="replace") or "J" * 30 in p.read_text(errors="replace")]
    assert not leaks, leaks
    (run,) = (tmp_path / "runs" / "judge").iterdir()
    executed = nbformat.read(str(run / "judge.ipynb"), as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'openai_api_key = "<redacted>"' in injected.source
    assert "using <redacted> <redacted>" in executed.cells[-2].outputs[0]["text"]


def test_secret_parameter_warnings_and_scrub():
    warnings = runs.secret_parameter_warnings({"openai_api_key": KEY, "hf_token": "hf_" + "a" * 34, "seed": 3})
    assert len(warnings) == 2 and "OPENAI_API_KEY" in warnings[0] and "HF_TOKEN" in warnings[1]
    assert all(KEY not in w for w in warnings)
    assert runs.secret_parameter_warnings({"judge": "gpt-4o", "max_new_tokens": 600}) == []
    assert runs.scrub(json.dumps({"k": KEY + '"'}), [KEY + '"']) == '{"k": "<redacted>"}'


# ---------------------------------------------------------------------------------------------
# Observation 8: parameters and bad out_dir


def test_misspelled_parameters_are_errors_for_run_and_reproduce(capsys):
    assert emlab_main(["reproduce", "--notebooks-dir", str(REPO / "notebooks"), "-p", "smoek", "true"]) == 2
    err = capsys.readouterr().err
    assert "declares a parameter 'smoek' (did you mean 'smoke'" in err and "they declare" in err
    assert emlab_main(["run", str(REPO / "notebooks" / "00_em_organism.ipynb"), "-p", "domian", "legal"]) == 2
    assert "did you mean 'domain'?" in capsys.readouterr().err
    assert emlab_main(["reproduce", "--notebooks-dir", str(REPO / "notebooks"), "-p", "out_dir", "x"]) == 2
    assert "--runs-dir" in capsys.readouterr().err


def test_bad_out_dir_is_a_one_line_error(tmp_path, capsys):
    nb = write_nb(tmp_path / "n.ipynb", "out_dir = None", "pass")
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert emlab_main(["run", str(nb), "--out-dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert emlab_main(["run", str(nb), "--out-dir", str(ro / "x")]) == 2
            assert "cannot be created" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_runs_nested_in_an_emlab_run_folder_are_finalised_with_it(tmp_path, monkeypatch):
    top = tmp_path / "top"
    runs.check_run_dir(top)
    runs.lock_run_dir(top)
    try:
        monkeypatch.setenv(runs.OWNER_ENV, str(top.resolve()))  # what `emlab run` tells its kernel
        owned = runs.start_run(top, {"a": 1})
        nested = runs.start_run(top / "technical", {"b": 2})
        assert not (top / "status.json").exists()  # the runner writes the top folder's status
        assert not (top / "technical" / runs.LOCK_FILE).exists()  # covered by the top folder's lock
        assert owned.config == {"a": 1} and nested.status.status != "ok"
        runs.finish_nested(top, "failed", "cell 3 raised")
        assert runs.run_status(top / "technical").describe() == "failed: cell 3 raised"
    finally:
        runs.unlock_run_dir(top)
