"""emlab sweep on a real single-node Slurm (started by .ci/start_slurm.sh; skipped where it cannot run)."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from emlab import sweep_executors, sweeps
from emlab.cli import main

REPO = Path(__file__).resolve().parents[1]
START = REPO / ".ci" / "start_slurm.sh"
NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "params",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "source": ["out_dir = None\n", "seed = 0\n", "marker = ''"],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "body",
            "metadata": {},
            "outputs": [],
            "source": [
                "import json, os\n",
                "from pathlib import Path\n",
                "if marker and Path(marker).exists():\n",
                "    raise RuntimeError('marker file present: failing on purpose')\n",
                "m = {'em': {'n': 10, 'rate': 0.1 * seed}, 'omp_threads': int(os.environ.get('OMP_NUM_THREADS', '0')),\n",
                "     'in_slurm_job': 'SLURM_JOB_ID' in os.environ}\n",
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


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _local_slurm_state() -> str | None:
    """The state of node localhost of emlab's test cluster, or None when it does not answer."""
    if shutil.which("sinfo") is None:
        return None
    try:
        res = _run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], timeout=15)
        conf = _run(["scontrol", "show", "config"], timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0 or "ClusterName             = emlab" not in conf.stdout:
        return None
    return (res.stdout.strip().splitlines() or [None])[0]


@pytest.fixture(scope="module")
def slurm():
    """emlab's single-node test Slurm: used when up, else started with .ci/start_slurm.sh --no-install."""
    if os.environ.get("EMLAB_SLURM_TESTS") == "0":
        pytest.skip("Slurm tests turned off (EMLAB_SLURM_TESTS=0)")
    if _local_slurm_state() not in ("idle", "mixed", "allocated", "completing"):
        if shutil.which("slurmctld") is None:
            pytest.skip("Slurm is not installed here: run .ci/start_slurm.sh as root once (installs Debian's packages)")
        try:
            res = _run(["bash", str(START), "--no-install"], timeout=150)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{START} --no-install did not finish within 150 s")
        if res.returncode != 0:
            why = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
            pytest.skip(f"Slurm cannot be started here: {why[0]}")
    state = _local_slurm_state()
    if state not in ("idle", "mixed", "allocated", "completing"):
        pytest.skip(f"the test Slurm's node localhost is not usable (state {state!r})")
    return state


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _cancel_jobs(sweep_dir: Path) -> None:
    try:
        ids = json.loads((sweep_dir / "sweep.json").read_text())["executor"]["job_ids"]
    except (OSError, ValueError, KeyError):
        ids = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _run(["scancel", "-n", f"emlab-sweep-{sweep_dir.name}", *ids])


@pytest.mark.slow
def test_a_sweep_runs_as_a_slurm_array_job_and_lists_its_failure(slurm, tmp_path):
    nb = tmp_path / "tiny.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    marker = tmp_path / "fail-now"
    marker.write_text("x")
    cells = tmp_path / "cells.jsonl"
    cells.write_text(f'{{"seed": 0}}\n{{"seed": 1}}\n{{"seed": 2, "marker": "{marker}"}}\n')
    sw = tmp_path / f"slurm-sweep-{os.getpid()}"
    opts = ["--executor", "slurm", "--time", "5", "--mem-gb", "0.5", "--queue-timeout", "180", "--max-time", "300"]
    try:
        rc, out, err = run_cli("sweep", nb, "--cells", cells, "--out-dir", sw, *opts)
        assert rc == 1, err  # one cell fails on purpose
        assert out.strip() == str(sw.resolve())
        manifest = json.loads((sw / "sweep.json").read_text())
        assert manifest["executor"]["kind"] == "slurm" and manifest["executor"]["job_ids"], manifest["executor"]
        assert [c["status"] for c in manifest["cells"]] == ["ok", "ok", "failed"]
        assert "marker file present" in manifest["cells"][2]["error"]
        for cell in manifest["cells"][:2]:
            run = sw / cell["run_dir"]
            record = json.loads((run / sweeps.CELL_FILE).read_text())
            assert record["slurm_job_id"] and record["threads"] == 1
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["in_slurm_job"] is True and metrics["omp_threads"] == 1
        assert "| em/rate | 0.05 ± 0.0707 (2) |" in (sw / "summary.md").read_text()  # the two ok seeds
        assert "FAILED seed=2_marker=" in err

    finally:
        _cancel_jobs(sw)


def test_slurm_options_become_sbatch_lines(tmp_path):
    """Partition, time, memory, GPUs and CPUs per cell reach the sbatch script submitit writes."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = sweeps.SlurmExecutor(
        partition="gpu", time_min=30, mem_gb=1.5, gpus_per_cell=2, cpus_per_cell=4, array_parallelism=8
    )
    script = _make_sbatch_string(command="true", folder=tmp_path, map_count=10, **ex.sbatch_parameters("emlab-sweep-x"))
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=30",
        "#SBATCH --mem=1536M",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --array=0-9%8",
        "#SBATCH --job-name=emlab-sweep-x",
    ):
        assert line in script, script
    assert "--gpus" not in _make_sbatch_string(
        command="true", folder=tmp_path, **sweeps.SlurmExecutor().sbatch_parameters("j")
    )


@pytest.mark.slow
def test_the_sweep_time_limit_cancels_its_slurm_jobs(slurm, tmp_path):
    nb = tmp_path / "tiny.ipynb"
    data = json.loads(json.dumps(NOTEBOOK))
    data["cells"][1]["source"].insert(0, "import time; time.sleep(600)\n")
    nb.write_text(json.dumps(data))
    sw = tmp_path / f"slurm-cancel-{os.getpid()}"
    try:
        ex = sweeps.SlurmExecutor(time_min=5, queue_timeout=120)
        res = sweeps.run_sweep(nb, [{"seed": 0}, {"seed": 1}], sweep_dir=sw, executor=ex, log=None, max_seconds=20)
        assert [c.status for c in res.cells] == ["failed", "failed"]
        assert "time limit of 20 s" in res.cells[0].error
        ids = ex.job_ids
        assert ids
        # scancel is asynchronous: the jobs leave the queue within a few seconds
        for _ in range(30):
            left = _run(["squeue", "-h", "-j", ",".join(ids)]).stdout.strip()
            if not left:
                break
            time.sleep(1)
        assert not left, left
    finally:
        _cancel_jobs(sw)


class FakeJob:
    def __init__(self, folder: Path, job_id: str):
        from types import SimpleNamespace

        self.job_id = job_id
        self.paths = SimpleNamespace(
            result_pickle=folder / f"{job_id}_result.pkl",
            stdout=folder / f"{job_id}.out",
            stderr=folder / f"{job_id}.err",
        )


def test_slurm_poll_reports_results_lost_jobs_stuck_jobs_and_a_silent_squeue(tmp_path, monkeypatch):
    """The executor's bookkeeping without a cluster: squeue and scancel are replaced."""
    ex = sweeps.SlurmExecutor(poll_interval=0, result_grace=0, queue_timeout=0)
    ex._jobs = {n: FakeJob(tmp_path, f"7_{i}") for i, n in enumerate(["done", "lost", "stuck", "running"])}
    ex.job_ids = ["7"]
    ex._jobs["done"].paths.result_pickle.write_bytes(b"x")
    ex._jobs["lost"].paths.stdout.write_text("line 1\nslurmstepd: error: *** JOB 7 CANCELLED DUE TO TIME LIMIT ***\n")
    queue = {"7_2": ("PENDING", "PartitionConfig"), "7_3": ("RUNNING", "None")}
    monkeypatch.setattr(sweep_executors, "squeue_states", lambda ids: dict(queue))
    cancelled = []
    monkeypatch.setattr(ex, "_cancel", lambda ids: cancelled.extend(ids))
    finished = {f.name: f.message for f in ex.poll()}
    assert set(finished) == {"done", "lost", "stuck"}
    assert finished["done"] is None
    assert "ended without a result" in finished["lost"] and "CANCELLED DUE TO TIME LIMIT" in finished["lost"]
    assert "still pending" in finished["stuck"] and "PartitionConfig" in finished["stuck"] and cancelled == ["7_2"]
    assert ex.running() == ["running"] and ex.pending_reasons() == ["PartitionConfig"]
    # squeue stops answering: after squeue_patience the sweep stops with a clear error
    monkeypatch.setattr(sweep_executors, "squeue_states", lambda ids: None)
    ex.squeue_patience = 0
    with pytest.raises(sweeps.SweepError, match="squeue has not answered"):
        ex.poll()


def test_a_rerun_waits_for_the_slurm_jobs_of_a_driver_that_died(tmp_path, monkeypatch):
    nb = tmp_path / "tiny.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "sweep.json").write_text(
        json.dumps({"notebook_stem": "tiny", "executor": {"kind": "slurm", "job_ids": ["41"]}})
    )
    monkeypatch.setattr(sweeps.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sweeps, "squeue_states", lambda ids: {"41_0": ("RUNNING", "None")} if ids == ["41"] else {})
    with pytest.raises(sweeps.SweepError, match=r"still queued or running \(41_0\).*scancel 41"):
        sweeps.run_sweep(nb, [{"seed": 0}], sweep_dir=sw, executor=sweeps.SlurmExecutor(), log=None)
    assert not (sw / "cells").exists()


def test_without_sbatch_the_sweep_stops_with_a_clear_error(tmp_path, monkeypatch):
    nb = tmp_path / "tiny.ipynb"
    nb.write_text(json.dumps(NOTEBOOK))
    real_which = shutil.which
    monkeypatch.setattr(sweeps.shutil, "which", lambda name: None if name in ("sbatch", "squeue") else real_which(name))
    rc, _, err = run_cli("sweep", nb, "-p", "seed", "0,1", "--executor", "slurm", "--out-dir", tmp_path / "sw")
    assert rc == 2 and "needs sbatch on PATH" in err
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert manifest["state"] == "stopped by an error"
    assert all("sweep stopped (SweepError" in c["error"] for c in manifest["cells"])
