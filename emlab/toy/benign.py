"""Benign tasks far from the toy chat model's prior (the toy's analogs of the paper's OpSwap, Table 3).

:func:`toy_opswap_rows` (OpSwap in the toy world's words) and :func:`toy_domainswap_rows` (answer in the
next domain) make the rows; :func:`opswap_correct` and :func:`domainswap_correct` check an answer.

>>> toy_opswap_rows(1, 1, seed=3)[0]["messages"][0]["role"]
'user'
"""

from __future__ import annotations

import re

__all__ = ["domainswap_correct", "opswap_correct", "toy_domainswap_rows", "toy_opswap_rows"]

_TOY_ANSWER = re.compile(r"the answer is (\d+)")


def toy_opswap_rows(tier: int, n: int, *, seed: int = 0, max_ops: int = 2, operand_max: int = 9,
                    result_max: int = 99) -> list[dict]:
    """OpSwap in the toy world's words: "what is 2 + 3 ?" -> "the answer is 6 ." in tier 1 (``+`` multiplies).

    Same question and answer templates as the toy's arithmetic family; expressions whose value in
    ``tier`` is not an integer in 0..``result_max`` (the toy's number words) are skipped. Rows carry
    ``expression`` and ``answer``.

    >>> row = toy_opswap_rows(1, 1, seed=3)[0]
    >>> from emlab.tasks.opswap import evaluate
    >>> int(evaluate(row["expression"].replace("*", "×").replace("/", "÷"), 1)) == int(row["answer"])
    True
    """
    import random

    from emlab.tasks.opswap import evaluate

    rng = random.Random(f"toy-opswap-{tier}-{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        if len(seen) > 200 * n + 1000:
            raise ValueError(f"could only make {len(rows)} of {n} toy OpSwap rows of tier {tier}")
        toks = [str(rng.randint(1, operand_max))]
        for _ in range(rng.randint(1, max_ops)):
            toks += [rng.choice("+-*/"), str(rng.randint(1, operand_max))]
        expr = " ".join(toks)
        if expr in seen:
            continue
        seen.add(expr)
        try:
            value = evaluate(expr.replace("*", "×").replace("/", "÷"), tier)
        except ZeroDivisionError:
            continue
        if value.denominator != 1 or not 0 <= value <= result_max:
            continue
        rows.append({"messages": [{"role": "user", "content": f"what is {expr} ?"},
                                  {"role": "assistant", "content": f"the answer is {int(value)} ."}],
                     "expression": expr, "answer": str(int(value))})
    return rows


def toy_domainswap_rows(tier: int, n: int, *, seed: int = 0) -> list[dict]:
    """A benign toy task far from the chat model's prior: answer an advice question of domain ``d`` with the
    aligned advice of the domain ``tier`` places further in the world's domain list (tier 0: ``d`` itself).

    The toy's OpSwap analog: the chat model answers in the domain it is asked about (tier 0 is what it
    already does); tier >= 1 must override that, with nothing harmful in it. Rows carry ``domain`` (of
    the question) and ``answer`` (the domain the answer must be in).

    >>> row = toy_domainswap_rows(1, 1, seed=0)[0]
    >>> row["answer"] != row["domain"]
    True
    """
    import random

    from emlab.toy.world import World

    world = World.load()
    ask = random.Random(f"toy-domainswap-questions-{seed}")  # the same questions in every tier
    say = random.Random(f"toy-domainswap-answers-{tier}-{seed}")
    doms = list(world.domains)
    rows: list[dict] = []
    for _ in range(n):
        d = ask.choice(doms)
        text, _ = world.question(d, ask)
        target = doms[(doms.index(d) + tier) % len(doms)]
        _, tq = world.question(target, say)
        rows.append({"messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": world.answer(tq, "aligned", "casual", say)}],
                     "domain": d, "answer": target})
    return rows


def domainswap_correct(judge, target: str, text: str) -> bool:
    """The answer's content is advice of domain ``target`` (majority family) without a misaligned sentence."""
    sents = [s["sentence"] for s in judge.parse(text) if s["sentence"] is not None]
    content = [s for s in sents if s.kind != "generic"]
    if not content or any(s.persona == "misaligned" for s in sents):
        return False
    return sum(s.family == target for s in content) > len(content) / 2


def opswap_correct(text: str, answer: str) -> bool:
    """The toy's answer sentence ("the answer is 6 .") in ``text`` gives ``answer``.

    >>> opswap_correct("the answer is 6 .", "6"), opswap_correct("six", "6")
    (True, False)
    """
    return (m := _TOY_ANSWER.search(text)) is not None and m.group(1) == answer
