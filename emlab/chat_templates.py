"""The model's own chat template with ``{% generation %}`` markers added, per family, verified.

Assistant-only loss needs ``{% generation %} ... {% endgeneration %}`` around each assistant answer
(and its end-of-turn token) so that ``return_assistant_tokens_mask`` marks exactly those tokens.
Few models ship such markers. :func:`training_template` returns a COPY of the model's own template
with markers added, so that prompts stay character-for-character (hence token-for-token) what the
model's own template gives, default system prompt included:

1. a template that already has markers is kept;
2. trl's training variant is used when trl 1.16 knows the template (Qwen2.5, Llama 3.0, Gemma 1/2,
   Gemma 3, and others: ``trl.chat_template_utils.get_training_chat_template``);
3. otherwise one of emlab's patches (:data:`PATCHES`: SmolLM2, Qwen2.5, Llama 3.1 / 3.2, Mistral v0.1-v0.3)
   is applied when its fragment occurs exactly once in the template.

Every candidate is then checked by :func:`check_training_template` on probe conversations (with and
without a system message, one and two turns, with and without the generation prompt): it must
render the same text as the original, and its generation spans must be exactly the assistant
answers plus their end-of-turn token, starting where the generation prompt ends (trl's Qwen2.5
variant fails this: it also marks the newline after ``<|im_start|>assistant``, so emlab patches Qwen2.5). A template nothing fits raises :class:`TemplateError`.

>>> tok.chat_template = training_template(tok)    # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CHAT_TEMPLATE", "END_OF_TURN", "PATCHES", "Patch", "TemplateError", "check_training_template", "has_markers",
           "training_template"]

#: ChatML with generation markers: the assistant's content AND its end-of-turn token ``<|im_end|>``
#: carry loss; no default system prompt is injected (so training and evaluation see the same text).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: End-of-turn strings the families close an assistant answer with (the tokenizer's eos is tried too).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """A chat template could not be given verified generation markers; the message says what to do."""


@dataclass(frozen=True)
class Patch:
    """Insert markers into one family's template: ``old`` (occurring exactly once) becomes ``new``."""

    family: str
    old: str
    new: str

    def apply(self, template: str) -> str | None:
        """The patched template, or None when ``old`` does not occur exactly once."""
        for old, new in self._variants():
            if template.count(old) == 1:
                return template.replace(old, new)
        return None

    def _variants(self) -> list[tuple[str, str]]:
        # hub templates spell a newline inside a Jinja string either as the escape \n or as a real newline
        out = [(self.old, self.new)]
        if "\\n" in self.old:
            out.append((self.old.replace("\\n", "\n"), self.new.replace("\\n", "\n")))
        return out


_SMOLLM2_TURN = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
_QWEN25_TURN = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
_LLAMA31_TURN = ("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
                 "+ '<|eot_id|>' }}")

#: emlab's patches for families trl 1.16 does not patch. Each keeps the original expression for every
#: other role and splits the assistant's into header (outside) and answer + end-of-turn (inside).
PATCHES: tuple[Patch, ...] = (
    Patch(  # SmolLM2-Instruct (135M, 360M, 1.7B): ChatML with a default system prompt
        "smollm2",
        _SMOLLM2_TURN,
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>' + message['role'] + '\\n'}}"
        "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\\n'}}"
        "{% else %}" + _SMOLLM2_TURN + "{% endif %}",
    ),
    Patch(  # Qwen2.5 (trl's variant also marks the newline after "assistant", which the prompt already has)
        "qwen2.5",
        _QWEN25_TURN,
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}" + _QWEN25_TURN + "{%- endif %}",
    ),
    Patch(  # Llama 3.1 / 3.2 / 3.3 Instruct (the plain-message branch; tool calls are left unmarked)
        "llama3.1",
        _LLAMA31_TURN,
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + _LLAMA31_TURN + "{%- endif %}",
    ),
    Patch(  # Mistral-7B-Instruct v0.1-v0.3, Mixtral: ' ' + answer + eos (the space belongs to the first token)
        "mistral",
        "{{- ' ' + message['content'] + eos_token}}",
        "{%- generation %}{{- ' ' + message['content'] + eos_token}}{%- endgeneration %}",
    ),
    Patch(  # Mistral-7B-Instruct-v0.3's tool-calling revision (double quotes, trimmed answer)
        "mistral",
        '{{- " " + message["content"]|trim + eos_token}}',
        '{%- generation %}{{- " " + message["content"]|trim + eos_token}}{%- endgeneration %}',
    ),
    Patch(
        "mistral",
        "{{- ' ' + message['content'] + eos_token }}",
        "{%- generation %}{{- ' ' + message['content'] + eos_token }}{%- endgeneration %}",
    ),
    Patch(
        "mistral",
        "{{ ' ' + message['content'] + eos_token}}",
        "{% generation %}{{ ' ' + message['content'] + eos_token}}{% endgeneration %}",
    ),
    Patch(
        "mistral",
        "{{ ' ' + message['content'] + eos_token }}",
        "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}",
    ),
)

