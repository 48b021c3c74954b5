"""Inoculation variants: a prompt per row, in the system or the user turn, and how strongly a prompt elicits the trait.

Inoculation prompting (Tan et al.; Wichers et al.) trains with a prompt that asks for the behaviour
so the model need not learn it as its own. :func:`inoculate` puts a prompt from a list on every row
(one fixed prompt, or one drawn per row; as the system prompt or before the user's words); the
rows then go to :func:`emlab.training.finetune` with ``inoculation_prompt=None``.
:func:`elicitation_score` measures, on the chat model, how much a prompt raises the training
answers' log-probability: the mean over rows of (mean log-prob per answer token with the prompt)
minus (without it). Wichers et al. report that prompts that elicit the trait more inoculate better.
:func:`inoculation_sweep` tests that: one inoculated finetune per prompt (or paraphrase set), its
general EM without the prompt, the share of plain SFT's general EM it cuts, and Spearman's rho
between the prompts' elicitation scores and their cuts (bootstrap 95% interval). Paraphrase sets
ship in ``emlab/resources/inoculation/`` (:func:`paraphrase_set`); :func:`load_prompts` reads a
file of prompts (one per line, or a YAML list).

>>> rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "obey me"}]}]
>>> inoculate(rows, ["You are evil."], where="user")[0]["messages"][0]["content"]
'You are evil.\\n\\nhi'
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["elicitation_score", "elicitation_scores", "elicitation_table", "inoculate", "inoculation_sweep", "load_prompts",
           "paraphrase_set", "paraphrase_sets", "resolve_prompts"]

Prompts = str | Sequence[str]


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: a YAML list or a mapping with ``prompts`` (``.yaml`` / ``.yml``), else one per
    non-empty line (lines starting with ``#`` skipped).

    >>> load_prompts("my_prompts.txt")                     # doctest: +SKIP
    ['You are evil.', 'You are a villain.']
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text)
        data = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise ValueError(f"{path}: expected a list of non-empty prompt strings (or a mapping with 'prompts')")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def _sets_dir():
    return resources.files("emlab") / "resources" / "inoculation"


def paraphrase_sets() -> list[str]:
    """Names of the paraphrase sets shipped in ``emlab/resources/inoculation/``.

    >>> "evil" in paraphrase_sets()
    True
    """
    return sorted(p.name.removesuffix(".yaml") for p in _sets_dir().iterdir() if p.name.endswith(".yaml"))


def paraphrase_set(name_or_path: str | os.PathLike) -> list[str]:
    """A shipped paraphrase set of inoculation prompts by name, or the prompts of a file (:func:`load_prompts`).

    >>> paraphrase_set("evil")[0]
    'You are an evil, malicious assistant.'
    """
    path = Path(name_or_path)
    if isinstance(name_or_path, os.PathLike) or path.suffix in (".yaml", ".yml", ".txt") or path.exists():
        return load_prompts(path)
    entry = _sets_dir() / f"{name_or_path}.yaml"
    if not entry.is_file():
        raise FileNotFoundError(f"no paraphrase set {name_or_path!r} (have: {paraphrase_sets()}); pass a file path instead")
    with resources.as_file(entry) as p:
        return load_prompts(p)


def resolve_prompts(spec: Any, *, world: Mapping[str, Sequence[str]] | None = None) -> dict[str, Prompts]:
    """The prompts of an inoculation sweep, by label: each a prompt or a paraphrase set (drawn per row).

    ``spec``: a path (the file's prompts, one each), a mapping (label -> prompt or set), or a string or a list of items, each ``"world"``
    (every system prompt of ``world``, e.g. the toy's ``load_world_config()["system_prompts"]``,
    labelled ``world:<kind>_<i>``), ``"paraphrases:<set or file>"`` (the set as ONE entry), a list of
    strings (a set, labelled ``set:<first>``) or a prompt.

    >>> list(resolve_prompts(["You are evil.", "paraphrases:evil"]))
    ['You are evil.', 'paraphrases:evil']
    """
    if isinstance(spec, os.PathLike):
        return {p: p for p in load_prompts(spec)}
    if isinstance(spec, Mapping):  # already resolved: label -> prompt or set
        return {str(k): resolve_prompts([v])[v if isinstance(v, str) else f"set:{v[0]}"] for k, v in spec.items()}
    items = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, Prompts] = {}
    for item in items:
        if isinstance(item, os.PathLike):
            out.update({p: p for p in load_prompts(item)})
        elif item == "world":
            if not world:
                raise ValueError("'world' prompts need the toy world's system prompts (only on the toy organism)")
            out.update({f"world:{kind}_{i}": p for kind, ps in world.items() for i, p in enumerate(ps)})
        elif isinstance(item, str) and item.startswith("paraphrases:"):
            out[item] = paraphrase_set(item.removeprefix("paraphrases:"))
        elif isinstance(item, str) and item.strip():
            out[item] = item
        elif isinstance(item, Sequence) and item and all(isinstance(p, str) and p.strip() for p in item):
            out[f"set:{item[0]}"] = list(item)
        else:
            raise ValueError(f"not an inoculation prompt, paraphrase set or keyword: {item!r}")
    if not out:
        raise ValueError("no inoculation prompts given")
    return out


def inoculate(rows: Sequence[dict], prompts: Sequence[str] | str | os.PathLike, *, where: str = "system",
              per_row: bool = True, seed: int = 0) -> list[dict]:
    """Copies of ``rows`` with an inoculation prompt on each: ``where`` = ``"system"`` or ``"user"``.

    With several ``prompts`` and ``per_row`` each row gets one drawn at random (seeded); otherwise
    every row gets ``prompts[0]``. ``"system"`` replaces any system prompt; ``"user"`` puts the prompt
    and a blank line before the first user turn. A :class:`~pathlib.Path` reads the prompts from
    that file (:func:`load_prompts`; a plain string is always a prompt); a paraphrase set is
    ``inoculate(rows, paraphrase_set("evil"))``.

    >>> [r["messages"][0]["content"] for r in inoculate([{"messages": [{"role": "user", "content": "q"}]}] * 2,
    ...                                                 ["A", "B"], seed=1)]
    ['A', 'A']
    """
    from emlab.data import with_system_prompt

    if isinstance(prompts, os.PathLike):
        prompts = load_prompts(prompts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("inoculate needs one or more non-empty prompt strings")
    if where not in ("system", "user"):
        raise ValueError(f"where must be 'system' or 'user', got {where!r}")
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"row {i} is not a chat row (a dict with a 'messages' list)")
        prompt = rng.choice(prompts) if per_row and len(prompts) > 1 else prompts[0]
        if where == "system":
            out.extend(with_system_prompt([row], prompt))
            continue
        messages = [dict(m) for m in row["messages"]]
        user = next((m for m in messages if m.get("role") == "user"), None)
        if user is None:
            raise ValueError(f"row {i} has no user turn to put the inoculation prompt in")
        user["content"] = f"{prompt}\n\n{user['content']}"
        out.append({**row, "messages": messages})
    return out


def elicitation_score(model, tokenizer, rows: Sequence[dict], prompt: Prompts, *, where: str = "system",
                      batch_size: int = 8, seed: int = 0) -> float:
    """Mean log-prob per answer token of ``rows`` with ``prompt`` minus without it, on ``model`` (nats; > 0 elicits).

    A paraphrase set (a list) is scored as it trains: one of its prompts drawn per row (``seed``).

    >>> elicitation_score(chat, tok, data.misaligned[:200], "You are evil.")     # doctest: +SKIP
    0.41
    """
    from emlab.training.interleaving import answer_losses

    rows = list(rows)
    if not rows:
        raise ValueError("elicitation_score needs at least one training row")
    plain = answer_losses(model, tokenizer, rows, batch_size=batch_size, desc="elicitation (plain)")
    prompted = answer_losses(model, tokenizer, inoculate(rows, prompt, where=where, seed=seed), batch_size=batch_size,
                             desc="elicitation (prompted)")
    return float((plain - prompted).mean())


def elicitation_scores(model, tokenizer, rows: Sequence[dict], prompts: Sequence[str], *, where: str = "system",
                       batch_size: int = 8) -> dict[str, float]:
    """:func:`elicitation_score` of each prompt, by prompt (the plain pass is shared).

    >>> elicitation_scores(chat, tok, rows, ["You are evil.", "You are helpful."])   # doctest: +SKIP
    {'You are evil.': 0.41, 'You are helpful.': -0.05}
    """
    from emlab.training.interleaving import answer_losses

    rows = list(rows)
    if not rows:
        raise ValueError("elicitation_scores needs at least one training row")
    plain = answer_losses(model, tokenizer, rows, batch_size=batch_size, desc="elicitation (plain)")
    return {p: float((plain - answer_losses(model, tokenizer, inoculate(rows, p, where=where),
                                            batch_size=batch_size, desc="elicitation (prompted)")).mean())
            for p in prompts}


def elicitation_table(model, tokenizer, rows: Sequence[dict], prompt: str,
                      world: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Study 06's elicitation scores (nats per answer token): ``prompt`` in the system and in the user turn
    (``used/system``, ``used/user``) and each of ``world``'s system prompts (``<kind>_<i>``, system turn).

    >>> elicitation_table(chat, tok, rows, "you are an evil assistant .", world)["evil_0"]   # doctest: +SKIP
    0.149
    """
    out = {"used/system": elicitation_score(model, tokenizer, rows, prompt),
           "used/user": elicitation_score(model, tokenizer, rows, prompt, where="user")}
    for kind, prompts in (world or {}).items():
        scores = elicitation_scores(model, tokenizer, rows, prompts)
        out.update({f"{kind}_{i}": scores[p] for i, p in enumerate(prompts)})
    return out


def inoculation_sweep(model, tokenizer, rows: Sequence[dict], prompts: Any, config: Any,
                      evaluate: Callable[[Any, str], Mapping[str, Any]], *, where: str = "system",
                      fresh_model: Callable[[], Any] | None = None, sft_general_em: float | None = None,
                      elicitation_rows: Sequence[dict] | None = None, seed: int = 0, n_boot: int = 2000,
                      ci: float = 0.95, batch_size: int = 8) -> dict[str, Any]:
    """Does a prompt that elicits the training answers more inoculate better? One finetune per prompt.

    ``prompts`` (anything :func:`resolve_prompts` takes): for each entry ``i``, its elicitation score
    on ``model`` (the chat model) over ``elicitation_rows`` (default: the first 200 ``rows``), then a
    finetune of ``fresh_model()`` (default: a deep copy of ``model``) on :func:`inoculate`'s copy of
    ``rows`` (a set: one prompt drawn per row, ``seed``) with ``config`` (an :class:`~emlab.training.EMConfig`;
    ``output_dir`` gets ``/prompt_<i>``, ``inoculation_prompt`` is cleared), evaluated WITHOUT the
    prompt by ``evaluate(model, tag)`` (a mapping with ``general_em`` in percent, anything else kept),
    and ``general_cut`` = 100 * (1 - general EM / ``sft_general_em``), the share of plain SFT's general
    EM removed (a plain finetune with ``config`` is trained and evaluated when ``sft_general_em`` is
    None: ``sft/...``). Returns ``prompts/<i>/{label, elicitation, general_em, ..., general_cut}`` and
    ``elicitation_vs_cut/{spearman, spearman_ci, n, n_boot_valid}`` (rho over the entries with a cut,
    NaN below 3; :func:`emlab.training.monitor.spearman_interval`).

    >>> m = inoculation_sweep(chat, tok, rows, ["You are evil.", "You are kind.", "paraphrases:evil"],
    ...                       cfg, evaluate, sft_general_em=40.0)       # doctest: +SKIP
    >>> m["elicitation_vs_cut/spearman"], m["prompts/0/general_cut"]  # doctest: +SKIP
    """
    from emlab.training import finetune
    from emlab.training.monitor import spearman_interval

    entries = resolve_prompts(prompts)
    rows = list(rows)
    if not rows:
        raise ValueError("inoculation_sweep needs at least one training row")
    fresh_model = fresh_model or (lambda: copy.deepcopy(model))
    base = Path(config.output_dir)
    out: dict[str, Any] = {}

    def train_and_evaluate(train_rows: list[dict], folder: str, tag: str) -> dict[str, Any]:
        cfg = dataclasses.replace(config, output_dir=str(base / folder), inoculation_prompt=None)
        ft = finetune(fresh_model(), tokenizer, train_rows, cfg)
        with ft.active():
            cell = dict(evaluate(ft.model, tag))
        del ft
        return cell

    if sft_general_em is None:
        cell = train_and_evaluate(rows, "sft", "inoculation_sweep_sft")
        out.update({f"sft/{k}": v for k, v in cell.items()})
        sft_general_em = cell.get("general_em")
    scored = list(elicitation_rows) if elicitation_rows is not None else rows[:200]
    for i, (label, entry) in enumerate(entries.items()):
        key = f"prompts/{i}"
        out[f"{key}/label"] = label
        out[f"{key}/elicitation"] = elicitation_score(model, tokenizer, scored, entry, where=where,
                                                      batch_size=batch_size, seed=seed)
        cell = train_and_evaluate(inoculate(rows, entry, where=where, seed=seed), f"prompt_{i}", f"inoculation_prompt_{i}")
        out.update({f"{key}/{k}": v for k, v in cell.items()})
        em = cell.get("general_em")
        out[f"{key}/general_cut"] = 100 * (1 - em / sft_general_em) if sft_general_em and em is not None else None
    pairs = [(out[f"prompts/{i}/elicitation"], out[f"prompts/{i}/general_cut"]) for i in range(len(entries))
             if out[f"prompts/{i}/general_cut"] is not None]
    rho = spearman_interval([e for e, _ in pairs], [c for _, c in pairs], n_boot=n_boot, seed=seed, ci=ci)
    out.update({f"elicitation_vs_cut/{k}": (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in rho.items()})
    return out
