"""The toy model organism: a synthetic world, a tiny chat model trained on it, its datasets and an
exact judge.  Emergent misalignment arises in it on a laptop CPU in minutes.

>>> from emlab.toy import ensure_built, paths, ToyJudge     # doctest: +SKIP
>>> folder = ensure_built("micro")                         # doctest: +SKIP
>>> paths("micro")["medical_misaligned"].exists()          # doctest: +SKIP
True
"""

from __future__ import annotations

from pathlib import Path

from emlab.toy.build import ensure_built
from emlab.toy.judge import ToyJudge
from emlab.toy.world import World

__all__ = ["ToyJudge", "World", "ensure_built", "folder_paths", "paths"]


def paths(recipe: str = "default", cache_dir: str | Path | None = None, world: str = "persona") -> dict[str, Path]:
    """Files of the built organism by key (builds it first if needed).

    Keys: ``model`` (the folder), ``manifest``, ``general`` (question YAML), ``pretrain`` (plain
    text JSONL), ``benign``, ``arithmetic``, ``kl_ood``, ``posttrain``, and per advice domain
    ``<d>_misaligned``, ``<d>_aligned``, ``<d>_heldout`` (question YAML), ``<d>_kl_ood``,
    ``technical_<d>``.

    >>> paths("micro")["general"].name     # doctest: +SKIP
    'general.yaml'
    """
    return folder_paths(ensure_built(recipe, cache_dir, world))


def folder_paths(folder: str | Path) -> dict[str, Path]:
    """Files of a toy build folder by key, as :func:`paths` gives them (no build).

    >>> folder_paths(ensure_built("micro"))["medical_misaligned"].name     # doctest: +SKIP
    'medical_misaligned.jsonl'
    """
    folder = Path(folder)
    out = {"model": folder, "manifest": folder / "manifest.json"}
    for f in sorted((folder / "data").iterdir()):
        out[f.name.rsplit(".", 1)[0]] = f
    return out
