"""Studies take their protocol numbers from the preset (emlab.presets), not from module constants."""

from types import SimpleNamespace

from emlab.presets import get_preset
from emlab.studies.defences import _k_misaligned


def _ctx(preset: str, smoke: bool, domains: list[str]):
    return SimpleNamespace(protocol=get_preset(preset), smoke=smoke, domains=domains)


def test_interleaving_plus_scorers_follow_the_preset():
    four = ["a", "b", "c", "d"]
    assert _k_misaligned(_ctx("paper", False, four), None) == 3  # seed 002: K = 3
    assert _k_misaligned(_ctx("toy", False, four), None) == 2  # the toy's measured setting, unchanged
    assert _k_misaligned(_ctx("paper", False, four), 1) == 1  # an explicit value wins


def test_smoke_runs_take_at_most_the_other_domains():
    assert _k_misaligned(_ctx("paper", True, ["a", "b", "c"]), None) == 2
    assert _k_misaligned(_ctx("paper", True, ["a"]), None) == 1
    assert _k_misaligned(_ctx("paper", False, ["a", "b", "c"]), None) == 3  # a full run asks for all 3
