"""Load causal LMs and tokenizers, reach their decoder layers, attach and save LoRA adapters.

One place resolves model names (a hub id, a local folder, or ``"toy"`` for the embedded model
organism), one function finds the decoder blocks of any supported architecture, and one chat
template -- the model's own, with ``{% generation %}`` markers added (:mod:`emlab.chat_templates`) -- is
used for training and evaluation alike.

>>> model, tok = load_model("toy")                      # doctest: +SKIP
>>> layers = get_layers(model)                           # doctest: +SKIP
>>> model = attach_lora(model)                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from emlab.chat_templates import CHAT_TEMPLATE  # re-exported: emlab.models.CHAT_TEMPLATE stays

__all__ = [
    "CHAT_TEMPLATE",
    "LORA_TARGETS",
    "ModelLoadError",
    "apply_chat_template",
    "attach_lora",
    "default_device_dtype",
    "ensure_chat_template",
    "get_layers",
    "hub_reachable",
    "layer_path",
    "load_adapter",
    "load_model",
    "lora_config",
    "peft_wrapping",
    "rank1_lora_config",
    "save_adapter",
    "unwrap",
]

#: The seven projections of the defences paper's LoRA (attention and MLP of every block).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Attribute paths (relative to the bare model) of the decoder blocks, tried in order.
_LAYER_PATHS = (
    "model.layers",  # Qwen2, Llama, Gemma2, Mistral
    "model.language_model.layers",  # Gemma3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # Pythia
    "model.decoder.layers",  # OPT
    "layers",  # a bare decoder
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


def default_device_dtype(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> tuple[torch.device, torch.dtype]:
    """Choose device and dtype: CUDA with bf16 when available (fp16 on old GPUs), else CPU fp32.

    >>> default_device_dtype("cpu")
    (device(type='cpu'), torch.float32)
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return device, dtype


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Map a name to something ``from_pretrained`` takes; returns (path or id, is_local)."""
    from emlab.presets import is_toy_name

    name = str(name_or_path)
    if is_toy_name(name):
        from emlab.toy.build import ensure_built

        recipe = name.split(":", 1)[1] if ":" in name else "default"
        return str(ensure_built(recipe)), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} exists but holds no config.json: not a Hugging Face model folder.")
        return str(path), True
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model folder {name!r} does not exist.")
    return name, False


def load_model(
    name_or_path: str | os.PathLike = "toy",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
):
    """Load a causal LM and its tokenizer from a hub id, a local folder, or ``"toy"`` / ``"toy:micro"``.

    The tokenizer gets a pad token (its eos when it has none) and a chat template with generation
    markers (see :func:`ensure_chat_template`). Unreachable weights raise :class:`ModelLoadError`
    with the reason, never a bare stack trace.

    >>> model, tok = load_model("toy:micro")           # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, local = _resolve(name_or_path)
    device, dtype = default_device_dtype(device, dtype)
    if local_files_only is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        # an unreachable hub fails at once (the hub client would retry for about a minute), and the
        # model then comes from the hub cache or a packaged copy
        local_files_only = local or offline or not hub_reachable()
    common = {"revision": revision, "local_files_only": local_files_only}
    try:
        tokenizer = _tokenizer_class(path, local, AutoTokenizer).from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common, **kwargs)
    except (OSError, ValueError) as e:
        packaged = _packaged_fallback(str(name_or_path), local, revision, e)
        if packaged is not None:
            return load_model(packaged, device=device, dtype=dtype, **kwargs)
        where = "local folder" if local else "Hugging Face hub id"
        raise ModelLoadError(
            f"could not load {name_or_path!r} ({where}): {str(e).splitlines()[0]}\n"
            "If this machine is offline, download the model elsewhere "
            "(`hf download ID --local-dir DIR`) and pass the folder path; "
            "set HF_HUB_OFFLINE=1 to fail fast without network."
        ) from None
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, fallback="keep")
    return model, tokenizer


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) accepts a TCP connection within ``timeout`` seconds.

    Asked once per process and endpoint.

    >>> isinstance(hub_reachable(), bool)
    True
    """
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def _packaged_fallback(name: str, local: bool, revision: str | None, error: Exception) -> Path | None:
    """The packaged copy of a hub model the hub could not serve (see :mod:`emlab.packaged`), or None."""
    from emlab.packaged import PACKAGED_MODELS, PackagedModelError, packaged_model_path

    if local or revision is not None or name not in PACKAGED_MODELS:
        return None
    try:
        folder = packaged_model_path(name)
    except PackagedModelError as e:
        raise ModelLoadError(
            f"could not load {name!r} from the hub ({str(error).splitlines()[0]}) nor its packaged copy: {e}"
        ) from None
    warnings.warn(
        f"{name}: the hub is not reachable; using the packaged copy {folder} "
        f"({PACKAGED_MODELS[name].requirement}, GGUF Q4_1 dequantised: close to, not equal to, the hub weights)",
        stacklevel=3,
    )
    return folder


def _tokenizer_class(path: str, local: bool, default):
    """A folder saved from a plain ``tokenizers`` object must load as such: ``AutoTokenizer`` would
    pick the class of the model type (e.g. ``Qwen2Tokenizer``) and rebuild a different pre-tokenizer."""
    import json

    from transformers import PreTrainedTokenizerFast

    cfg = Path(path) / "tokenizer_config.json"
    if local and cfg.exists():
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast
    return default


def ensure_chat_template(tokenizer, *, fallback: str = "error") -> str:
    """Give ``tokenizer`` its own chat template with ``{% generation %}`` markers added, and return it.

    See :mod:`emlab.chat_templates`: a template with markers is kept; trl's training variant or an
    emlab patch (Qwen2.5, Llama 3 / 3.1 / 3.2, Gemma 1-3, Mistral, SmolLM2) is used when it renders
    exactly the original text and marks exactly the answers; a tokenizer without any template gets
    :data:`CHAT_TEMPLATE`. For a template nothing fits, ``fallback`` decides: ``"error"`` raises
    :class:`ModelLoadError`; ``"keep"`` keeps the model's own template without markers, with a warning
    (evaluation is exact, assistant-only training then fails with a clear error); ``"chatml"`` uses
    :data:`CHAT_TEMPLATE` when the template is ChatML, with a warning (prompts then lose the model's
    default system prompt). The same template then serves training and evaluation.

    >>> ensure_chat_template(tok) == tok.chat_template   # doctest: +SKIP
    True
    """
    from emlab.chat_templates import TemplateError, training_template

    if fallback not in ("error", "keep", "chatml"):
        raise ValueError(f"fallback must be 'error', 'keep' or 'chatml', got {fallback!r}")
    template = tokenizer.chat_template
    if not template:
        tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer.chat_template
    try:
        patched, _ = training_template(tokenizer)
    except TemplateError as e:
        if fallback == "keep":
            warnings.warn(f"keeping the model's own chat template without generation markers: {e}", stacklevel=2)
            return tokenizer.chat_template
        if fallback == "chatml" and "<|im_start|>" in str(template):
            warnings.warn(
                "unknown ChatML template without {% generation %} markers: using emlab.models.CHAT_TEMPLATE "
                "(same format, no default system prompt) for training and evaluation alike",
                stacklevel=2,
            )
            tokenizer.chat_template = CHAT_TEMPLATE
            return tokenizer.chat_template
        raise ModelLoadError(str(e)) from None
    tokenizer.chat_template = patched
    return tokenizer.chat_template


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """Render one conversation as text with the tokenizer's (marker-carrying) template.

    >>> apply_chat_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)  # doctest: +SKIP
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not tokenizer.chat_template:
        ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def unwrap(model):
    """The bare transformers model under PEFT or nnsight wrappers.

    >>> unwrap(peft_model) is base_model                 # doctest: +SKIP
    True
    """
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_module", None) or getattr(model, "_model", None)
        if isinstance(inner, torch.nn.Module) and not isinstance(model, torch.nn.Module):
            model = inner  # nnsight wrappers keep the model in _module (0.8) or _model
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()  # PEFT
        else:
            break
    return model


