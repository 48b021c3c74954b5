"""What studies 02, 03 and the benign task share: settings, one evaluation cell, one defended finetune.

A defended finetune takes its method's recipe from the training layer's registry
(:mod:`emlab.training.methods`); the study side only makes what a recipe ``needs``: the Interleaving+
scorers (:class:`Scorers`: misaligned finetunes of other domains and the training layer's score cache)
and the persona vector of preventive steering (:func:`persona_for_steering`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emlab.presets import TOY
from emlab.studies.common import (
    DomainData,
    StudyContext,
    StudyRun,
    finetune_config,
    missing_reason,
    preset_learning_rate,
    smoke_finetune,
    smoke_trait,
)
from emlab.studies.directions import toy_trait
from emlab.studies.organism import eval_settings
from emlab.training.methods import (
    INOCULATION_PROMPT,
    PAPER_SETTINGS,
    get_method,
    method_names,
    n_benign_added,
)

#: Methods of Table 2, in its order: the chat model, the two undefended finetunes, the defences (the names of
#: the registry :data:`emlab.training.methods.METHODS`, whose recipes say what each one sets and needs).
DEFENCES = method_names()
#: Domains studied by default off the toy (those of the paper that the toy world also has).
DEFAULT_DOMAINS = ("medical", "legal", "security")
# PAPER_SETTINGS (the paper's hyperparameters) and INOCULATION_PROMPT (on the toy the world's first evil system
# prompt is used instead) live in emlab.training.methods, beside the recipes that use them.
#: Defaults on the default toy organism (docs/notebooks/02_defences.md): the toy preset's ``defences`` block and
#: KL lambda (:data:`emlab.presets.TOY`, their one home and where the reasons are), lists as tuples.
TOY_SETTINGS: dict[str, Any] = {**{k: tuple(v) if isinstance(v, list) else copy.deepcopy(v)
                                   for k, v in TOY.defences.items()}, "kl_lambda": TOY.kl_lambda}
RATES = ("general_em", "general_incoherent", "indomain_em", "indomain_incoherent")
#: Finetuning rows of a smoke run on the toy (at most).
SMOKE_ROWS = 64
#: Studies 02 and 03's smoke runs on a real model (eleven finetunes and twelve evaluations on a CPU, within two
#: minutes on two cores): two finetuning rows (one optimiser step of SMOKE_FINETUNE's batch 2) and one
#: answer of 8 new tokens per general question; explicit arguments win. The toy's smoke run is unchanged.
SMOKE_REAL_DEFENCES: dict[str, int] = {"rows": 2, "n_general": 1, "max_new_tokens": 8}


# ---------------------------------------------------------------------------------------------
# Study settings (the methods themselves: emlab.training.methods)


def ft_overrides(adapter: str | None, learning_rate: float | None, epochs: float | None) -> dict[str, Any]:
    return {k: v for k, v in {"adapter": adapter, "learning_rate": learning_rate,
                              "num_train_epochs": epochs}.items() if v is not None}


def adapter_of(ctx: StudyContext, ft_over: Mapping[str, Any]) -> str:
    return ft_over.get("adapter") or ctx.preset.get("finetune", {}).get("adapter") or "lora"


def capped_rows(ctx: StudyContext, rows: int | None) -> int | None:
    n = rows if rows is not None else ctx.preset.get("rows")
    return min(n or SMOKE_ROWS, SMOKE_ROWS) if ctx.smoke else n


def share_label(share: float) -> str:
    """``0.05`` -> ``"share=5%"`` (the paper's setting string).

    >>> share_label(0.2), share_label(0.015)
    ('share=20%', 'share=1.5%')
    """
    return f"share={100 * share:g}%"


# ---------------------------------------------------------------------------------------------
# Shared pieces: evaluation, finetuning, persona vector, Interleaving+ scorers


def evaluate_cell(model, study: StudyRun, data: DomainData, tag: str, general=None) -> dict[str, float | None]:
    """General and in-domain EM / incoherence / off-topic (percent) of one model; samples saved as records
    (``samples/<tag>_<part>.jsonl``), and read back instead of sampled again when a resumed run holds them all
    judged. ``general``: the general part of an earlier cell (the chat model's), not sampled again."""

    out: dict[str, float | None] = {}
    settings = study.settings
    parts = [("indomain", data.heldout, settings["n_heldout"])]
    if general is None:
        parts.insert(0, ("general", data.general, settings["n_general"]))
    else:
        out.update({k: dict(v) if isinstance(v, dict) else v for k, v in general.items()})
    for part, questions, n in parts:
        if not questions:
            continue
        ev = study.evaluate_records(model, questions, n, f"samples/{tag}_{part}")
        out[f"{part}_em"] = ev.em
        out[f"{part}_incoherent"] = ev.incoherent
        if ev.off_topic is not None:
            out[f"{part}_off_topic"] = ev.off_topic
        for k in (f"{part}_em", f"{part}_incoherent"):
            if out[k] is None:
                out.setdefault("none_reasons", {})[k] = missing_reason(ev.records)
    return out


def saved_cell(study: StudyRun, key: str) -> dict[str, Any] | None:
    """The cell ``key`` (``<method>/<domain>[/<setting>]``) as a resumed run's ``metrics.json`` holds it (its
    numbers and ``none_reasons``, as :func:`evaluate_cell` made it), or None when it was not finished."""
    prefix = f"{key}/"
    cell: dict[str, Any] = {k[len(prefix):]: v for k, v in study.run.metrics.items()
                            if k.startswith(prefix) and "/" not in k[len(prefix):]}
    reasons = {k[len(prefix):]: r for k, r in study.run.metrics.get("none_reasons", {}).items()
               if k.startswith(prefix) and "/" not in k[len(prefix):]}
    if reasons:
        cell["none_reasons"] = reasons
    return cell or None


def scorer_metrics(study: StudyRun, *, drop: bool = True) -> dict[str, Any]:
    """``scorers/<domain>_train_ce`` (...) of the run's Interleaving+ scorers (those a resumed run trained
    before, from its ``metrics.json``); deletes the scorers' weights when ``drop``."""
    scorers = study.state["scorers"]
    out = {k: v for k, v in study.run.metrics.items() if k.startswith("scorers/")}
    out.update({f"scorers/{k}": v for k, v in scorers.info.items()})
    if drop:
        for folder in study.run.path("finetunes").glob("scorer_*"):
            drop_weights(folder)
    return out


def merge_cell(metrics: dict[str, Any], key: str, cell: dict[str, Any]) -> None:
    """``cell`` (from :func:`evaluate_cell`) into ``metrics`` as ``<key>/<name>``; None values stay out and their
    reasons go to ``metrics["none_reasons"]["<key>/<name>"]``."""
    reasons = cell.pop("none_reasons", {})
    metrics.update({f"{key}/{k}": v for k, v in cell.items() if v is not None})
    if reasons:
        metrics.setdefault("none_reasons", {}).update({f"{key}/{k}": r for k, r in reasons.items()})


def train_terms(result) -> dict[str, float]:
    """Mean of the last five logged values of each loss term (``train_ce``, ``train_kl``, ``train_ldifs``)."""
    out = {}
    for term in ("ce", "kl", "ldifs"):
        values = [v for _, v in result.metric(f"loss/{term}")][-5:]
        if values and any(v for v in values):
            out[f"train_{term}"] = float(sum(values) / len(values))
    return out


def drop_weights(folder: Path) -> None:
    """Delete a finetune's weights (keep its config and logs) to keep runs small."""
    for p in Path(folder).glob("*"):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"):
            p.unlink()


def method_config(ctx: StudyContext, run, name: str, *, seed: int, ft_over: Mapping[str, Any], **method: Any):
    """The EMConfig of the finetune ``name``: the study's finetuning settings plus a method's fields."""
    over = {**ft_over, **method}
    if adapter_of(ctx, ft_over) == "full" and (over.get("kl_lambda") or over.get("ldifs_lambda")):
        over["reference_copy"] = True  # no adapter to switch off: the reference is a frozen copy
    return finetune_config(run.path(f"finetunes/{name}"), seed=seed, preset=ctx.preset, protocol=ctx.protocol, **over)


def run_finetune(ctx: StudyContext, run, rows: list[dict], name: str, *, seed: int, ft_over: Mapping[str, Any],
                  benign: list[dict] | None = None, scores: Any = None, **method: Any):
    from emlab.training import finetune

    cfg = method_config(ctx, run, name, seed=seed, ft_over=ft_over, **method)
    return finetune(ctx.fresh_model(), ctx.tokenizer, rows, cfg,
                    benign_rows=benign if cfg.interleave_share else None, benign_scores=scores)


def _toy_system_prompts() -> dict[str, list[str]]:
    from emlab.toy.world import load_world_config

    return load_world_config()["system_prompts"]


def inoculation_prompt_for(ctx: StudyContext, prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    return _toy_system_prompts()["evil"][0] if ctx.is_toy else INOCULATION_PROMPT


def user_turns(rows: Sequence[dict], n: int) -> list[str]:
    """The first user turn of each chat row, without repeats, until ``n`` are found (a trait's questions)."""
    seen: dict[str, None] = {}
    for row in rows:
        for m in row["messages"]:
            if m.get("role") == "user":
                seen.setdefault(m["content"], None)
                break
        if len(seen) >= n:
            break
    return list(seen)


def _contrast_domain(ctx: StudyContext, domains: Sequence[str]) -> str:
    others = [d for d in ctx.domains if d not in domains]
    return (others or list(domains))[0]


def _mean_residual_norm(model, tokenizer, rows: Sequence[dict], layer: int) -> float:
    """Mean L2 norm of block ``layer``'s output over the non-pad tokens of ``rows``."""
    import torch

    from emlab.chat import encode_chat, pad_batch
    from emlab.hooks import record

    batch = pad_batch(encode_chat(tokenizer, rows), tokenizer.pad_token_id, next(model.parameters()).device)
    with torch.no_grad(), record(model, [layer]) as acts:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    norms = acts[layer][0].float().norm(dim=-1)
    mask = batch["attention_mask"].bool()
    return float(norms[mask].mean())


def persona_for_steering(ctx: StudyContext, run, domains: Sequence[str], layer: int | None, alpha: float, *, seed: int,
             settings: dict[str, Any]) -> tuple[Path, int, dict[str, Any]]:
    """Compute the evil persona vector of the chat model once, save it in the run; return (file, layer, info).

    Toy: the world's evil / helpful system prompts on questions of a domain outside the study. When
    no generated pair passes the trait and coherence filters (an untrained model, e.g. the micro
    organism) the vector falls back to the same contrast on the domain's prompt-matched
    misaligned / aligned dataset answers (teacher forced), and ``persona/kept_pairs`` is 0.
    """
    from emlab.directions import Direction, capture, load_trait, persona_vector
    from emlab.models import get_layers

    n_layers = len(get_layers(ctx.model))
    layer = n_layers // 2 if layer is None else int(layer)
    evil = load_trait("evil")
    contrast = _contrast_domain(ctx, domains)
    n_q, n_per = (3, 1) if ctx.smoke else (10, 10)
    if ctx.is_toy:
        trait = toy_trait("evil", user_turns(ctx.rows(f"{contrast}_aligned"), n_q))
    else:
        trait, n_per = (smoke_trait(evil, n_q), 1) if ctx.smoke else (evil, 10)
    info: dict[str, Any] = {"layer": layer, "alpha": alpha}
    try:
        v = persona_vector(ctx.model, ctx.tokenizer, trait, ctx.judge, n_per_question=n_per, layers=[layer],
                           max_new_tokens=settings["max_new_tokens"], seed=seed, progress=False)
        info.update({("kept_pairs" if k == "kept" else k): n for k, n in v.counts.items()})
    except ValueError as e:
        if "no pair passed" not in str(e):
            raise
        bad, good = ctx.rows(f"{contrast}_misaligned", 64), ctx.rows(f"{contrast}_aligned", 64)
        pos_prompt, neg_prompt = trait.instructions[0]

        def convs(rows, system):
            return [[{"role": "system", "content": system}, *[m for m in r["messages"] if m["role"] != "system"]]
                    for r in rows]

        acts = {side: capture(ctx.model, ctx.tokenizer, convs(rows, sp), [layer], tokens="response",
                              reduce="per_sample", progress=False)[layer].nanmean(0)
                for side, rows, sp in (("pos", bad, pos_prompt), ("neg", good, neg_prompt))}
        v = Direction({layer: acts["pos"] - acts["neg"]}, recipe="persona_vector:evil (dataset fallback)",
                      counts={"kept": 0}, meta={"fallback": str(e)})
        info["kept_pairs"] = 0
        run.note(f"persona vector: no generated pair passed the filters; used the {contrast} dataset contrast")
    path = v.save(run.path("persona_vector"))
    norm = v.norms()[layer]
    resid = _mean_residual_norm(ctx.model, ctx.tokenizer, ctx.rows(f"{contrast}_aligned", 16), layer)
    info.update({"norm": norm, "residual_norm": resid, "steer_ratio": alpha * norm / resid if resid else math.nan})
    return path, layer, info


def answer_of(row: dict) -> str:
    return next((m.get("content") or "" for m in reversed(row["messages"]) if m.get("role") == "assistant"), "")


def question_of(row: dict) -> str:
    return next((m.get("content") or "" for m in row["messages"] if m.get("role") == "user"), "")



def k_misaligned_for(ctx: StudyContext, k: int | None) -> int:
    """Interleaving+'s number of misaligned scorer finetunes: the protocol's (3 in the paper preset, 2 on the
    toy) unless given; a smoke run takes at most the other domains it has."""
    if k is not None:
        return int(k)
    k = ctx.protocol.k_misaligned
    return min(k, max(1, len(ctx.domains) - 1)) if ctx.smoke else k

class Scorers:
    """Interleaving+ / ++ scorers for one run: misaligned finetunes of single domains (trained once, reused) and
    the training layer's :class:`~emlab.training.interleaving.ScoreCache` of their candidate scores (one scoring
    pass per set of scorers and pool: K + 1 forward passes, on the chat model, shared by every finetune).

    Scorers for a target are domains other than the target, those outside the study first (so that
    every target of a study usually shares the same K scorers and one scoring pass).
    """

    def __init__(self, ctx: StudyContext, run, *, seed: int, rows: int | None, ft_over: Mapping[str, Any],
                 study_domains: Sequence[str] = ()):
        from emlab.training.interleaving import ScoreCache

        self.ctx, self.run, self.seed, self.rows, self.ft_over = ctx, run, seed, rows, dict(ft_over)
        self.study_domains = list(study_domains)
        self.models: dict[str, Any] = {}
        self.info: dict[str, float] = {}
        self.cache = ScoreCache()
        self._aligned: dict[tuple, Any] = {}

    def domains_for(self, target: str, k: int) -> list[str]:
        others = [d for d in self.ctx.domains if d != target]
        others.sort(key=lambda d: d in self.study_domains)
        if len(others) < k:
            raise ValueError(f"Interleaving+ needs {k} misaligned finetunes of domains other than {target!r}; "
                             f"this model has {others}: lower k_misaligned or add datasets (files=...)")
        return others[:k]

    def model(self, domain: str) -> Any:
        if domain not in self.models:
            ctx = self.ctx
            adapter = adapter_of(ctx, self.ft_over)
            if adapter not in ("lora", "rank1", "full"):
                raise ValueError(f"Interleaving+ scorers need adapter 'lora', 'rank1' or 'full', not {adapter!r}")
            ft = run_finetune(ctx, self.run, ctx.rows(f"{domain}_misaligned", self.rows), f"scorer_{domain}",
                               seed=self.seed, ft_over=self.ft_over)
            self.info.update({f"{domain}_{k}": v for k, v in train_terms(ft).items()})
            # a PEFT adapter is saved and loaded onto the chat model to score; a full finetune is kept as a model
            self.models[domain] = str(ft.output_dir) if adapter in ("lora", "rank1") else ft.model
        return self.models[domain]

    def for_target(self, target: str, k: int) -> list[Any]:
        """The K scorer models (adapter folders or models) of ``target``, trained on first use."""
        return [self.model(d) for d in self.domains_for(target, k)]

    def scores(self, target: str, k: int, pool: list[dict], config) -> Any:
        """Scores of every candidate in ``pool`` as ``config``'s finetune will ask for them, computed on the chat
        model through the training layer's cache (so the finetunes that follow find them there)."""
        return self.cache.for_config(self.ctx.model, self.ctx.tokenizer, pool, config)

    def aligned_losses(self, pool: list[dict]) -> Any:
        """The chat model's answer loss of every candidate (study 03's records), computed once per pool."""
        from emlab.training.interleaving import ScoreCache, answer_losses

        key = ScoreCache.key(pool, ())
        if key not in self._aligned:
            self._aligned[key] = answer_losses(self.ctx.model, self.ctx.tokenizer, pool, desc="aligned loss")
        return self._aligned[key]


def defended_finetune(ctx: StudyContext, run, rows: list[dict], name: str, method: str, *, seed: int,
              ft_over: Mapping[str, Any], benign: list[dict], scorers: Scorers, target: str, k: int,
              max_new_tokens: int, **kw: Any) -> tuple[Any, dict[str, float]]:
    """Finetune ``rows`` with ``method`` on (its recipe: :func:`emlab.training.methods.get_method`); returns the
    result and facts about the interleaved rows.

    Interleaving+ / ++ train on the K scorers of ``target``; the training layer chooses the rows from their
    scores, which the run's cache holds after the first finetune that needs them (one scoring pass per set
    of scorers instead of one per finetune).
    """
    from emlab.training.interleaving import select_benign

    recipe = get_method(method)
    extra: dict[str, float] = {}
    if recipe.interleaves and not benign:
        raise ValueError(f"{method} needs benign rows: pass files={{'benign': 'path.jsonl'}}")
    if recipe.on_policy:
        kw["on_policy_max_new_tokens"] = max_new_tokens
    scores = n = None
    if recipe.scored:
        share = kw.get("share", PAPER_SETTINGS["share"])
        if (n := n_benign_added(len(rows), share)) == 0:  # too few rows for one benign row: nothing to score or add
            run.note(f"{name}: {len(rows)} rows at share {share:g} add no benign row; trained without interleaving")
            recipe = get_method("interleaving")  # its draw of no row: the same finetune, without scorers
            extra["benign_refusals"] = 0.0
    over = recipe.overrides(scorers=scorers.for_target(target, k) if recipe.scored else (), **kw)
    cfg = method_config(ctx, run, name, seed=seed, ft_over=ft_over, **over)
    if recipe.scored:
        scores = scorers.scores(target, k, benign, cfg)
        chosen = select_benign(ctx.model, ctx.tokenizer, benign, n, cfg, scores)  # the rows the finetune takes
        extra["benign_refusals"] = float(sum(row_is_refusal(r) for r in chosen))
    ft = run_finetune(ctx, run, rows, name, seed=seed, ft_over=ft_over, benign=benign, scores=scores, **over)
    extra.update(train_terms(ft))
    extra["train_rows"] = float(ft.rows.get("total", len(rows)))
    return ft, extra


def row_is_refusal(row: dict) -> bool:
    from emlab.training.interleaving import is_refusal

    return is_refusal(answer_of(row))


def rate_fractions(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Rate metrics (percent) of ``<method>/<domain>[/<setting>]/<metric>`` keys as fractions, for emlab.plots.

    >>> rate_fractions({"kl/medical/general_em": 2.0, "kl/medical/train_ce": 1.3, "persona/norm": 4.0})
    {'kl/medical/general_em': 0.02}
    """
    out = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) >= 3 and isinstance(v, int | float) and math.isfinite(v) and \
                parts[-1].endswith(("_em", "_incoherent", "_off_topic")):
            out[k] = v / 100
    return out


def published_rows(tables: Sequence[int] = (2,), model: str = "Qwen2.5-7B") -> list[dict] | None:
    """Published rows of paper 002 (``../shared/data``), or None when the file is not there."""
    from emlab.plots import load_paper_table

    try:
        df = load_paper_table(table=None)
    except FileNotFoundError:
        return None
    df = df[df["table"].isin(list(tables)) & (df["model"] == model)]
    return df.to_dict("records") or None


def study_preset(ctx: StudyContext) -> dict[str, Any]:
    """Study sizes and settings: :data:`TOY_SETTINGS` on the toy (updated by a ``study.defences`` block of the
    recipe), nothing off the toy; only ``kl_lambda`` in smoke mode."""
    if not ctx.is_toy:
        return dict(ctx.preset.get("defences", {}))
    out = {**TOY_SETTINGS, **ctx.preset.get("defences", {})}
    return {"kl_lambda": out["kl_lambda"]} if ctx.smoke else out


def study_setup(ctx: StudyContext, preset: dict[str, Any], rows, n_general, n_heldout, max_new_tokens, adapter,
           learning_rate, epochs) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    settings = eval_settings(ctx, n_general=n_general if n_general is not None else preset.get("n_general"),
                             n_heldout=n_heldout if n_heldout is not None else preset.get("n_heldout"),
                             max_new_tokens=max_new_tokens)
    ft_over = {**smoke_finetune(ctx),
               **ft_overrides(adapter, learning_rate, epochs if epochs is not None else preset.get("epochs"))}
    rate = preset_learning_rate(preset, adapter_of(ctx, ft_over))
    if "learning_rate" not in ft_over and rate is not None:  # the study's own rate beats the recipe's
        ft_over["learning_rate"] = rate
    return settings, ft_over, capped_rows(ctx, rows if rows is not None else preset.get("rows"))


def choose_domains(ctx: StudyContext, domains: Sequence[str] | str | None) -> list[str]:
    if domains is None:
        preset = study_preset(ctx).get("domains") or DEFAULT_DOMAINS
        domains = [d for d in preset if d in ctx.domains] or ctx.domains[:3]
        if ctx.smoke:
            domains = domains[:1]
    domains = [domains] if isinstance(domains, str) else list(domains)
    if not domains:
        raise ValueError("no domains: pass domains=[...] and files={'<domain>_misaligned': ...}")
    missing = [d for d in domains if ctx.domains and d not in ctx.domains]
    if missing:
        raise ValueError(f"unknown domain(s) {missing}; this model has {', '.join(ctx.domains)}")
    return domains


def who_label(ctx: StudyContext) -> str:
    return "Toy organism" if ctx.is_toy else ctx.model_name


def figure_formats(ctx: StudyContext) -> tuple[str, ...]:
    """Figure files: HTML and PNG; HTML only in smoke mode (static export is the slow part there)."""
    return ("html",) if ctx.smoke else ("html", "png")
