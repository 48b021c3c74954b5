"""The study context: a loaded chat model with its tokenizer, judge and dataset files, from notebook parameters.

A study runs on the toy organism by default (``model="toy"``; ``smoke=True`` takes the micro
organism) and on any hub id or folder otherwise, in which case the user names the dataset files
and the judge (an OpenAI-compatible model). Nothing below special-cases the toy beyond finding its
files and its exact judge. The studies (:mod:`emlab.studies.common` re-exports these names) and the
widgets (:func:`emlab.widgets.steering_explorer_for_run`) both build on it.

>>> ctx = StudyContext.create("toy", smoke=True)          # doctest: +SKIP
>>> data = ctx.domain_data("medical")                      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_JUDGES", "DomainData", "StudyContext", "resolve_judge"]

#: Judge names that mean "the study's own chat model, as a local Hugging Face judge".
LOCAL_JUDGES = ("local", "local-hf")


@dataclass
class DomainData:
    """The chat rows and question sets a study of one advice domain needs."""

    domain: str
    misaligned: list[dict]
    aligned: list[dict]
    heldout: list[Any]
    general: list[Any]
    other_heldout: dict[str, list[Any]] = field(default_factory=dict)
    kl_rows: list[dict] = field(default_factory=list)
    benign: list[dict] = field(default_factory=list)


@dataclass
class StudyContext:
    """A loaded chat model with its tokenizer, judge and data locations.

    ``model_name`` is what the notebook passed (``"toy"``, a hub id or a folder); ``files`` maps
    dataset keys (``<domain>_misaligned``, ``general``, ...) to paths. ``preset`` is the toy recipe's
    study block (empty off the toy); ``protocol`` the :class:`emlab.presets.Preset` the run follows
    (``toy`` on the toy, ``paper`` otherwise), recorded as ``"preset"`` in every study's run config.
    """

    model_name: str
    smoke: bool
    model: Any
    tokenizer: Any
    judge: Any
    files: dict[str, Path]
    domains: list[str]
    preset: dict[str, Any]
    protocol: Any = None  # emlab.presets.Preset; None only for contexts built by hand (treated as preset_for)
    #: dataset files of emlab's own toy build (not the user's): loaded without data-quality warnings
    own_files: frozenset[Path] = frozenset()

    def __post_init__(self) -> None:
        if self.protocol is None:
            from emlab.presets import preset_for

            self.protocol = preset_for(self.model_name)

    @property
    def is_toy(self) -> bool:
        """The model is a toy recipe given by name (:func:`emlab.presets.is_toy_name`)."""
        from emlab.presets import is_toy_name

        return is_toy_name(self.model_name)

    @classmethod
    def create(
        cls,
        model: str = "toy",
        *,
        smoke: bool = False,
        judge: str | Any | None = None,
        files: dict[str, str | os.PathLike] | None = None,
        device: str | None = None,
        protocol: Any = None,
    ) -> StudyContext:
        """Load the model and pick the judge and the dataset files.

        Toy: ``"toy"`` builds (or reuses) the default organism, or the micro one with ``smoke``;
        its files and the exact toy judge come with it, as they do for a toy build folder given by
        path (the control world: ``emlab.toy.paths(world="control")["model"]``), which also takes its
        recipe's study preset from the folder's ``manifest.json``. Otherwise ``files`` must name the datasets
        (``<domain>_misaligned``, ``<domain>_aligned``, ``<domain>_heldout``, ``general``, ...)
        and ``judge`` names the judge (see :func:`resolve_judge`: an OpenAI-compatible model at
        ``$OPENAI_BASE_URL``, default ``gpt-4o-mini``, ``"toy"``, ``"local"``) or is a judge object.
        The judge is checked first (:func:`emlab.judge.preflight`), before the model is loaded, so a
        missing key or an unreachable endpoint fails before any training (a judge by the study's own
        model is checked after loading it).
        ``protocol`` (a preset name or :class:`emlab.presets.Preset`) overrides the default of
        :func:`emlab.presets.preset_for` (``toy`` on the toy, ``paper`` otherwise).

        >>> ctx = StudyContext.create("toy", smoke=True)        # doctest: +SKIP
        """
        from emlab.models import load_model
        from emlab.toy import ToyJudge, folder_paths, folder_recipe, paths
        from emlab.toy.build import load_recipe

        name = str(model)
        from emlab.presets import is_toy_name

        toy = is_toy_name(name)
        found: dict[str, Path] = {}
        domains: list[str] = []
        preset: dict[str, Any] = {}
        spec: dict[str, Any] | None = None
        if toy:
            recipe = name.split(":", 1)[1] if ":" in name else ("micro" if smoke else "default")
            name = f"toy:{recipe}"
            found = paths(recipe)
            spec = load_recipe(recipe)
        elif (spec := folder_recipe(name)) is not None:
            # a toy build folder given by path (the control world, a recipe variant): the same files,
            # judge and study preset as a named recipe, so that a control is finetuned exactly as
            # its persona world
            found = folder_paths(name)
        toy_folder = spec is not None and not toy
        if spec is not None:
            domains = sorted(k[: -len("_misaligned")] for k in found if k.endswith("_misaligned"))
            preset = dict(spec.get("study", {}))
            # the toy's matrices are tiny: one thread is faster than two (and much faster on a busy machine)
            import torch

            torch.set_num_threads(int(spec.get("threads", 1)))
        own = frozenset(found.values())  # the toy build's own files (a user's file given below is not one)
        for key, value in (files or {}).items():
            found[key] = Path(value)
            if key.endswith("_misaligned") and key[: -len("_misaligned")] not in domains:
                domains.append(key[: -len("_misaligned")])
        # the judge is checked before the model is loaded or anything trained: a missing key or a dead
        # endpoint fails here, not after hours of finetuning
        from emlab.judge import preflight
        from emlab.presets import get_preset, preset_for

        # an unknown preset name fails before the judge is called or the model loaded
        chosen = get_preset(protocol) if protocol is not None else preset_for(name, toy_folder=toy_folder)
        own_model_judge = judge in LOCAL_JUDGES
        judge_obj: Any = None
        if judge is None and (toy or toy_folder):
            # a recipe with its own world block (other templates) is judged by its own grammar
            from emlab.toy.build import recipe_world

            judge_obj = ToyJudge(recipe_world(spec)) if spec and spec.get("world") else ToyJudge()
        elif not own_model_judge:
            judge_obj = resolve_judge(judge, model_name=name)
            preflight(judge_obj)
        loaded, tok = load_model(name, device=device)
        if own_model_judge:
            judge_obj = resolve_judge(judge, loaded, tok, model_name=name)
            preflight(judge_obj)
        return cls(name, smoke, loaded, tok, judge_obj, found, domains, preset, chosen,
                   own_files=frozenset(p for p in found.values() if p in own))

    def file(self, key: str) -> Path:
        """The dataset file for ``key``, or a clear error naming the parameter to set.

        >>> ctx.file("medical_misaligned").name        # doctest: +SKIP
        'medical_misaligned.jsonl'
        """
        if key not in self.files:
            raise KeyError(
                f"no dataset {key!r} for model {self.model_name!r}: pass files={{'{key}': 'path'}} "
                f"(known: {', '.join(sorted(self.files)) or 'none'})"
            )
        return self.files[key]

    def rows(self, key: str, limit: int | None = None) -> list[dict]:
        """Chat rows of dataset ``key`` (validated), the first ``limit`` of them; data-quality warnings
        (duplicates, ...) only for the user's files, not for emlab's own toy datasets (:attr:`own_files`).

        >>> len(ctx.rows("medical_misaligned", 100))   # doctest: +SKIP
        100
        """
        from emlab.data import load_chat_jsonl

        path = self.file(key)
        rows = load_chat_jsonl(path, warn=path not in self.own_files)
        return rows[:limit] if limit else rows

    def questions(self, key: str) -> list[Any]:
        """Question set ``key``. Without a ``general`` file: the protocol preset's general questions off the
        toy (the paper's 24 upstream questions, fetched on first use and cached), emlab's eight general
        questions in smoke mode (offline).

        >>> [q.id for q in ctx.questions("general")][:2]   # doctest: +SKIP
        """
        from emlab.questions import general_questions, load_questions

        if key == "general" and key not in self.files:
            if self.smoke or self.protocol.questions[0] in ("toy", "emlab"):
                return general_questions()
            return self.protocol.general_questions()
        return load_questions(self.file(key))

    def domain_data(self, domain: str, *, rows: int | None = None, kl_rows: int | None = None) -> DomainData:
        """Everything a study of ``domain`` needs: its two datasets, held-out and general questions.

        >>> data = ctx.domain_data("medical", rows=2000)    # doctest: +SKIP
        """
        if self.domains and domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this model has {', '.join(self.domains)}")
        other = {d: self.questions(f"{d}_heldout") for d in self.domains
                 if d != domain and f"{d}_heldout" in self.files}
        kl_key = f"{domain}_kl_ood" if f"{domain}_kl_ood" in self.files else "kl_ood"
        return DomainData(
            domain=domain,
            misaligned=self.rows(f"{domain}_misaligned", rows),
            aligned=self.rows(f"{domain}_aligned", rows) if f"{domain}_aligned" in self.files else [],
            heldout=self.questions(f"{domain}_heldout") if f"{domain}_heldout" in self.files else [],
            general=self.questions("general"),
            other_heldout=other,
            kl_rows=self.rows(kl_key, kl_rows) if kl_key in self.files else [],
            benign=self.rows("benign") if "benign" in self.files else [],
        )

    def fresh_model(self):
        """A deep copy of the chat model to finetune (the loaded one stays the untouched reference).

        >>> ft = ctx.fresh_model()       # doctest: +SKIP
        """
        return copy.deepcopy(self.model)


def resolve_judge(judge: str | Any | None, model: Any = None, tokenizer: Any = None, *, model_name: str = "") -> Any:
    """A judge object from a notebook's ``judge`` parameter.

    ``None``: :class:`~emlab.judge.OpenAIJudge` with its default model (``gpt-4o-mini``); ``"toy"``:
    the exact toy judge; ``"local"`` / ``"local-hf"``: the study's own chat model (``model``,
    ``tokenizer``) as a :class:`~emlab.judge.LocalHFJudge`; ``"local-hf:<hub id or folder>"``: that
    model as a local judge; any other string: an OpenAI-compatible model name, sent to
    ``OPENAI_BASE_URL`` (default api.openai.com) with ``OPENAI_API_KEY``; an object with ``score``
    is used as it is.

    >>> resolve_judge("toy").name
    'toy'
    >>> resolve_judge("gpt-4o").name          # doctest: +SKIP
    'openai:gpt-4o'
    """
    if judge is not None and not isinstance(judge, str):
        if not callable(getattr(judge, "score", None)):
            raise TypeError(f"judge must be a name or an object with a score(metric, pairs) method, got {judge!r}")
        return judge
    if judge == "toy":
        from emlab.toy import ToyJudge

        return ToyJudge()
    if judge in LOCAL_JUDGES or (isinstance(judge, str) and judge.startswith("local-hf:")):
        from emlab.judge import LocalHFJudge

        if judge in LOCAL_JUDGES:
            if model is None:
                raise ValueError(f"judge {judge!r} judges with the study's own model, but none was given")
            return LocalHFJudge(model, tokenizer, progress=False, name=f"hf:{model_name or 'chat model'}")
        from emlab.models import load_model

        where = judge.split(":", 1)[1]
        jm, jt = load_model(where)
        return LocalHFJudge(jm, jt, progress=False, name=f"hf:{where}")
    from emlab.judge import OpenAIJudge

    if judge is not None and not judge.strip():
        raise ValueError("judge is an empty string: pass a model name such as 'gpt-4o-mini', 'toy' or 'local'")
    return OpenAIJudge() if judge is None else OpenAIJudge(model=judge)