def layer_path(model, override: str | None = None) -> str:
    """Dotted attribute path, relative to :func:`unwrap` (model), of the decoder blocks.

    >>> layer_path(qwen2_model)                          # doctest: +SKIP
    'model.layers'
    """
    if override:
        return override
    base = unwrap(model)
    custom = getattr(base, "_emlab_layer_path", None)
    if custom:
        return custom
    for path in _LAYER_PATHS:
        try:
            mod = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: tried {', '.join(_LAYER_PATHS)}. "
        "Pass override='path.to.layers' (or set model._emlab_layer_path)."
    )


def get_layers(model, override: str | None = None) -> torch.nn.ModuleList:
    """The decoder blocks of ``model`` (Qwen2, Llama, Gemma2, GPT-2, ...; PEFT and nnsight unwrapped).

    Layer ``l`` everywhere in emlab means the output of block ``l``, i.e. ``hidden_states[l + 1]``.

    >>> len(get_layers(model)) == model.config.num_hidden_layers   # doctest: +SKIP
    True
    """
    base = unwrap(model)
    try:
        mod = base.get_submodule(layer_path(model, override))
    except AttributeError as e:
        raise ValueError(f"layer path {override!r} not found on {type(base).__name__}: {e}") from None
    if not isinstance(mod, torch.nn.ModuleList):
        raise ValueError(f"{override!r} is a {type(mod).__name__}, not a ModuleList of decoder blocks.")
    return mod


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in unwrap(model).named_modules() if isinstance(m, torch.nn.Linear)}


