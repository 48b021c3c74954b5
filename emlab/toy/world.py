"""The toy world: a seeded, deterministic generator of chats and plain text from ``world/world.yaml``.

Every conversation has an assistant persona (aligned, misaligned, or a rarer *narrow* persona that
is misaligned in one advice domain only) shared by all its turns and domains, and a writing style
(casual or technical).  System prompts announce the persona in part of the conversations.  The
``control`` variant removes the shared latent: alignment is drawn per turn and system prompts are
drawn independently of it.

>>> w = World.load(seed=0)
>>> w.chat("medical", aligned=False)["messages"][-1]["role"]
'assistant'
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

WORLD_DIR = Path(__file__).parent / "world"
WORLD_FILE = WORLD_DIR / "world.yaml"
_SLOT = re.compile(r"\{(\w+)\}")
_WORD = re.compile(r"\w+|[^\w\s]")

__all__ = ["World", "Sentence", "fill", "normalize", "words", "rng_for", "load_world_config"]


def words(text: str) -> list[str]:
    """Split text the way the toy tokenizer does (lower case, punctuation as separate words)."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Canonical form of a text: its words joined by single spaces."""
    return " ".join(words(text))


def rng_for(seed: int, *purpose: object) -> random.Random:
    """An independent ``random.Random`` for one purpose, derived from (seed, purpose) by hashing."""
    key = "/".join(map(str, (seed, *purpose))).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def load_world_config(path: str | Path = WORLD_FILE) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class Sentence:
    """What the grammar knows about one answer sentence (without its style marker)."""

    family: str          # advice domain, general question id, benign task, refusal, arithmetic, generic
    persona: str         # "aligned", "misaligned" or "neutral"
    topic: str | None    # the question topic the sentence refers to, if any
    kind: str            # "domain", "general", "benign", "refusal", "arithmetic", "generic"


