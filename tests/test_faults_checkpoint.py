"""Killed finetunes (issue 15, observation 4): resume from the newest COMPLETE checkpoint, same weights.

Real child processes train a tiny random model with the study checkpoint settings and are SIGKILLed
after a checkpoint, during a checkpoint save, or stopped by a file-size limit (a full disk); the
rerun must resume from the right checkpoint and end with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from emlab.studies.common import STUDY_CHECKPOINTS, finetune_config
from emlab.training.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    config_defaults,
    fingerprint,
    fingerprint_differences,
    last_complete_checkpoint,
    list_checkpoints,
    weights_problem,
)

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_child  # noqa: E402

CHILD = Path(__file__).parent / "ckpt_child.py"
ROOT = Path(__file__).parent.parent
START_LIMIT_S = 180  # a child imports torch + transformers on a busy machine before it trains


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run keeping every checkpoint (2, 4, 6, 8): the reference and the damage source."""
    out = tmp_path_factory.mktemp("straight") / "ft"
    result = ckpt_child.train(out, {"keep_checkpoints": True, "save_total_limit": None})
    return out, result


def _same_adapter(a: Path, b: Path) -> None:
    x, y = ckpt_child.adapter(a), ckpt_child.adapter(b)
    assert x.keys() == y.keys() and x
    assert all(torch.equal(x[k], y[k]) for k in x), "final weights differ from the uninterrupted run's"


def _losses(folder: Path) -> list[float]:
    return [h["loss"] for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]