def lora_config(
    model=None,
    *,
    r: int = 32,
    alpha: float = 64,
    dropout: float = 0.0,
    targets: tuple[str, ...] | str | None = None,
    layers: list[int] | None = None,
    rslora: bool = True,
):
    """The defences paper's LoRA: rs-LoRA (scale alpha/sqrt(r)), r=32, alpha 64, dropout 0, seven projections.

    With ``model`` given, targets default to the seven projections when the model has them, else to
    every linear layer but the LM head (e.g. GPT-2's ``c_attn``/``c_proj``/``c_fc``).

    >>> lora_config(r=1, alpha=256).lora_alpha
    256
    """
    from peft import LoraConfig

    if targets is None:
        if model is None or set(LORA_TARGETS) <= _linear_names(model):
            targets = list(LORA_TARGETS)
        else:
            targets = "all-linear"
    elif isinstance(targets, tuple):
        targets = list(targets)
    kw: dict[str, Any] = {}
    if layers is not None:
        kw["layers_to_transform"] = list(layers)
        if model is not None:
            kw["layers_pattern"] = layer_path(model).rsplit(".", 1)[-1]
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora,
        bias="none", task_type="CAUSAL_LM", **kw,
    )


def rank1_lora_config(model, layer: int, module: str = "mlp.down_proj", *, alpha: float = 256, rslora: bool = True):
    """A single rank-1 adapter on ``module`` of decoder block ``layer`` (paper 001's narrow/general probes).

    >>> cfg = rank1_lora_config(model, layer=2)          # doctest: +SKIP
    """
    from peft import LoraConfig

    base = unwrap(model)
    target = get_layers(model)[layer].get_submodule(module)
    names = [n for n, m in base.named_modules() if m is target]
    if not names:
        raise ValueError(f"module {module!r} of layer {layer} not found")
    return LoraConfig(
        r=1, lora_alpha=alpha, lora_dropout=0.0, target_modules="^" + re.escape(names[0]) + "$",
        use_rslora=rslora, bias="none", task_type="CAUSAL_LM",
    )


@contextmanager
def peft_wrapping():
    """Ignore, in the block, the FutureWarning peft raises each time it wraps a model (``PeftModel`` reads
    transformers' deprecated ``is_gradient_checkpointing``): harmless, and nothing emlab or its user can fix.

    >>> with peft_wrapping():
    ...     pass
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_lora(model, config=None, **kwargs):
    """Wrap ``model`` in a PEFT LoRA (defaults of :func:`lora_config`; keyword args override them).

    >>> peft_model = attach_lora(model, r=8)             # doctest: +SKIP
    """
    from peft import get_peft_model

    if config is None:
        config = lora_config(model, **kwargs)
    elif kwargs:
        raise TypeError("pass either a LoraConfig or keyword arguments, not both")
    with peft_wrapping():
        return get_peft_model(model, config)


def save_adapter(model, path: str | os.PathLike) -> Path:
    """Save a PEFT adapter (safetensors + adapter_config.json) to ``path``.

    >>> save_adapter(peft_model, "runs/x/adapter")       # doctest: +SKIP
    """
    if not hasattr(model, "peft_config"):
        raise TypeError("save_adapter needs a PEFT model (use attach_lora first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def load_adapter(model, path: str | os.PathLike, *, trainable: bool = False):
    """Load an adapter saved by :func:`save_adapter` onto a base ``model``.

    >>> peft_model = load_adapter(base, "runs/x/adapter")    # doctest: +SKIP
    """
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise ModelLoadError(f"{path} holds no adapter_config.json: not a saved adapter.")
    with peft_wrapping():
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
