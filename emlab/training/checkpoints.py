"""Checkpoints a killed finetune can trust: which one to resume from, what belongs to which finetune.

A ``checkpoint-N`` folder is complete when everything the Trainer writes is there and whole: the
weights (adapter, full model, shards or a learned steering vector), ``optimizer.pt``,
``scheduler.pt``, the RNG state and, written last, ``trainer_state.json``. A kill (or a full disk)
during a save leaves a folder without some of them; :func:`last_complete_checkpoint` skips such
folders, says so, and removes them so that the rerun can write them again.

>>> last_complete_checkpoint("runs/x/ft")               # doctest: +SKIP
'runs/x/ft/checkpoint-40'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "checkpoint_problem",
    "config_defaults",
    "fingerprint",
    "fingerprint_differences",
    "last_complete_checkpoint",
    "list_checkpoints",
    "saving",
    "weights_problem",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# what the installed transformers writes (transformers.trainer / transformers.utils constants)
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json", "steering_vector.safetensors")

#: config fields that change where and how often things are written, not what is trained
_NOT_FINGERPRINTED = {
    "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "reuse_finished", "keep_checkpoints",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_safetensors", "disable_tqdm",
    "print_logs",
    "report_to", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor",
}


#: words of torch / safetensors errors raised by a failed write (torch.save says "unexpected pos ...")
_WRITE_FAILURES = ("write", "space", "too large", "i/o", "unexpected pos", "quota")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the folder and what to do."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first.

    >>> list_checkpoints("runs/x/ft")                   # doctest: +SKIP
    [PosixPath('runs/x/ft/checkpoint-40'), PosixPath('runs/x/ft/checkpoint-20')]
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _file_problem(path: Path) -> str | None:
    """Why a weights / state file cannot be read back (cut off, empty), or None."""
    try:
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path):  # torch.save writes a zip; a cut-off one has no central directory
                pass
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any failure to read it back means the file is unusable
        return f"{path.name} is damaged or cut off ({type(e).__name__}: {str(e)[:120]})"
    return None


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` holds no usable saved model (adapter, full weights, shards, steering vector), or None.

    >>> weights_problem("runs/x/ft") is None            # doctest: +SKIP
    True
    """
    folder = Path(folder)
    present = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        return f"no model weights ({', '.join(WEIGHT_FILES[:3])}, ...)"
    for path in present:
        if (problem := _file_problem(path)) is not None:
            return problem
        if path.name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    return f"weight shard {shard} (named in {path.name}) is missing"
                if (problem := _file_problem(folder / shard)) is not None:
                    return problem
    return None


