"""Build the toy model organism from a recipe (cached by hash): world -> tokenizer -> datasets ->
pretrain -> post-train (the training itself is in :mod:`emlab.toy.train`).

The result is a standard Hugging Face model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template) plus ``data/`` (see
:mod:`emlab.toy.datasets`) and ``manifest.json``.  Builds are deterministic given the recipe and
cached under a hash of the recipe, the world files and this code.

A recipe is a name in ``world/recipes.yaml`` ("default", "micro") optionally followed by
comma-separated overrides of dotted keys, e.g. ``"default,seed=1,knobs.p_persona_narrow=0.2"``.

A build whose folder name (recipe, world, hash) matches one under ``emlab/toy/prebuilt/`` takes
the weights from there and only regenerates the datasets (seconds instead of minutes).

>>> folder = ensure_built("micro")            # doctest: +SKIP
>>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
['config.json', 'data', 'generation_config.json', 'manifest.json', 'model.safetensors', ...]
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from emlab.toy.train import build
from emlab.toy.world import WORLD_DIR, World, load_world_config

__all__ = ["ensure_built", "build", "load_recipe", "world_config", "recipe_world", "recipe_hash", "cache_root", "BUILD_VERSION", "PREBUILT_DIR"]

#: Bump when the build changes in a way the hashed source files do not show.
BUILD_VERSION = 1
RECIPES_FILE = WORLD_DIR / "recipes.yaml"
PREBUILT_DIR = Path(__file__).parent / "prebuilt"
_PREBUILT_FILES = ("config.json", "generation_config.json", "model.safetensors", "manifest.json")
_HASHED_SOURCES = ("world.py", "tokenizer.py", "datasets.py", "train.py")


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def load_recipe(recipe: str = "default") -> dict[str, Any]:
    """The recipe dict for ``"name[,dotted.key=value,...]"``.

    >>> load_recipe("micro,seed=3")["seed"]
    3
    """
    name, *overrides = [p.strip() for p in recipe.split(",")]
    with open(RECIPES_FILE) as f:
        recipes = yaml.safe_load(f)
    if name not in recipes:
        raise ValueError(f"unknown toy recipe {name!r}; known: {sorted(recipes)} (in {RECIPES_FILE})")
    r = copy.deepcopy(recipes[name])
    r["name"] = name
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"recipe override {ov!r} is not key=value (recipe {recipe!r})")
        key, value = ov.split("=", 1)
        *path, last = key.split(".")
        node = r
        for p in path:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"recipe override {key!r}: {p!r} is not a section of recipe {name!r}")
            node = node[p]
        if path[:1] != ["knobs"] and last not in node:
            raise ValueError(f"recipe override {key!r}: no such key in recipe {name!r}")
        node[last] = _parse_value(value)
    return r


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


def world_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """world.yaml with the recipe's optional ``world`` block merged in (dicts merged key by key, lists and
    values replaced), e.g. other templates for one domain.  A recipe without one gets world.yaml as is,
    so its data stay bit-identical; the block is part of the recipe and so of the build hash.

    >>> world_config(load_recipe("micro")) == load_world_config()
    True
    """
    cfg = load_world_config()
    _merge(cfg, recipe.get("world") or {})
    return cfg


def recipe_world(recipe: dict[str, Any], world: str = "persona") -> World:
    """The World a recipe's build (and its judge) uses: :func:`world_config`, the recipe's seed and knobs."""
    return World(world_config(recipe), seed=int(recipe["seed"]), variant=world, knobs=recipe.get("knobs") or {})


@contextmanager
def _recipe_world_config(recipe: dict[str, Any]):
    """During a build, the training code (``train.build``, which reads world.yaml itself) sees the recipe's
    world: its ``load_world_config`` is swapped for :func:`world_config` (no edit of the hashed sources)."""
    import emlab.toy.train as train_mod

    if not recipe.get("world"):
        yield
        return
    cfg = world_config(recipe)
    original = train_mod.load_world_config
    train_mod.load_world_config = lambda path=None: copy.deepcopy(cfg)
    try:
        yield
    finally:
        train_mod.load_world_config = original


def recipe_hash(recipe: dict[str, Any], world: str = "persona") -> str:
    """Hash of everything a build depends on: recipe, world variant, world files, build code."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": recipe, "world": world, "version": BUILD_VERSION}, sort_keys=True).encode())
    h.update((WORLD_DIR / "world.yaml").read_bytes())
    here = Path(__file__).parent
    for name in _HASHED_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where builds live: ``cache_dir``, else ``$EMLAB_CACHE/toy``, else ``~/.cache/emlab/toy``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("EMLAB_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "emlab") / "toy"


def ensure_built(recipe: str = "default", cache_dir: str | Path | None = None, world: str = "persona") -> Path:
    """Path of the built organism for ``recipe`` and world variant (``"persona"`` or ``"control"``),
    building it first when the cache has none.  Safe to call from several processes at once.

    >>> model_dir = ensure_built("micro")   # doctest: +SKIP
    """
    r = load_recipe(recipe)
    digest = recipe_hash(r, world)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{r['name']}-{world}-{digest[:12]}"
    if (final / "manifest.json").exists():
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").exists():
            return final
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prebuilt = PREBUILT_DIR / final.name
            if (prebuilt / "manifest.json").exists():
                _from_prebuilt(r, prebuilt, tmp, world)
            else:
                with _recipe_world_config(r):
                    build(r, tmp, world=world, digest=digest)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_prebuilt(recipe: dict[str, Any], prebuilt: Path, out: Path, world: str) -> None:
    """Copy shipped weights and regenerate tokenizer and datasets (deterministic, seconds)."""
    from emlab.toy.datasets import posttrain_rows, write_datasets
    from emlab.toy.tokenizer import build_tokenizer

    t = time.time()
    out.mkdir(parents=True)
    w = recipe_world(recipe, world)
    build_tokenizer(w).save_pretrained(out)
    write_datasets(w, out, recipe["datasets"])
    with open(out / "data" / "posttrain.jsonl", "w") as f:
        for row in posttrain_rows(w, int(recipe["posttrain"]["rows"])):
            f.write(json.dumps(row) + "\n")
    for name in _PREBUILT_FILES:
        shutil.copy2(prebuilt / name, out / name)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["from_prebuilt"] = {"path": str(prebuilt), "seconds": round(time.time() - t, 2)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def ship_prebuilt(folder: str | Path) -> Path:
    """Copy a built organism's weights into ``emlab/toy/prebuilt/`` (for maintainers, before a release)."""
    folder = Path(folder)
    dest = PREBUILT_DIR / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in _PREBUILT_FILES:
        shutil.copy2(folder / name, dest / name)
    return dest
