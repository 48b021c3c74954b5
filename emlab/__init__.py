"""emlab: a notebook-first workbench for studying emergent misalignment.

The public names fit on one screen; everything else lives in a submodule (``emlab.directions``,
``emlab.hooks``, ``emlab.judge``, ``emlab.probes``, ``emlab.studies``, ...).

>>> import emlab
>>> model, tok = emlab.load_model("toy")                       # doctest: +SKIP
>>> result = emlab.finetune(model, tok, rows, emlab.EMConfig(output_dir="runs/x", kl_lambda=0.1))  # doctest: +SKIP
"""

from importlib import import_module

from emlab.models import attach_lora, get_layers, load_adapter, load_model, save_adapter
from emlab.version import __version__

#: Names loaded on first use (their modules import trl, nnsight or plotly, which take seconds).
_LAZY = {
    "EMConfig": "emlab.training",
    "finetune": "emlab.training",
    "Direction": "emlab.directions",
    "steer": "emlab.hooks",
    "ablate": "emlab.hooks",
    "generate": "emlab.generation",
    "evaluate": "emlab.evaluation",
    "ToyJudge": "emlab.toy",
    "OpenAIJudge": "emlab.judge",
}

__all__ = ["__version__", "attach_lora", "get_layers", "load_adapter", "load_model", "save_adapter", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emlab' has no attribute {name!r}")