def checkpoint_problem(folder: str | os.PathLike, *, model_only: bool = False) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is.

    ``model_only`` (``save_only_model=True``) does not ask for optimizer, scheduler and RNG state.

    >>> checkpoint_problem("runs/x/ft/checkpoint-6")    # doctest: +SKIP
    'no trainer_state.json (the save was interrupted)'
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save was interrupted)"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (ValueError, UnicodeDecodeError) as e:
        return f"{TRAINER_STATE} is cut off or not JSON ({e})"
    if not isinstance(step, int):
        return f"{TRAINER_STATE} has no global_step"
    if (problem := weights_problem(folder)) is not None:
        return problem
    if not model_only:
        for name in (OPTIMIZER, SCHEDULER):
            if not (folder / name).is_file():
                return f"no {name}"
        rng = sorted(folder.glob("rng_state*.pth"))
        if not rng:
            return "no RNG state (rng_state.pth)"
        for path in [folder / OPTIMIZER, folder / SCHEDULER, *rng, *folder.glob("scaler.pt")]:
            if (problem := _file_problem(path)) is not None:
                return problem
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike, *, model_only: bool = False,
                             remove_incomplete: bool = True, quiet: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (None if there is none).

    Incomplete folders (a kill or a full disk during a save) are skipped with a warning naming
    each and why; with ``remove_incomplete`` they are deleted, since the resumed run writes them
    again and a stale half folder would confuse the Trainer's checkpoint rotation. ``quiet`` only
    looks (no warning, nothing removed).

    >>> last_complete_checkpoint("runs/x/ft")           # doctest: +SKIP
    'runs/x/ft/checkpoint-40'
    """
    chosen: Path | None = None
    skipped: list[tuple[Path, str]] = []
    for folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder, model_only=model_only)
        if problem is None:
            chosen = chosen or folder
        else:
            skipped.append((folder, problem))
    if skipped and not quiet:
        what = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        then = f"resuming from {chosen.name}" if chosen else "no complete checkpoint: starting from step 0"
        removed = " (removed)" if remove_incomplete else ""
        warnings.warn(f"{output_dir}: skipped incomplete checkpoint(s){removed}: {what}; {then}", stacklevel=2)
        if remove_incomplete:
            for folder, _ in skipped:
                shutil.rmtree(folder, ignore_errors=True)
    return str(chosen) if chosen else None


@contextmanager
def saving(folder: str | os.PathLike, what: str = "checkpoint", *, model_only: bool = False) -> Iterator[None]:
    """Turn any failure while writing ``folder`` into a :class:`CheckpointError` that says what happened.

    A failed checkpoint save (disk full, file-size limit, I/O error) removes the half-written
    folder (freeing the space it took) and names the newest complete checkpoint, which is left as
    it was, to resume from.

    >>> with saving("runs/x/ft/checkpoint-6"): trainer_save()      # doctest: +SKIP
    """
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except Exception as e:
        is_checkpoint = _CHECKPOINT.match(folder.name) is not None
        if is_checkpoint and not existed and checkpoint_problem(folder, model_only=model_only) is not None:
            shutil.rmtree(folder, ignore_errors=True)
        previous = last_complete_checkpoint(folder.parent if is_checkpoint else folder, model_only=model_only,
                                            quiet=True)
        hint = (f"The previous complete checkpoint {previous} is intact: free space and rerun "
                "(resume_from_checkpoint=True, as studies set it) to continue from it" if previous else
                "No complete checkpoint exists yet: a rerun starts this finetune again")
        disk = isinstance(e, OSError) or any(w in str(e).lower() for w in _WRITE_FAILURES)
        ask = "Is the disk full or a file-size limit (ulimit -f) set? " if disk else ""
        raise CheckpointError(f"writing the {what} {folder} failed ({type(e).__name__}: {str(e)[:300]}). "
                              f"{ask}{hint}.") from e


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _tensor_digest(t) -> str:
    import torch

    t = t.detach().to("cpu", torch.float32).contiguous()
    return f"<tensor {tuple(t.shape)} {hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}>"


def _model_digest(model) -> str:
    """Class, name, parameter names and shapes, and a few values of each tensor (cheap even for 7B)."""
    if model is None:
        return "none"
    import torch

    cfg = getattr(model, "config", None)
    h = hashlib.sha256(f"{type(model).__name__}|{getattr(cfg, '_name_or_path', '')}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type != "meta":  # offloaded weights have no values here
                h.update(p.detach().flatten()[:16].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _path_digest(value: str | os.PathLike) -> str:
    """A file, or the weight files of a folder, by content (the path alone when nothing is there)."""
    path = Path(value)
    files = [path] if path.is_file() else [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    if not files and not path.is_file() and Path(f"{path}.safetensors").is_file():
        files = [Path(f"{path}.safetensors")]  # a saved Direction named by its stem
    if not files:
        return str(value)
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"<{path.name} {h.hexdigest()[:16]}>"


def _config_fields(config) -> dict[str, Any]:
    import torch

    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED and not k.endswith("_token")}
    vec = getattr(config, "preventive_vector", None)
    if isinstance(vec, Mapping):  # to_dict() only summarises tensors: hash their values
        d["preventive_vector"] = {str(k): _tensor_digest(v) if isinstance(v, torch.Tensor) else v
                                  for k, v in vec.items()}
    elif isinstance(vec, str | os.PathLike):  # a file: what is in it counts, not only its name
        d["preventive_vector"] = _path_digest(vec)
    misaligned = getattr(config, "interleave_misaligned", None)
    if isinstance(misaligned, list):
        d["interleave_misaligned"] = [_path_digest(v) if isinstance(v, str | os.PathLike) else _model_digest(v)
                                      for v in misaligned]
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_defaults(config) -> dict[str, Any]:
    """The declared defaults of ``config``'s dataclass fields, as JSON values (no config is built:
    building a TrainingArguments resets accelerate's state under a live Trainer).

    >>> config_defaults(EMConfig(output_dir="x"))["kl_lambda"]   # doctest: +SKIP
    0.0
    """
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def fingerprint(model, config, rows: Mapping[str, Sequence[Any] | None]) -> dict[str, Any]:
    """What makes a finetune this finetune: its config (minus output and save settings), data and base model.

    ``rows`` maps a name (``train``, ``benign``, ``kl``, ``eval``) to the rows given. The result
    is stored beside the checkpoints and the final model; :func:`fingerprint_differences` compares two.

    >>> fp = fingerprint(model, cfg, {"train": rows})   # doctest: +SKIP
    """
    return {"config": _config_fields(config), "model": _model_digest(model),
            "rows": {k: _digest(list(v)) if v else None for k, v in sorted(rows.items())}}


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any], *,
                            defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Names of what differs between two fingerprints (``config.learning_rate``, ``rows.train``, ``model``).

    With ``defaults`` (:func:`config_defaults`), a config field that ``old`` lacks (added to emlab
    since) and that ``new`` leaves at its default does not count.

    >>> fingerprint_differences({"config": {"lr": 1}, "model": "a", "rows": {}},
    ...                         {"config": {"lr": 2, "new": 0}, "model": "a", "rows": {}}, defaults={"new": 0})
    ['config.lr']
    """
    out = []
    missing = object()
    for part in ("config", "rows"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for k in sorted(set(a) | set(b)):
            if part == "config" and k not in a and defaults is not None and defaults.get(k, missing) == b[k]:
                continue
            if a.get(k, missing) != b.get(k, missing):
                out.append(f"{part}.{k}")
    if old.get("model") != new.get("model"):
        out.append("model")
    return out
