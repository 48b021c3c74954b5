"""Protocol presets: every number a study takes from a paper (or from the toy), in one place.

A :class:`Preset` holds the evaluation protocol (questions, samples, sampling, judge), the defence
settings and the finetuning recipe. Two ship with emlab:

* ``toy``: the toy organism's values, exactly as the studies used them before presets existed
  (:data:`emlab.studies.defences.TOY_SETTINGS` is read from it, :func:`emlab.studies.organism.eval_settings`);
* ``paper``: the papers' protocol, the default for every model other than the toy: Betley et al.'s
  8 main questions in their 3 variants (24, ``first_plot_questions.yaml``; the general EM rate) and
  the pre-registered set (``extra_questions``), with the judge prompts inside those files, sampled at temperature 1 with 600 new tokens and the
  files' 100 samples per question; judge ``gpt-4o-mini`` as in seed 002 (``gpt-4o`` selectable);
  30 held-out questions per domain, 100 samples each; KL 0.1, LDIFS 1.0, steering alpha 5, 5%
  interleaved data, Interleaving+ scored with K=3 misaligned finetunes; rs-LoRA r=32, alpha=64,
  lr 1e-4, one epoch, batch 4 x 4.

:func:`preset_for` picks the preset of a model name; ``preset.to_dict()`` is what a run's
``config.json`` records under ``"preset"``.

>>> preset_for("toy").name, preset_for("Qwen/Qwen2.5-7B-Instruct").name
('toy', 'paper')
>>> PAPER.max_new_tokens, PAPER.judge, PAPER.k_misaligned, PAPER.heldout_questions_per_domain
(600, 'gpt-4o-mini', 3, 30)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["KL_VARIANTS", "NARROW_KL_LAMBDA", "PAPER", "PRESETS", "TOY", "Preset", "get_preset", "is_toy_name", "kl_settings", "preset_for"]

#: KL variants: EMConfig fields each one sets. ``emlab`` (default): KL(ref || cur), the mass-covering
#: direction of paper 001, averaged over the tokens that carry loss. ``authors``: the defences
#: paper's public code, reverse KL(cur || ref) on the training batch (same token set and normaliser:
#: emlab never divides by the vocabulary size nor averages over pads).
#: Study 05's KL weight of the narrow solution per adapter kind (the KL is a token mean in nats, summed over
#: the vocabulary); emlab's choice on the toy (paper 001 gives none), the default of every preset's ``narrow``.
NARROW_KL_LAMBDA: dict[str, float] = {"steering_vector": 3.0, "rank1_lora": 3.0, "lora": 10.0}

KL_VARIANTS: dict[str, dict[str, str]] = {
    "emlab": {"kl_direction": "forward", "kl_on": "batch", "kl_tokens": "loss_tokens"},
    "authors": {"kl_direction": "reverse", "kl_on": "batch", "kl_tokens": "loss_tokens"},
}


@dataclass(frozen=True)
class Preset:
    """A named protocol. ``None`` in a count means "as the question file says".

    Evaluation: ``questions`` names the general question sets the general EM rate is measured on
    (``"toy"``: the organism's own files; ``"emlab"``: emlab's eight general questions;
    ``"first_plot"`` / ``"preregistered"``: Betley et al.'s upstream files), ``extra_questions`` further
    sets of the protocol (loaded with ``general_questions(sets=...)``), ``n_general`` / ``n_heldout`` samples per general / held-out question,
    ``heldout_questions_per_domain`` held-out questions per finetuning domain. Judge: ``judge`` and
    the ``judge_choices`` a user may select instead. Defences: ``kl_lambda``, ``ldifs_lambda``,
    ``steering_alpha``, ``share`` (benign rows ADDED, as a fraction of the finetuning rows),
    ``k_misaligned`` (Interleaving+ scorers), ``kl_variant`` (:data:`KL_VARIANTS`). ``finetune``:
    :class:`emlab.training.EMConfig` fields. ``defences``: the defences studies' sizes (``rows``,
    ``domains``, ...). ``narrow``: study 05's narrow solution, its KL weight per adapter kind (``kl_lambda``)
    and learning rates per kind where EMConfig's default does not fit (``learning_rates``). ``sources``: where each number comes from.
    """

    name: str
    description: str
    questions: tuple[str, ...]
    n_general: int | None
    n_heldout: int | None
    heldout_questions_per_domain: int | None
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    judge: str = "gpt-4o-mini"
    judge_choices: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o")
    kl_lambda: float = 0.1
    ldifs_lambda: float = 1.0
    steering_alpha: float = 5.0
    share: float = 0.05
    k_misaligned: int = 3
    kl_variant: Literal["emlab", "authors"] = "emlab"
    eval_fraction: float = 0.1
    extra_questions: tuple[str, ...] = ()
    finetune: dict[str, Any] = field(default_factory=dict)
    defences: dict[str, Any] = field(default_factory=dict)
    narrow: dict[str, Any] = field(default_factory=lambda: {"kl_lambda": dict(NARROW_KL_LAMBDA), "learning_rates": {}})
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kl_variant not in KL_VARIANTS:
            raise ValueError(f"kl_variant must be one of {', '.join(KL_VARIANTS)}, got {self.kl_variant!r}")
        if self.judge not in self.judge_choices and self.judge != "toy":
            raise ValueError(f"judge {self.judge!r} is not one of the preset's choices {self.judge_choices}")
        for name in ("n_general", "n_heldout", "heldout_questions_per_domain"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.k_misaligned < 1 or self.max_new_tokens < 1:
            raise ValueError("k_misaligned and max_new_tokens must be >= 1")
        if not 0 <= self.share < 1 or not 0 < self.eval_fraction < 1:
            raise ValueError("share must be in [0, 1) and eval_fraction in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (tuples as lists), for a run's ``config.json``.

        >>> PAPER.to_dict()["questions"], PAPER.to_dict()["extra_questions"]
        (['first_plot'], ['preregistered'])
        """
        return json_ready(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> Preset:
        """A copy with some fields changed (checked like a new preset), e.g. the gpt-4o judge.

        >>> PAPER.replace(judge="gpt-4o").judge
        'gpt-4o'
        """
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise TypeError(f"unknown preset field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def kl_settings(self) -> dict[str, str]:
        """The :class:`emlab.training.EMConfig` KL fields of this preset's ``kl_variant``.

        >>> PAPER.replace(kl_variant="authors").kl_settings()["kl_direction"]
        'reverse'
        """
        return kl_settings(self.kl_variant)

    def eval_settings(self) -> dict[str, Any]:
        """Sampling sizes in the form the studies use (``n_general``, ``n_heldout``, ``max_new_tokens``);
        counts the preset leaves to the question files are omitted.

        >>> TOY.eval_settings()
        {'n_general': 40, 'n_heldout': 4, 'max_new_tokens': 64}
        """
        out: dict[str, Any] = {"n_general": self.n_general, "n_heldout": self.n_heldout,
                               "max_new_tokens": self.max_new_tokens}
        return {k: v for k, v in out.items() if v is not None}

    def general_questions(self, *, sets: tuple[str, ...] | None = None, path: str | None = None,
                          base_url: str | None = None) -> list[Any]:
        """The general question sets of this preset (or ``sets``), concatenated (ids are unique across sets).

        ``"first_plot"`` / ``"preregistered"`` are fetched from the pinned upstream commit on first use
        (``path`` reads the first one from disk instead); entries whose ``type`` is not a 0-100 judged
        free-form question are left out. ``"emlab"`` is :func:`emlab.questions.general_questions`.

        >>> len(PAPER.general_questions())                          # doctest: +SKIP
        24
        >>> len(PAPER.general_questions(sets=PAPER.extra_questions))  # doctest: +SKIP
        48
        """
        from emlab.questions import betley_questions, general_questions

        out: list[Any] = []
        for i, name in enumerate(self.questions if sets is None else sets):
            if name == "emlab":
                out += general_questions()
            elif name in ("first_plot", "preregistered"):
                qs = betley_questions(name, path=path if i == 0 else None, base_url=base_url)
                out += [q for q in qs if q.type == "free_form_judge_0_100"]
            else:
                raise ValueError(f"preset {self.name!r}: question set {name!r} is not loadable here "
                                 "('toy' sets come with the organism's files)")
        return out


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (dict keys kept)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def kl_settings(variant: str) -> dict[str, str]:
    """EMConfig fields of a KL variant (:data:`KL_VARIANTS`).

    >>> kl_settings("emlab")["kl_direction"]
    'forward'
    """
    if variant not in KL_VARIANTS:
        raise ValueError(f"unknown KL variant {variant!r}; choose from {', '.join(KL_VARIANTS)}")
    return dict(KL_VARIANTS[variant])


#: The toy organism's protocol: the values the studies used before presets (tests check each one).
#: ``defences`` (studies 02, 03 and 06 on the default toy): sizes that keep each notebook near 8 minutes on 2
#: idle cores (a 1000-row LoRA finetune is ~13 CPU-s, a 400-answer evaluation ~6 CPU-s); LoRA at 1e-4 for
#: these 1000-row finetunes, as every v2 measurement of the pages (the v3 recipe's 2e-5, tuned for notebook
#: 00's 6000 rows, leaves them undertrained: docs/notebooks/03_interleaving.md); ``kl_lambda`` 1.0: on the
#: toy the paper's 0.1 cuts general EM by ~20% only (the toy's lambda sweep is in the docs).
TOY = Preset(
    name="toy",
    description="the toy organism: its own question files and exact judge, sizes for minutes on a CPU",
    questions=("toy",),
    n_general=40, n_heldout=4, heldout_questions_per_domain=None, max_new_tokens=64,
    judge="toy", judge_choices=("toy",),
    kl_lambda=1.0, ldifs_lambda=1.0, steering_alpha=5.0, share=0.05, k_misaligned=2, kl_variant="emlab",
    finetune={},
    defences={"domains": ["medical", "legal"], "rows": 1000, "n_general": 20, "n_heldout": 20,
              "learning_rates": {"lora": 1e-4}, "benign_tasks": ["domainswap_tier1"],
              "benign": {"rows": 1000, "n_test": 100, "n_samples": 2}},
    narrow={"kl_lambda": dict(NARROW_KL_LAMBDA), "learning_rates": {"rank1_lora": 3e-4}},
    sources={"eval": "emlab.studies.organism (n_general 40, n_heldout 4, 64 tokens)",
             "narrow": "study 05 on the toy: rank-1 LoRA at 3e-4, where EMConfig's default (tuned on 7-14B models) "
                       "leaves it undertrained",
             "defences": "the toy's study sizes since v2 (emlab.studies.defences.TOY_SETTINGS is read from here)",
             "methods": "emlab.studies.defences.PAPER_SETTINGS (k_misaligned 2 on the toy)"},
)

#: The papers' protocol: seed 002 (section 4.3, Appendix A/B.1) on Betley et al.'s evaluation.
PAPER = Preset(
    name="paper",
    description="the defences paper's protocol (seed 002) on Betley et al.'s evaluation questions",
    questions=("first_plot",), extra_questions=("preregistered",),
    n_general=100, n_heldout=100, heldout_questions_per_domain=30, max_new_tokens=600,
    temperature=1.0, top_p=1.0, judge="gpt-4o-mini", judge_choices=("gpt-4o-mini", "gpt-4o"),
    kl_lambda=0.1, ldifs_lambda=1.0, steering_alpha=5.0, share=0.05, k_misaligned=3, kl_variant="emlab",
    eval_fraction=0.1,
    finetune={"adapter": "lora", "lora_r": 32, "lora_alpha": 64.0, "rslora": True, "learning_rate": 1e-4,
              "num_train_epochs": 1.0, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
              "warmup_steps": 5, "lr_scheduler_type": "linear", "weight_decay": 0.01, "max_length": 2048},
    defences={"domains": ["medical", "legal", "security"], "rows": 5400},
    sources={
        "questions": "seed 002 section 4.3: the 24 first-plot questions (8 x 3 variants), Betley et al.",
        "samples": "upstream first_plot_questions.yaml: samples_per_paraphrase 100, one paraphrase per question "
                   "(Table 2's general rates are consistent with multiples of 1/2400 = 24 x 100, e.g. 0.08 ~ 2/2400)",
        "sampling": "Betley et al.'s code: temperature 1, top_p 1, max_tokens 600 (methods.md section 1)",
        "judge": "seed 002 section 4.3: GPT-4o-mini instead of the original GPT-4o",
        "heldout": "seed 002 section 4.3: 30 questions from each held-out set; 100 samples each (not stated; "
                   "Table 2's in-domain rates are consistent with multiples of 1/3000, e.g. 1.90 = 57/3000)",
        "methods": "seed 002 section 4.3 and B.1: KL 0.1, LDIFS 1.0, alpha 5, 5% added data; Appendix E: K=3",
        "finetune": "seed 002 Table 6: rs-LoRA r 32, alpha 64, lr 1e-4, 1 epoch, batch 4 x 4, warmup 5",
        "split": "seed 002 section 4.3: 90/10 train/eval split, 5,400 training rows",
    },
)

#: Presets by name.
PRESETS: dict[str, Preset] = {"toy": TOY, "paper": PAPER}


def get_preset(name: str | Preset) -> Preset:
    """A preset by name (``"toy"``, ``"paper"``), or the preset itself.

    >>> get_preset("paper").k_misaligned
    3
    """
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def is_toy_name(model_name: str | os.PathLike) -> bool:
    """The one rule for a toy model NAME: ``"toy"`` or ``"toy:<recipe>"`` (a toy build given by its folder is
    recognised by :func:`emlab.toy.folder_recipe` instead).

    >>> is_toy_name("toy"), is_toy_name("toy:micro"), is_toy_name("toyota/llm"), is_toy_name("/x/toy")
    (True, True, False, False)
    """
    name = str(model_name)
    return name == "toy" or name.startswith("toy:")


def preset_for(model_name: str, *, toy_folder: bool = False) -> Preset:
    """The default preset of a model: ``toy`` for ``"toy"``, ``"toy:<recipe>"`` or a toy build folder
    (``toy_folder=True``), ``paper`` for every other model.

    >>> preset_for("toy:micro").name, preset_for("/models/qwen").name
    ('toy', 'paper')
    """
    return TOY if toy_folder or is_toy_name(model_name) else PAPER
