"""A benign task far from the prior learnt with each defence (paper 002's Table 3: OpSwap; the toy's DomainSwap).

:func:`benign_task_study` runs inside study 02 (``defences_study(benign_tasks=[...])``) or on its own
with a :class:`~emlab.studies.common.StudyContext` and a run. The toy's rows and answer checks:
:mod:`emlab.toy.benign`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from emlab.studies.common import StudyContext
from emlab.studies.defence_kit import (
    PAPER_SETTINGS,
    Scorers,
    answer_of,
    capped_rows,
    defended_finetune,
    drop_weights,
    inoculation_prompt_for,
    k_misaligned_for,
    study_preset,
)
from emlab.toy.benign import domainswap_correct, opswap_correct, toy_domainswap_rows, toy_opswap_rows
from emlab.training.methods import METHODS

__all__ = ["BENIGN_METHODS", "benign_task_study"]

#: Methods a benign task is finetuned with: every recipe that finetunes the misaligned rows.
BENIGN_METHODS = tuple(m.name for m in METHODS if m.trains_on == "misaligned")


def _benign_data(ctx: StudyContext, task: str, tier: int, n_train: int, n_test: int,
                 seed: int) -> tuple[list, list]:
    if task == "domainswap":
        if not ctx.is_toy:
            raise ValueError("domainswap is a toy-world task; use task='opswap' on other models")
        rows = toy_domainswap_rows(tier, n_train + n_test, seed=seed)
    elif task == "opswap":
        if not ctx.is_toy:
            from emlab.tasks.opswap import make_dataset

            return make_dataset(tier, n_train + n_test, seed=seed, test_fraction=n_test / (n_train + n_test))
        rows = toy_opswap_rows(tier, n_train + n_test, seed=seed)
    else:
        raise ValueError(f"unknown benign task {task!r}; choose 'opswap' or 'domainswap'")
    return rows[:n_train], rows[n_train:]


def _benign_accuracy(model, ctx: StudyContext, task: str, test: list[dict], n_samples: int, seed: int) -> float:
    """Exact match (percent) over ``n_samples`` samples at temperature 1 per test question."""
    from emlab.generation import generate
    from emlab.tasks.opswap import extract_answer

    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in test for _ in range(n_samples)]
    texts = generate(model, ctx.tokenizer, prompts, max_new_tokens=64 if ctx.is_toy else 256, seed=seed,
                     progress=False)
    rows = [r for r in test for _ in range(n_samples)]
    if task == "domainswap":
        from emlab.toy import ToyJudge

        judge = ctx.judge if hasattr(ctx.judge, "parse") else ToyJudge()
        hits = [domainswap_correct(judge, r["answer"], t) for t, r in zip(texts, rows)]
    elif ctx.is_toy:
        hits = [opswap_correct(t, r["answer"]) for t, r in zip(texts, rows)]
    else:
        hits = [extract_answer(t) == (r.get("answer") or extract_answer(answer_of(r))) for t, r in zip(texts, rows)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def benign_task_study(
    ctx: StudyContext,
    run,
    *,
    tasks: Sequence[str] = ("opswap_tier1",),
    methods: Sequence[str] = ("sft", "kl", "interleaving"),
    seed: int = 0,
    rows: int | None = None,
    n_test: int | None = None,
    n_samples: int | None = None,
    scorers: Scorers | None = None,
    k_misaligned: int | None = None,
    ft_over: Mapping[str, Any] | None = None,
    **method_kw: Any,
) -> dict[str, float]:
    """Exact match (percent) after finetuning on a benign task far from the prior with each method: does a
    defence stop it being learnt? Table 3 of the paper (OpSwap); ``tasks`` are ``<task>_tier<k>``.

    ``opswap``: :func:`emlab.tasks.opswap.make_dataset` (on the toy :func:`toy_opswap_rows`, which the
    toy cannot learn: it does no arithmetic); ``domainswap`` (toy only): :func:`toy_domainswap_rows`.
    ``method_kw`` are :func:`method_overrides` settings (a ``persona_vector`` for persona steering).
    Keys: ``untrained/<task>_tier<k>/exact_match`` (the chat model), ``<method>/<task>_tier<k>/exact_match``.

    >>> ctx = StudyContext.create("toy", smoke=True)                                      # doctest: +SKIP
    >>> benign_task_study(ctx, start_run("/tmp/b", {}), tasks=["domainswap_tier1"])        # doctest: +SKIP
    {'untrained/domainswap_tier1/exact_match': 0.0, 'sft/domainswap_tier1/exact_match': 63.0, ...}
    """
    k_misaligned = k_misaligned_for(ctx, k_misaligned)
    preset = study_preset(ctx).get("benign", {})
    n_train = rows if rows is not None else (32 if ctx.smoke else preset.get("rows", 1000))
    n_test = n_test or (8 if ctx.smoke else preset.get("n_test", 100))
    n_samples = n_samples or (1 if ctx.smoke else preset.get("n_samples", 2))
    ft_over = dict(ft_over or {})
    if scorers is None:
        scorers = Scorers(ctx, run, seed=seed, rows=capped_rows(ctx, None), ft_over=ft_over)
    benign = ctx.rows("benign") if "benign" in ctx.files else []
    method_kw.setdefault("inoculation_prompt", inoculation_prompt_for(ctx, None))
    method_kw.setdefault("kl_lambda", study_preset(ctx).get("kl_lambda", PAPER_SETTINGS["kl_lambda"]))
    out: dict[str, float] = {}
    for spec in tasks:
        m = re.fullmatch(r"(\w+?)_tier(\d+)", spec)
        if m is None:
            raise ValueError(f"benign task {spec!r} is not '<task>_tier<k>' (e.g. 'opswap_tier1')")
        task, tier = m.group(1), int(m.group(2))
        train, test = _benign_data(ctx, task, tier, n_train, n_test, seed)
        out[f"untrained/{spec}/exact_match"] = _benign_accuracy(ctx.model, ctx, task, test, n_samples, seed)
        for method in methods:
            if method not in BENIGN_METHODS:
                raise ValueError(f"no benign-task check for method {method!r}; choose from {', '.join(BENIGN_METHODS)}")
            ft, extra = defended_finetune(ctx, run, train, f"{spec}/{method}", method, seed=seed, ft_over=ft_over,
                                  benign=benign, scorers=scorers, target="", k=k_misaligned, max_new_tokens=64,
                                  **method_kw)
            with ft.active():
                out[f"{method}/{spec}/exact_match"] = _benign_accuracy(ft.model, ctx, task, test, n_samples, seed)
            out.update({f"{method}/{spec}/{k}": v for k, v in extra.items()})
            drop_weights(ft.output_dir)
            del ft
            run.log_metrics(out)
    return out
