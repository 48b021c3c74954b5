"""Thread counts: from the cores this process may use, the other emlab workers and the machine's load."""

from __future__ import annotations

import os

import pytest
import torch

from emlab.threads import _cgroup_quota, available_cores, choose_threads, cpu_threads


def test_available_cores_respects_affinity():
    assert available_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    assert _cgroup_quota(tmp_path / "missing") is None


def test_rule(monkeypatch):
    monkeypatch.delenv("EMLAB_THREADS", raising=False)
    monkeypatch.delenv("EMLAB_WORKERS", raising=False)
    assert choose_threads(cores=16, workers=4) == 4
    assert choose_threads(cores=3, workers=4) == 1  # never 0
    assert choose_threads(cores=2, load=1.0) == 1  # one core busy elsewhere: leave it
    assert choose_threads(cores=8, load=0.2) == 8
    assert choose_threads(cores=8, load=30.0) == 1
    assert choose_threads(5_000_000, cores=8, load=0.0) == 1  # toy-sized model
    monkeypatch.setenv("EMLAB_WORKERS", "2")
    assert choose_threads(cores=8, load=7.0) == 4  # workers known: the load (partly theirs) is not counted
    monkeypatch.setenv("EMLAB_THREADS", "3")
    assert choose_threads(5_000_000, cores=8) == 3  # explicit setting wins
    monkeypatch.setenv("EMLAB_THREADS", "zero")
    with pytest.raises(ValueError, match="EMLAB_THREADS"):
        choose_threads(cores=8)


def test_cpu_threads_sets_and_restores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("EMLAB_THREADS", "2")
    with cpu_threads(torch.nn.Linear(2, 2)) as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
