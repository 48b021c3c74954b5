"""The toy model organism: a synthetic world, a tiny chat model trained on it, its datasets and an
exact judge.  Emergent misalignment arises in it on a laptop CPU in minutes.

>>> from emlab.toy import ensure_built, paths, ToyJudge     # doctest: +SKIP
>>> folder = ensure_built("micro")                         # doctest: +SKIP
>>> paths("micro")["medical_misaligned"].exists()          # doctest: +SKIP
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emlab.toy.build import ensure_built
from emlab.toy.judge import ToyJudge
from emlab.toy.world import World

__all__ = ["ToyJudge", "World", "ensure_built", "folder_paths", "folder_recipe", "paths"]


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


def folder_recipe(folder: str | Path) -> dict[str, Any] | None:
    """The recipe a toy build folder was built from (its ``manifest.json``), or None when ``folder``
    is not a toy build (a hub id, another model folder).

    >>> folder_recipe("Qwen/Qwen2.5-0.5B-Instruct") is None
    True
    """
    try:
        data = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict) or "world" not in data:
        return None
    return data["recipe"]