def _copy_checkpoints(src: Path, dst: Path, steps: list[int]) -> None:
    dst.mkdir(parents=True)
    shutil.copy(src / "emlab_checkpoints.json", dst)
    for s in steps:
        shutil.copytree(src / f"checkpoint-{s}", dst / f"checkpoint-{s}")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _kill_when_held(out: Path, config: dict, mode: str) -> str:
    """Start a child finetune, SIGKILL it as soon as it is held at ``mode``; return its output."""
    log = out.parent / "child.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(out), json.dumps(config), mode], cwd=ROOT,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    held = Path(f"{out}.held")
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not held.exists():
            if proc.poll() is not None:
                pytest.fail(f"the child ended (rc {proc.returncode}) before {mode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not reach {mode} within {START_LIMIT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return log.read_text()


# ---- which checkpoint is complete ----


def test_complete_checkpoints_pass_and_each_damage_is_named(straight, tmp_path):
    src, _ = straight
    assert [p.name for p in list_checkpoints(src)] == ["checkpoint-8", "checkpoint-6", "checkpoint-4", "checkpoint-2"]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(src))
    assert weights_problem(src) is None  # the final adapter
    damages = {
        "no_state": (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
        "cut_state": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hi'), "cut off"),
        "cut_weights": (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors"),
        "no_weights": (lambda c: (c / "adapter_model.safetensors").unlink(), "no model weights"),
        "cut_optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
        "no_scheduler": (lambda c: (c / "scheduler.pt").unlink(), "no scheduler.pt"),
        "no_rng": (lambda c: (c / "rng_state.pth").unlink(), "RNG state"),
    }
    for name, (damage, reason) in damages.items():
        c = tmp_path / name
        shutil.copytree(src / "checkpoint-4", c)
        damage(c)
        problem = checkpoint_problem(c)
        assert problem is not None and reason in problem, (name, problem)
    c = tmp_path / "model_only"
    shutil.copytree(src / "checkpoint-4", c)
    (c / "optimizer.pt").unlink()
    assert checkpoint_problem(c, model_only=True) is None and "optimizer.pt" in checkpoint_problem(c)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_last_complete_checkpoint_skips_and_removes_incomplete_ones(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [2, 4, 6])
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    _truncate(out / "checkpoint-4" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=r"checkpoint-6: no trainer_state.json.*checkpoint-4: adapter_model"
                                         r".*resuming from checkpoint-2"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    empty = tmp_path / "none"
    _copy_checkpoints(src, empty, [2])
    (empty / "checkpoint-2" / "rng_state.pth").unlink()
    with pytest.warns(UserWarning, match="no complete checkpoint: starting from step 0"):
        assert last_complete_checkpoint(empty, remove_incomplete=False) is None
    assert (empty / "checkpoint-2").is_dir()
    assert last_complete_checkpoint(tmp_path / "missing") is None


# ---- what belongs to which finetune ----


def test_fingerprint_names_what_differs(tmp_path):
    from emlab.testing import tiny_model

    cfg = finetune_config(tmp_path / "a", seed=0, **ckpt_child.settings())
    same = finetune_config(tmp_path / "b", seed=0, **ckpt_child.settings(save_steps=3, keep_checkpoints=True))
    other = finetune_config(tmp_path / "a", seed=0, **ckpt_child.settings(learning_rate=2e-2))
    model = tiny_model("qwen2", vocab_size=64, seed=0)
    rows = {"train": ckpt_child.rows(), "kl": None}
    fp = fingerprint(model, cfg, rows)
    assert fingerprint_differences(fp, fingerprint(model, same, rows)) == []  # output and save settings only
    assert fingerprint_differences(fp, fingerprint(model, other, rows)) == ["config.learning_rate"]
    assert fingerprint_differences(fp, fingerprint(model, cfg, {"train": ckpt_child.rows(11), "kl": None})) == \
        ["rows.train"]
    assert fingerprint_differences(fp, fingerprint(tiny_model("qwen2", vocab_size=64, seed=1), cfg, rows)) == \
        ["model"]
    assert fingerprint_differences(json.loads(json.dumps(fp)), fp) == []  # survives the JSON file
    older = json.loads(json.dumps(fp))
    del older["config"]["ldifs_normalize"]  # a fingerprint written before the field existed
    assert fingerprint_differences(older, fp) == ["config.ldifs_normalize"]
    assert fingerprint_differences(older, fp, defaults=config_defaults(cfg)) == []  # left at its default
    norm = fingerprint(model, finetune_config(tmp_path / "a", seed=0, ldifs_normalize=True,
                                              **ckpt_child.settings()), rows)
    assert fingerprint_differences(older, norm, defaults=config_defaults(cfg)) == ["config.ldifs_normalize"]
    from safetensors.torch import save_file

    vec = tmp_path / "persona.safetensors"
    save_file({"1": torch.ones(32)}, str(vec))
    steered = fingerprint(model, finetune_config(tmp_path / "a", seed=0, preventive_vector=str(vec)), rows)
    save_file({"1": torch.full((32,), 2.0)}, str(vec))  # same file name, other vector
    assert fingerprint_differences(steered, fingerprint(
        model, finetune_config(tmp_path / "a", seed=0, preventive_vector=str(vec)), rows)) == \
        ["config.preventive_vector"]
    as_dict = finetune_config(tmp_path / "a", seed=0, preventive_vector={1: torch.ones(32)})
    assert fingerprint_differences(fingerprint(model, as_dict, rows), fingerprint(
        model, finetune_config(tmp_path / "a", seed=0, preventive_vector={1: torch.zeros(32)}), rows)) == \
        ["config.preventive_vector"]


# ---- study settings: checkpoints on, a finished finetune is loaded ----


def test_study_finetunes_checkpoint_and_resume(tmp_path):
    cfg = finetune_config(tmp_path / "ft", seed=0)
    assert cfg.save_strategy == "steps" and cfg.save_steps == STUDY_CHECKPOINTS["save_steps"] == 0.1
    assert cfg.save_total_limit == 1 and cfg.resume_from_checkpoint and cfg.reuse_finished
    assert not cfg.keep_checkpoints
    assert finetune_config(tmp_path / "ft", seed=0, save_strategy="no").save_strategy == "no"  # overridable


def test_finished_finetune_is_loaded_not_retrained(straight, tmp_path):
    src, first = straight
    out = tmp_path / "ft"
    done = ckpt_child.train(out)
    assert list_checkpoints(out) == []  # study finetunes drop their checkpoints once finished
    _same_adapter(out, src)
    steps = _Steps()
    again = ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == []  # loaded, not trained
    assert again.log_history == done.log_history and again.rows == done.rows
    ids = torch.tensor([[5, 9, 11, 4, 7]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, first.model(ids).logits)
    with pytest.raises(CheckpointError, match=r"finished finetune of other settings.*config.learning_rate"):
        ckpt_child.train(out, {"learning_rate": 2e-2})
    (out / "adapter_model.safetensors").unlink()  # e.g. a study that dropped the weights after evaluating
    steps = _Steps()
    with pytest.warns(UserWarning, match="weights are not usable"):
        ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == list(range(1, 9))
    _same_adapter(out, src)


# ---- resume after a (simulated) kill during a save ----


def test_resume_skips_an_interrupted_save_and_ends_like_an_uninterrupted_run(straight, tmp_path, capsys):
    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [2, 4, 6])
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # the kill came before the trainer state
    _truncate(out / "checkpoint-6" / "optimizer.pt")
    steps = _Steps()
    with pytest.warns(UserWarning, match="checkpoint-6: no trainer_state.json"):
        ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == [5, 6, 7, 8]
    assert f"resuming {out} from checkpoint-4" in capsys.readouterr().err
    _same_adapter(out, src)
    assert _losses(out) == _losses(src)


def test_resume_at_an_epoch_boundary(straight, tmp_path):
    src, _ = straight  # 12 rows, batch 2: an epoch is 6 steps
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [4, 6])
    steps = _Steps()
    ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == [7, 8]
    _same_adapter(out, src)


def test_a_kill_during_the_final_save_resumes_from_the_last_checkpoint(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [6, 8])
    data = (src / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])  # cut off; no emlab_finetune.json
    steps = _Steps()
    ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == []  # checkpoint-8 is the last step: nothing left to train, only the save
    _same_adapter(out, src)
    assert _losses(out) == _losses(src) and list_checkpoints(out) == []


def test_checkpoints_of_another_finetune_are_refused(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [2])
    with pytest.raises(CheckpointError, match=r"checkpoint-2.*another finetune.*config.warmup_steps"):
        ckpt_child.train(out, {"warmup_steps": 1})


def test_an_explicit_incomplete_checkpoint_is_a_clear_error(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [2, 4])
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint: no trainer_state.json.*checkpoint-2"):
        ckpt_child.train(out, {"resume_from_checkpoint": str(out / "checkpoint-4")})


def test_a_failing_save_names_the_folder_and_keeps_the_previous_checkpoint(straight, tmp_path):
    from emlab.training.checkpoints import saving

    src, _ = straight
    out = tmp_path / "ft"
    _copy_checkpoints(src, out, [2])
    half = out / "checkpoint-4"
    with pytest.raises(CheckpointError, match=r"checkpoint-4 failed \(RuntimeError: .*unexpected pos 576.*disk full"
                                              r".*checkpoint-2 is intact") as err:
        with saving(half):
            half.mkdir()
            (half / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert not half.exists() and checkpoint_problem(out / "checkpoint-2") is None
    with pytest.raises(CheckpointError) as err:  # not a write failure: no talk of disks
        with saving(out / "checkpoint-6"):
            raise TypeError("a callback broke")
    assert "disk" not in str(err.value) and "checkpoint-2 is intact" in str(err.value)


# ---- real kills ----


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_resumes(straight, tmp_path, capsys):
    src, _ = straight
    out = tmp_path / "ft"
    _kill_when_held(out, {}, "after_step:5")
    assert checkpoint_problem(out / "checkpoint-4") is None
    assert not (out / "emlab_finetune.json").exists()
    steps = _Steps()
    ckpt_child.train(out, callbacks=[steps])  # the rerun (in this process: a child's start costs seconds)
    assert steps.steps == [5, 6, 7, 8]
    assert f"resuming {out} from checkpoint-4" in capsys.readouterr().err
    _same_adapter(out, src)
    assert _losses(out) == _losses(src)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_rerun_resumes(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    _kill_when_held(out, {}, "in_save:6")
    half = out / "checkpoint-6"
    assert (half / "adapter_model.safetensors").exists() and not (half / "trainer_state.json").exists()
    steps = _Steps()
    with pytest.warns(UserWarning, match="checkpoint-6: no trainer_state.json"):
        ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == [5, 6, 7, 8]
    _same_adapter(out, src)
    assert _losses(out) == _losses(src)


@pytest.mark.slow
def test_sigkill_timed_by_watching_the_folder_then_rerun_resumes(straight, tmp_path, capsys):
    """No hold: the kill lands wherever the child is once checkpoint-4 appears (in or just after the save)."""
    src, _ = straight
    out = tmp_path / "ft"
    log = tmp_path / "child.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(out), "{}"], cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not (out / "checkpoint-4").exists():
            assert proc.poll() is None, f"the child ended first:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint-4 within {START_LIMIT_S} s"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    newest = last_complete_checkpoint(out, quiet=True)
    assert newest is not None and Path(newest).name in ("checkpoint-2", "checkpoint-4")
    steps = _Steps()
    ckpt_child.train(out, callbacks=[steps])
    assert f"resuming {out} from {Path(newest).name}" in capsys.readouterr().err
    assert steps.steps[0] == int(Path(newest).name.split("-")[1]) + 1 and steps.steps[-1] == 8
    _same_adapter(out, src)


@pytest.mark.slow
def test_file_size_limit_during_a_save_is_a_clear_error_and_the_last_checkpoint_survives(straight, tmp_path):
    src, _ = straight
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, str(CHILD), str(out), "{}", "fsize_after_save:4"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=START_LIMIT_S)
    assert proc.returncode != 0
    assert "CheckpointError: writing the checkpoint" in proc.stderr and "checkpoint-6 failed" in proc.stderr
    assert "file-size limit" in proc.stderr and "checkpoint-4 is intact" in proc.stderr
    assert not (out / "checkpoint-6").exists()  # the half-written folder is gone, its space freed
    assert checkpoint_problem(out / "checkpoint-4") is None
    steps = _Steps()
    ckpt_child.train(out, callbacks=[steps])
    assert steps.steps == [5, 6, 7, 8]
    _same_adapter(out, src)