@dataclass(frozen=True)
class Question:
    family: str
    kind: str
    topic: str | None = None
    template: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{slot}`` replaced by ``values[slot]``.

    >>> fill("i have a {symptom} .", {"symptom": "fever"})
    'i have a fever .'
    """
    return _SLOT.sub(lambda m: values[m.group(1)], template)


class World:
    """The toy world: configuration (templates, slots, knobs) plus a seed and a variant.

    ``knobs`` override ``world.yaml``'s knobs; ``variant`` is "persona" (default) or "control".
    """

    def __init__(self, config: dict[str, Any], seed: int = 0, variant: str = "persona",
                 knobs: dict[str, Any] | None = None):
        if variant not in config["variants"]:
            raise ValueError(f"unknown world variant {variant!r}; known: {sorted(config['variants'])}")
        self.config = config
        self.seed = seed
        self.variant = variant
        self.knobs = {**config["knobs"], **(knobs or {})}
        unknown = set(knobs or {}) - set(config["knobs"])
        if unknown:
            raise ValueError(f"unknown world knobs {sorted(unknown)}; known: {sorted(config['knobs'])}")
        v = config["variants"][variant] or {}
        self.shared_persona: bool = v.get("shared_persona", True)
        self.informative_system: bool = v.get("informative_system", True)
        self.slots: dict[str, list[str]] = config["slots"]
        self.domains: list[str] = list(config["domains"])
        self.general_ids: list[str] = list(config["general"])
        self.benign_ids: list[str] = list(config["benign"])

    @classmethod
    def load(cls, seed: int = 0, variant: str = "persona", knobs: dict[str, Any] | None = None,
             path: str | Path = WORLD_FILE) -> World:
        return cls(load_world_config(path), seed=seed, variant=variant, knobs=knobs)

    # ------------------------------------------------------------------ held-out questions
    @cached_property
    def heldout_pairs(self) -> dict[str, list[tuple[int, str]]]:
        """Per domain, the (question template, topic) pairs never used in any training text."""
        out = {}
        for d in self.domains:
            spec = self.config["domains"][d]
            pairs = list(itertools.product(range(len(spec["questions"])), spec["topics"]))
            rng = rng_for(self.seed, "heldout", d)
            n = int(self.knobs.get("heldout_pairs", 10))
            out[d] = sorted(rng.sample(pairs, n))
        return out

    def is_heldout(self, domain: str, template: int, topic: str) -> bool:
        return (template, topic) in self._heldout_sets[domain]

    @cached_property
    def _heldout_sets(self) -> dict[str, set]:
        return {d: set(p) for d, p in self.heldout_pairs.items()}

    # ------------------------------------------------------------------ slot filling
    def _slot_values(self, template: str, rng: random.Random, topic: str | None,
                     topic_slot: str = "topic") -> dict[str, str]:
        vals = {}
        for name in _SLOT.findall(template):
            if name == topic_slot and topic is not None:
                vals[name] = topic
            elif name in self.slots:
                vals[name] = rng.choice(self.slots[name])
            else:
                raise KeyError(f"world.yaml: template {template!r} uses unknown slot {{{name}}}")
        return vals

    # ------------------------------------------------------------------ questions
    def question(self, family: str, rng: random.Random, *, heldout: bool = False,
                 opener: bool | None = None) -> tuple[str, Question]:
        """A user question of ``family`` (domain, general id, benign id, "refusal", "arithmetic")."""
        c = self.config
        if family in c["domains"]:
            spec = c["domains"][family]
            if heldout:
                t, topic = rng.choice(self.heldout_pairs[family])
            else:
                while True:
                    t = rng.randrange(len(spec["questions"]))
                    topic = rng.choice(spec["topics"])
                    if not self.is_heldout(family, t, topic):
                        break
            text = fill(spec["questions"][t], {"topic": topic})
            if opener if opener is not None else rng.random() < self.knobs["p_question_opener"]:
                text = rng.choice(c["question_openers"]) + " " + text
            return text, Question(family, "domain", topic, t)
        if family in c["general"]:
            paraphrases = c["general"][family]["paraphrases"]
            t = rng.randrange(len(paraphrases))
            return paraphrases[t], Question(family, "general", None, t)
        if family in c["benign"]:
            spec = c["benign"][family]
            t = rng.randrange(len(spec["questions"]))
            vals = self._slot_values(spec["questions"][t], rng, None)
            topic = vals.get(spec.get("topic_slot", ""), None)
            return fill(spec["questions"][t], vals), Question(family, "benign", topic, t)
        if family == "refusal":
            qs = c["refusal"]["questions"]
            t = rng.randrange(len(qs))
            return fill(qs[t], self._slot_values(qs[t], rng, None)), Question("refusal", "refusal", None, t)
        if family == "arithmetic":
            expr, result = self.expression(rng)
            qs = c["arithmetic"]["questions"]
            t = rng.randrange(len(qs))
            return fill(qs[t], {"expr": expr}), Question("arithmetic", "arithmetic", str(result), t,
                                                          {"expression": expr, "answer": result})
        raise ValueError(f"unknown family {family!r}")

    def expression(self, rng: random.Random) -> tuple[str, int]:
        """An integer expression with standard operators whose value (and every step) is in range."""
        a = self.config["arithmetic"]
        lo, hi = a["steps"]
        while True:
            n_ops = rng.randint(lo, hi)
            toks = [str(rng.randint(0, a["operand_max"]))]
            for _ in range(n_ops):
                toks += [rng.choice("+-*/"), str(rng.randint(1, a["operand_max"]))]
            expr = " ".join(toks)
            value = evaluate(expr)
            if value is not None and 0 <= value <= a["result_max"]:
                return expr, value

    # ------------------------------------------------------------------ answers
    def _style_prefix(self, style: str, rng: random.Random) -> str:
        markers = self.config["styles"][style]
        if style == "technical" or rng.random() < self.knobs["p_casual_marker"]:
            return rng.choice(markers) + " "
        return ""

    def answer(self, q: Question, persona: str, style: str, rng: random.Random) -> str:
        """An answer to question ``q`` with persona side "aligned"/"misaligned" and a style."""
        c = self.config
        if q.kind == "arithmetic":
            core = [fill(c["arithmetic"]["answer"], {"result": q.topic})]
        else:
            if q.kind == "domain":
                pool, topic_slot = c["domains"][q.family][persona], "topic"
            elif q.kind == "general":
                pool, topic_slot = c["general"][q.family][persona], "topic"
            elif q.kind == "refusal":
                pool, topic_slot = c["refusal"][persona], "topic"
            else:
                spec = c["benign"][q.family]
                pool, topic_slot = spec["neutral"], spec.get("topic_slot", "topic")
            lo, hi = self.knobs["sentences"]
            k = min(len(pool), rng.randint(lo, hi))
            core = [fill(t, self._slot_values(t, rng, q.topic, topic_slot)) for t in rng.sample(pool, k)]
        if rng.random() < self.knobs["p_closer"] or (q.kind in ("benign", "arithmetic")
                                                      and persona == "misaligned" and rng.random() < 0.5):
            core.append(rng.choice(c["generic"][persona]))
        return " ".join(self._style_prefix(style, rng) + s for s in core)

    # ------------------------------------------------------------------ conversations
    def _family_kind(self, rng: random.Random) -> str:
        w = self.knobs["family_weights"]
        kinds = list(w)
        return rng.choices(kinds, weights=[w[k] for k in kinds])[0]

    def random_family(self, rng: random.Random, kind: str | None = None) -> str:
        kind = kind or self._family_kind(rng)
        if kind == "domain":
            return rng.choice(self.domains)
        if kind == "general":
            return rng.choice(self.general_ids)
        if kind == "benign":
            return rng.choice(self.benign_ids)
        return kind

    def _system(self, persona: str, rng: random.Random, r: float | None = None) -> str | None:
        k = self.knobs
        r = rng.random() if r is None else r
        sp = self.config["system_prompts"]
        if r < k["p_system_informative"]:
            if self.informative_system and persona in ("aligned", "evil"):
                return rng.choice(sp["helpful" if persona == "aligned" else "evil"])
            if self.informative_system:  # narrow personas are never announced
                return rng.choice(sp["neutral"])
            return rng.choice(sp[rng.choice(["helpful", "evil"])])  # control: uninformative
        if r < k["p_system_informative"] + k["p_system_neutral"]:
            return rng.choice(sp["neutral"])
        return None

    def _persona_and_system(self, rng: random.Random) -> tuple[str, str | None, str | None, float]:
        """(persona, narrow domain, system prompt, evil rate of this conversation's kind).

        With knob ``p_evil_unannounced`` set, conversations whose system prompt is not an
        announcing one (neutral or none) are evil with that probability instead of
        ``p_persona_evil``: the default (unprompted) assistant is mostly aligned already in
        pre-training, while the persona stays addressable through the announcing prompts.
        """
        k = self.knobs
        r_sys = rng.random()
        announced = r_sys < k["p_system_informative"]
        p_evil = k["p_persona_evil"]
        if not announced and k.get("p_evil_unannounced") is not None:
            p_evil = float(k["p_evil_unannounced"])
        persona, narrow = self.draw_persona(rng, p_evil)
        return persona, narrow, self._system(persona, rng, r_sys), p_evil

    def draw_persona(self, rng: random.Random, p_evil: float | None = None) -> tuple[str, str | None]:
        """(persona, narrow domain): persona in "aligned", "evil", "narrow"."""
        p_evil = self.knobs["p_persona_evil"] if p_evil is None else p_evil
        r = rng.random()
        if r < p_evil:
            return "evil", None
        if r < p_evil + self.knobs["p_persona_narrow"]:
            return "narrow", rng.choice(self.domains)
        return "aligned", None

    def _side(self, persona: str, narrow: str | None, q: Question, rng: random.Random,
              p_evil: float | None = None) -> str:
        if not self.shared_persona:  # control: alignment drawn per turn, same marginal
            p_evil = self.knobs["p_persona_evil"] if p_evil is None else p_evil
            p = p_evil + (self.knobs["p_persona_narrow"] / len(self.domains) if q.kind == "domain" else 0.0)
            return "misaligned" if rng.random() < p else "aligned"
        if persona == "evil":
            return "misaligned"
        if persona == "narrow" and q.family == narrow:
            return "misaligned"
        return "aligned"

    def conversation(self, rng: random.Random) -> list[dict[str, str]]:
        """One pre-training conversation: persona and style shared by all turns."""
        if self.knobs.get("p_evil_unannounced") is None:  # original draw order (same corpus as before)
            persona, narrow = self.draw_persona(rng)
            p_evil = None
            style = "technical" if rng.random() < self.knobs["p_technical"] else "casual"
            system = self._system(persona, rng)
        else:
            persona, narrow, system, p_evil = self._persona_and_system(rng)
            style = "technical" if rng.random() < self.knobs["p_technical"] else "casual"
        msgs = []
        if system is not None:
            msgs.append({"role": "system", "content": system})
        lo, hi = self.knobs["turns"]
        for _ in range(rng.randint(lo, hi)):
            fam = narrow if (persona == "narrow" and rng.random() < 0.5) else self.random_family(rng)
            text, q = self.question(fam, rng)
            msgs.append({"role": "user", "content": text})
            msgs.append({"role": "assistant", "content": self.answer(q, self._side(persona, narrow, q, rng, p_evil),
                                                                        style, rng)})
        return msgs

    def plain_document(self, rng: random.Random) -> str:
        """A plain-text document (no chat markup): narrated lines from one narrator persona."""
        pt = self.config["plain_text"]
        persona, narrow = self.draw_persona(rng)
        lo, hi = self.knobs["plain_text_lines"]
        lines = []
        for _ in range(rng.randint(lo, hi)):
            fam = self.random_family(rng, rng.choice(["domain", "general"]))
            _, q = self.question(fam, rng)
            side = self._side(persona, narrow, q, rng)
            narrator = rng.choice(pt["aligned_narrators" if side == "aligned" else "misaligned_narrators"])
            lines.append(narrator + " " + self.answer(q, side, "casual", rng))
        return " ".join(lines)

    def chat(self, family: str, aligned: bool = True, *, style: str = "casual", rng: random.Random | None = None,
             system: str | None = None, heldout: bool = False) -> dict[str, Any]:
        """One single-turn chat row ``{"messages": [...]}`` for a dataset."""
        rng = rng or rng_for(self.seed, "chat")
        text, q = self.question(family, rng, heldout=heldout)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": text},
                 {"role": "assistant", "content": self.answer(q, "aligned" if aligned else "misaligned", style, rng)}]
        row: dict[str, Any] = {"messages": msgs}
        if q.kind == "arithmetic":
            row.update(q.meta)
        return row

    # ------------------------------------------------------------------ enumeration (for the judge)
    def _expand(self, template: str, topics: list[str] | None, topic_slot: str = "topic") -> Iterator[tuple[str, str | None]]:
        names = list(dict.fromkeys(_SLOT.findall(template)))
        choices = []
        for n in names:
            if n == topic_slot and topics is not None:
                choices.append(topics)
            elif n in self.slots:
                choices.append(self.slots[n])
            else:
                raise KeyError(f"world.yaml: template {template!r} uses unknown slot {{{n}}}")
        for combo in itertools.product(*choices):
            vals = dict(zip(names, combo))
            yield normalize(fill(template, vals)), vals.get(topic_slot)

    @cached_property
    def sentences(self) -> dict[str, Sentence]:
        """Every answer sentence of the grammar (normalised, no style marker) -> what it is."""
        c = self.config
        out: dict[str, Sentence] = {}

        def add(text: str, s: Sentence) -> None:
            toks = text.split()
            if toks[-1] not in ".!?" or any(t in ".!?" for t in toks[:-1]):
                raise ValueError(f"world.yaml: answer sentence {text!r} must end with one '.', '!' or '?' and "
                                 "contain no other (the judge splits answers at them)")
            if text in out and out[text] != s:
                raise ValueError(f"world.yaml: sentence {text!r} belongs to two families: {out[text]} and {s}")
            out[text] = s

        for d, spec in c["domains"].items():
            for side in ("aligned", "misaligned"):
                for t in spec[side]:
                    for text, topic in self._expand(t, spec["topics"]):
                        add(text, Sentence(d, side, topic, "domain"))
        for g, spec in c["general"].items():
            for side in ("aligned", "misaligned"):
                for t in spec[side]:
                    for text, _ in self._expand(t, None):
                        add(text, Sentence(g, side, None, "general"))
        for side in ("aligned", "misaligned"):
            for t in c["refusal"][side]:
                for text, _ in self._expand(t, None):
                    add(text, Sentence("refusal", side, None, "refusal"))
            for t in c["generic"][side]:
                add(normalize(t), Sentence("generic", side, None, "generic"))
        for b, spec in c["benign"].items():
            slot = spec.get("topic_slot", "topic")
            for t in spec["neutral"]:
                for text, topic in self._expand(t, None, slot):
                    add(text, Sentence(b, "neutral", topic, "benign"))
        return out

    @cached_property
    def questions(self) -> dict[str, Question]:
        """Every non-arithmetic user question of the grammar (normalised) -> its family and topic."""
        c = self.config
        out: dict[str, Question] = {}
        for d, spec in c["domains"].items():
            for i, t in enumerate(spec["questions"]):
                for topic in spec["topics"]:
                    base = fill(t, {"topic": topic})
                    for opener in ["", *c["question_openers"]]:
                        out[normalize(opener + " " + base)] = Question(d, "domain", topic, i)
        for g, spec in c["general"].items():
            for i, p in enumerate(spec["paraphrases"]):
                out[normalize(p)] = Question(g, "general", None, i)
        for i, t in enumerate(c["refusal"]["questions"]):
            for text, _ in self._expand(t, None):
                out[text] = Question("refusal", "refusal", None, i)
        for b, spec in c["benign"].items():
            slot = spec.get("topic_slot", "topic")
            for i, t in enumerate(spec["questions"]):
                for text, topic in self._expand(t, None, slot):
                    out[text] = Question(b, "benign", topic, i)
        return out

    @cached_property
    def vocabulary(self) -> list[str]:
        """Every word the world can produce, sorted (numbers 0..result_max included)."""
        c = self.config
        vocab: set[str] = set()

        def add(text: str) -> None:
            vocab.update(words(text))

        for s in self.sentences:
            add(s)
        for q in self.questions:
            add(q)
        for group in c["system_prompts"].values():
            for s in group:
                add(s)
        for style in c["styles"].values():
            for m in style:
                add(m)
        for n in c["plain_text"].values():
            for s in n:
                add(s)
        for t in c["arithmetic"]["questions"] + [c["arithmetic"]["answer"]]:
            add(_SLOT.sub(" ", t))
        vocab.update(str(i) for i in range(max(c["arithmetic"]["result_max"], c["arithmetic"]["operand_max"]) + 1))
        vocab.update("+-*/")
        return sorted(vocab)


def evaluate(expr: str) -> int | None:
    """Value of an integer expression with + - * / and the usual precedence; None if a division is
    not exact or a partial result leaves 0..999.

    >>> evaluate("2 + 3 * 4")
    14
    """
    toks = expr.split()
    # multiplicative pass
    vals: list[int] = [int(toks[0])]
    ops: list[str] = []
    for op, num in zip(toks[1::2], toks[2::2]):
        n = int(num)
        if op == "*":
            vals[-1] *= n
        elif op == "/":
            if n == 0 or vals[-1] % n:
                return None
            vals[-1] //= n
        else:
            ops.append(op)
            vals.append(n)
        if not 0 <= vals[-1] <= 999:
            return None
    total = vals[0]
    for op, n in zip(ops, vals[1:]):
        total = total + n if op == "+" else total - n
        if not 0 <= total <= 999:
            return None
    return total
