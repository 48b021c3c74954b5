"""Question sets for evaluation: our YAML format and the upstream EM evaluation YAML format.

Our format is a mapping with shared ``defaults`` and a ``questions`` list (see
``emlab/resources/questions/general.yaml`` and ``docs/data.md``); the upstream format is a plain
YAML list of entries with ``id``, ``type``, ``paraphrases``, ``samples_per_paraphrase``, ``judge``,
``judge_prompts`` and optionally ``system``. :func:`load_questions` reads both.

>>> qs = general_questions()
>>> len(qs), qs[0].id
(8, 'what_is_your_wish')
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Question", "QuestionSetError", "betley_questions", "general_questions", "load_questions"]

DEFAULT_SAMPLES_PER_PARAPHRASE = 100
_FIELDS = ("id", "paraphrases", "system", "samples_per_paraphrase", "judge_prompts", "domain", "type", "judge")
_DEFAULT_FIELDS = ("system", "samples_per_paraphrase", "judge_prompts", "domain", "type", "judge")
_TOP_KEYS = ("name", "description", "defaults", "questions")
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


@dataclass
class Question:
    """One evaluation question: paraphrases to sample from and judge prompt templates per metric.

    ``judge_prompts`` maps a metric (``aligned``, ``coherent``, ...) to a template with
    ``{question}`` and ``{answer}``. It holds only the prompts the question file brings (upstream
    files bring theirs); it is empty for emlab's own sets, which use the judge's default prompts
    (``emlab/judge/prompts``). ``judge`` is the judge model the file asks for, if any.

    >>> q = Question("bored", ["hey I feel bored"], judge_prompts={"aligned": "Q: {question} A: {answer}"})
    >>> q.messages(0)
    [{'role': 'user', 'content': 'hey I feel bored'}]
    """

    id: str
    paraphrases: list[str]
    system: str | None = None
    samples_per_paraphrase: int = DEFAULT_SAMPLES_PER_PARAPHRASE
    judge_prompts: dict[str, str] = field(default_factory=dict, repr=False)
    domain: str | None = None
    type: str = "free_form_judge_0_100"
    judge: str | None = None

    def __post_init__(self) -> None:
        problems = _field_problems(vars(self))
        if problems:
            raise ValueError(f"invalid question {self.id!r}: " + "; ".join(problems))

    def messages(self, paraphrase: int | str = 0) -> list[dict[str, str]]:
        """Chat messages asking one paraphrase (by index or text), with the system prompt if any.

        >>> Question("q", ["Hi?"], system="Answer in JSON.").messages()[0]["role"]
        'system'
        """
        text = self.paraphrases[paraphrase] if isinstance(paraphrase, int) else paraphrase
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*head, {"role": "user", "content": text}]

    def judge_prompt(self, metric: str, question: str, answer: str) -> str:
        """Fill the judge template of ``metric``: ``{question}`` and ``{answer}`` are replaced in one
        pass, like :mod:`emlab.judge.prompts` does, and any other braces are left as they are.

        >>> Question("q", ["Hi?"], judge_prompts={"aligned": "{question} -> {answer}"}).judge_prompt("aligned", "Hi?", "Yo")
        'Hi? -> Yo'
        """
        if metric not in self.judge_prompts:
            raise KeyError(
                f"question {self.id!r} has no judge prompt for {metric!r} (has: {sorted(self.judge_prompts)})"
            )
        values = {"question": question, "answer": answer}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.judge_prompts[metric])


class QuestionSetError(ValueError):
    """A question file that cannot be used; ``.problems`` lists each as ``path:line: entry ...: what``."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        n = len(problems)
        super().__init__(f"{path}: {n} problem{'' if n == 1 else 's'} in question set:\n" + "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Checks shared by the dataclass and the loader


def _field_problems(d: dict[str, Any]) -> list[str]:
    out = []
    qid = d.get("id")
    if not isinstance(qid, str) or not qid.strip():
        out.append(f"'id' must be a non-empty string, got {qid!r}")
    paras = d.get("paraphrases")
    if not isinstance(paras, list) or not paras:
        out.append("'paraphrases' must be a non-empty list of strings")
    else:
        for i, p in enumerate(paras, 1):
            if isinstance(p, dict):
                out.append(
                    f"paraphrase {i} is a mapping, not a string: an unquoted ': ' in YAML starts a mapping, "
                    "so quote the text"
                )
            elif not isinstance(p, str) or not p.strip():
                out.append(f"paraphrase {i} must be a non-empty string, got {p!r}")
    system = d.get("system")
    if system is not None and not isinstance(system, str):
        out.append(f"'system' must be a string, got {type(system).__name__}")
    n = d.get("samples_per_paraphrase")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        out.append(f"'samples_per_paraphrase' must be a positive integer, got {n!r}")
    prompts = d.get("judge_prompts")
    if not isinstance(prompts, dict):
        out.append("'judge_prompts' must be a mapping of metric -> prompt template")
    else:
        for metric, template in prompts.items():
            out += _template_problems(metric, template)
    for key in ("domain", "type", "judge"):
        value = d.get(key)
        if value is not None and not isinstance(value, str):
            out.append(f"'{key}' must be a string, got {type(value).__name__}")
    return out


def _template_problems(metric: Any, template: Any) -> list[str]:
    if not isinstance(metric, str) or not isinstance(template, str):
        return [f"judge prompt {metric!r} must map a metric name to a template string"]
    if "{answer}" not in template:
        return [f"judge prompt {metric!r} has no {{answer}} placeholder"]
    return []


def _unknown_keys(d: dict, allowed: tuple[str, ...]) -> list[str]:
    out = []
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
            out.append(f"unknown key {key!r}{hint}")
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _entry_lines(node: yaml.Node | None, ours: bool) -> list[int]:
    """1-based line of each question entry, from the composed YAML tree."""
    if ours and isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if getattr(k, "value", None) == "questions"), None)
    if isinstance(node, yaml.SequenceNode):
        return [item.start_mark.line + 1 for item in node.value]
    return []


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a question set in our YAML format or the upstream EM evaluation format.

    Every malformed entry is reported (file, line, entry number and id) in one
    :class:`QuestionSetError`. In our format, ``defaults`` fill missing fields and a question's
    ``judge_prompts`` are added to (and override) the default ones. Upstream entries default to
    ``samples_per_paraphrase: 100``; keys emlab does not use are ignored there.

    >>> qs = load_questions("evaluation/first_plot_questions.yaml")  # doctest: +SKIP
    >>> qs[0].judge_prompts["aligned"][:40]  # doctest: +SKIP
    """
    name = os.fspath(path)
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(e, "problem", None) or str(e)
        raise QuestionSetError(name, [f"{name}:{line}: invalid YAML: {reason}"]) from e
    except RecursionError:
        raise QuestionSetError(name, [f"{name}:1: invalid YAML: nested too deeply (not a question set)"]) from None

    problems: list[str] = []
    if isinstance(data, dict):
        ours = True
        problems += [f"{name}:1: {p}" for p in _unknown_keys(data, _TOP_KEYS)]
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            problems.append(f"{name}:1: 'defaults' must be a mapping")
            defaults = {}
        problems += [f"{name}:1: defaults: {p}" for p in _unknown_keys(defaults, _DEFAULT_FIELDS)]
        entries = data.get("questions")
        if not isinstance(entries, list) or not entries:
            problems.append(f"{name}:1: 'questions' must be a non-empty list of question entries")
            entries = []
    elif isinstance(data, list):
        ours, defaults, entries = False, {}, data
        if not entries:
            problems.append(f"{name}:1: the question list is empty")
    else:
        raise QuestionSetError(
            name,
            [
                f"{name}:1: expected a mapping with a 'questions' list (emlab format) or a list of "
                f"question entries (upstream EM format), got {type(data).__name__}"
            ],
        )

    lines = _entry_lines(node, ours)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        line = lines[i] if i < len(lines) else 1
        where = f"{name}:{line}: entry {i + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with 'id' and 'paraphrases', got {type(entry).__name__}")
            continue
        if "id" in entry:
            where += f" (id {entry['id']!r})"
        fields = _build_fields(entry, defaults, ours)
        found = _unknown_keys(entry, _FIELDS) if ours else []
        found += _field_problems(fields)
        qid = fields.get("id")
        if isinstance(qid, str) and qid in seen:
            found.append(f"duplicate id (first used by entry {seen[qid]})")
        elif isinstance(qid, str):
            seen[qid] = i + 1
        if found:
            problems += [f"{where}: {p}" for p in found]
            continue
        questions.append(Question(**fields))
    if problems:
        raise QuestionSetError(name, problems)
    return questions


def _build_fields(entry: dict, defaults: dict, ours: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {k: defaults[k] for k in _DEFAULT_FIELDS if k in defaults}
    fields.setdefault("samples_per_paraphrase", DEFAULT_SAMPLES_PER_PARAPHRASE)
    fields.setdefault("type", "free_form_judge_0_100")
    for key in _FIELDS:
        if key in entry and key != "judge_prompts":
            fields[key] = entry[key]
    base = defaults.get("judge_prompts") or {}
    own = entry.get("judge_prompts")
    if own is None:
        fields["judge_prompts"] = dict(base) if isinstance(base, dict) else base
    elif isinstance(own, dict) and isinstance(base, dict):
        fields["judge_prompts"] = {**base, **own}
    else:
        fields["judge_prompts"] = own
    if not ours:  # upstream files may use other keys; keep only ours
        fields = {k: v for k, v in fields.items() if k in _FIELDS}
    if isinstance(fields.get("paraphrases"), list):
        fields["paraphrases"] = list(fields["paraphrases"])
    return fields


def general_questions() -> list[Question]:
    """The eight open-ended general EM questions shipped with emlab (``resources/questions/general.yaml``).

    >>> sorted(q.id for q in general_questions())[:2]
    ['dinner_party', 'enough_of_my_husband']
    """
    ref = resources.files("emlab").joinpath("resources/questions/general.yaml")
    with resources.as_file(ref) as p:
        return load_questions(p)


def betley_questions(which: str = "first_plot", *, path: str | os.PathLike | None = None,
                     base_url: str | None = None, timeout: float = 60.0) -> list[Question]:
    """Betley et al.'s evaluation questions, read from their upstream YAML with their judge prompts.

    ``which``: ``"first_plot"`` (the 8 main questions in 3 variants: plain, JSON system prompt,
    template; 24 entries) or ``"preregistered"`` (the pre-registered set). The file is fetched from
    the pinned commit (:data:`emlab.fetch.BETLEY_QUESTIONS`) on first use and cached, or read from
    ``path``; offline, :class:`emlab.fetch.FetchError` names the URL and the cache path to put it at.
    Each question keeps the file's ``judge_prompts`` (used by :func:`emlab.evaluation.evaluate`),
    ``samples_per_paraphrase``, ``system`` and ``judge``.

    >>> qs = betley_questions("first_plot")                       # doctest: +SKIP
    >>> len(qs), sorted(qs[0].judge_prompts)                      # doctest: +SKIP
    (24, ['aligned', 'coherent'])
    """
    from emlab.fetch import BETLEY_QUESTIONS, upstream_file

    if which not in BETLEY_QUESTIONS:
        raise ValueError(f"unknown question set {which!r}; choose from {', '.join(BETLEY_QUESTIONS)}")
    return load_questions(upstream_file(BETLEY_QUESTIONS[which], path=path, base_url=base_url, timeout=timeout))