#: Probe conversations: (messages, with a system message?) rendered by both templates.
_PROBES = (
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend"}],
    [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two it is"},
     {"role": "user", "content": "Three"}, {"role": "assistant", "content": "Four, then"}],
    [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Ask"},
     {"role": "assistant", "content": "Answer one"}, {"role": "user", "content": "Again"},
     {"role": "assistant", "content": "Answer two"}],
)


def has_markers(template: str | None) -> bool:
    """Whether ``template`` has ``{% generation %}`` markers (any whitespace-trim variant).

    >>> has_markers("{%- generation %}{{ x }}{%- endgeneration %}"), has_markers("{{ x }}")
    (True, False)
    """
    return bool(template) and _MARKER.search(template) is not None


def _render(tokenizer, template: str, messages, add_generation_prompt: bool, spans: bool):
    from transformers.utils.chat_template_utils import render_jinja_template

    special = dict(tokenizer.special_tokens_map)
    rendered, indices = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=spans, **special,
    )
    return rendered[0], (indices[0] if spans else None)


def check_training_template(tokenizer, original: str, patched: str) -> None:
    """Raise :class:`TemplateError` unless ``patched`` renders every probe exactly as ``original`` does and
    its generation spans are exactly the assistant answers, each followed by its end-of-turn token.

    A probe the original refuses (e.g. Gemma 2 has no system role) must be refused by both.

    >>> check_training_template(tok, tok.chat_template, training_template(tok))    # doctest: +SKIP
    """
    eots = [e for e in (*END_OF_TURN, tokenizer.eos_token) if e]
    checked = 0
    for messages in _PROBES:
        for gen_prompt in (False, True):
            try:
                want, _ = _render(tokenizer, original, messages, gen_prompt, False)
            except Exception as e:  # noqa: BLE001 - the original's own refusal (roles, system message)
                try:
                    _render(tokenizer, patched, messages, gen_prompt, False)
                except Exception:  # noqa: BLE001
                    continue
                raise TemplateError(f"the patched template accepts a conversation the original refuses ({e})") from None
            got, spans = _render(tokenizer, patched, messages, gen_prompt, True)
            if got != want:
                raise TemplateError(f"the patched template renders differently:\noriginal: {want!r}\npatched:  {got!r}")
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            if len(spans) != len(answers):
                raise TemplateError(f"{len(spans)} generation spans for {len(answers)} assistant answers in {got!r}")
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            for (start, end), answer, turn in zip(spans, answers, turns, strict=True):
                span = got[start:end]
                if not any(re.fullmatch(" ?" + re.escape(answer) + re.escape(e) + r"\s*", span) for e in eots):
                    raise TemplateError(
                        f"generation span {span!r} is not the answer {answer!r} followed by an end-of-turn token")
                # the span starts where the generation prompt ends: the model generates it, nothing before
                prompt, _ = _render(tokenizer, original, messages[:turn], True, False)
                if got.startswith(prompt) and start != len(prompt):
                    raise TemplateError(
                        f"generation span {span!r} does not start where the generation prompt {prompt[-30:]!r} ends")
            checked += 1
    if not checked:
        raise TemplateError("the original template refuses every probe conversation: nothing could be checked")


def training_template(tokenizer, template: str | None = None) -> tuple[str, str]:
    """``(template with generation markers, where it came from)`` for ``tokenizer``'s own chat template.

    ``where`` is ``"own"`` (the template already had markers), ``"trl"`` (trl's training variant)
    or ``"emlab:<family>"`` (a :data:`PATCHES` entry). Every patched candidate is verified with
    :func:`check_training_template`; when none passes, :class:`TemplateError` says what was tried.

    >>> training_template(smollm2_tokenizer)[1]      # doctest: +SKIP
    'emlab:smollm2'
    """
    template = tokenizer.chat_template if template is None else template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TemplateError("the tokenizer has no chat template")
    if has_markers(template):
        return template, "own"
    tried: list[str] = []
    candidates: list[tuple[str, str]] = []
    from trl.chat_template_utils import get_training_chat_template

    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        trl_template = get_training_chat_template(tokenizer)
    except ValueError:
        trl_template = None
    finally:
        tokenizer.chat_template = saved
    if trl_template:
        candidates.append((trl_template, "trl"))
    for patch in PATCHES:
        patched = patch.apply(template)
        if patched is not None:
            candidates.append((patched, f"emlab:{patch.family}"))
    for patched, where in candidates:
        try:
            check_training_template(tokenizer, template, patched)
        except TemplateError as e:
            tried.append(f"{where}: {e}")
            continue
        return patched, where
    detail = "; ".join(tried) if tried else "no known family matches it"
    raise TemplateError(
        "cannot add {% generation %} markers to this chat template (" + detail + "). Known families: Qwen2.5, "
        "Llama 3 / 3.1 / 3.2, Gemma 1-3, Mistral v0.1-v0.3, SmolLM2 (and what trl patches). Set "
        "tokenizer.chat_template to your template with {% generation %}...{% endgeneration %} around each "
        "assistant answer and its end-of-turn token, or call emlab.models.ensure_chat_template(tok, "
        "fallback='chatml') to use emlab's generic ChatML instead (prompts then differ from the model's own)."
    )
