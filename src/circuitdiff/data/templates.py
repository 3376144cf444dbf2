"""Prompt templates: how a question becomes the prompt a model sees.

A :class:`PromptTemplate` is either plain text (``user`` with ``{question}`` in it) or a
chat: a user turn (and an optional system turn) rendered through the tokenizer's own
chat template with ``add_generation_prompt=True``, optionally followed by the start of
the model's response (DeepSeek-R1's ``"<think>\\n"``). Built-ins (see docs/datasets.md
for the model cards they follow):

- ``"plain"``: ``"{question}\\nPlease reason step by step, and put your final answer
  within \\boxed{}.\\n"``, no chat template (:data:`~circuitdiff.data.questions.DEFAULT_TEMPLATE`);
- ``"chat"``: that question and instruction as the user turn of the tokenizer's chat template;
- ``"qwen2.5-math"``: Qwen2.5-Math-Instruct's chain-of-thought format, the instruction as
  the system turn and the question as the user turn;
- ``"deepseek-math"``: deepseek-math-7b-instruct/rl, question and instruction in the user turn;
- ``"r1-distill"``: DeepSeek-R1-Distill, no system turn, the instruction in the user turn,
  the response opened with ``"<think>\\n"``;
- ``"mistral-math-shepherd"``: ``"User:\\n{question}\\n\\nAssistant:"``, plain text (the
  model ships no chat template; DART-Math's evaluation format for it).

Templates are looked up by name (:func:`get_template`, :func:`available_templates`);
:func:`register_template` adds one in the running process, and installed packages add
theirs with an entry point in the group ``circuitdiff.templates`` pointing to a
zero-argument callable that returns a :class:`PromptTemplate` (built-in names win).

A chat prompt that starts with the tokenizer's BOS token loses that text when the
tokenizer adds BOS itself on encoding, so the encoded prompt holds one BOS, as
``apply_chat_template(..., tokenize=True)`` gives. :func:`template_identity` is the
fingerprint a run records: the name and the SHA-256 of a placeholder question rendered
with the tokenizer, the chat template's text included.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from circuitdiff.data.questions import DEFAULT_TEMPLATE
from circuitdiff.errors import ArgumentError, ArgumentTypeError
from circuitdiff.registry import Registry

__all__ = ["PromptTemplate", "get_template", "available_templates", "register_template", "template_identity",
           "registry", "PLACEHOLDER"]

#: The question text rendered by :func:`template_identity`.
PLACEHOLDER = "{question}"
_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt.

    Attributes:
        name: the name it is registered and recorded under.
        user: a format string with ``{question}``: the whole prompt, or with ``chat`` the
            user turn. Literal braces are doubled (``\\boxed{{}}``).
        system: the system turn (plain text, chat only); None: no system turn.
        chat: render the turns through the tokenizer's chat template
            (``add_generation_prompt=True``).
        response_prefix: text that opens the model's response, appended to the prompt
            unless the prompt already ends with it.
        source: where the format is documented (shown in docs and errors).
    """

    name: str
    user: str
    system: str | None = None
    chat: bool = False
    response_prefix: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ArgumentTypeError(f"a prompt template name must be a non-empty string; got {self.name!r}.")
        if not isinstance(self.user, str) or "{question}" not in self.user:
            raise ArgumentError(f"prompt template {self.name!r}: the user text must contain {{question}}; "
                                f"got {self.user!r}.")
        try:
            self.user.format(question="")
        except (IndexError, KeyError, ValueError) as error:
            raise ArgumentError(f"prompt template {self.name!r}: {self.user!r} is not a format string with only "
                                f"{{question}} ({type(error).__name__}: {error}); double literal braces, as in "
                                "\\boxed{{}}.") from None
        if self.system is not None and not self.chat:
            raise ArgumentError(f"prompt template {self.name!r}: a system turn needs chat=True (a plain template "
                                "has no turns); put the text into user instead.")

    def render(self, question: str, tokenizer: Any = None) -> str:
        """The prompt for ``question``; ``tokenizer`` is needed (for its chat template) when ``chat`` is set.

        Raises:
            ArgumentError: a chat template without a tokenizer, or a tokenizer without a chat template.
        """
        text = self.user.format(question=question)
        if self.chat:
            _check_chat_tokenizer(self, tokenizer)
            messages = [{"role": "system", "content": self.system}] if self.system is not None else []
            messages.append({"role": "user", "content": text})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            text = _without_duplicate_bos(text, tokenizer)
        if self.response_prefix and not text.endswith(self.response_prefix):
            text += self.response_prefix
        return text


def _check_chat_tokenizer(template: PromptTemplate, tokenizer: Any) -> None:
    if tokenizer is None:
        raise ArgumentError(f"prompt template {template.name!r} renders through the tokenizer's chat template; "
                            "pass tokenizer= (the model's tokenizer), or use template='plain'.")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ArgumentError(f"prompt template {template.name!r} needs a chat template, but the tokenizer "
                            f"{name!r} has none (no chat_template in its tokenizer_config.json); use "
                            "template='plain' or 'mistral-math-shepherd', or set tokenizer.chat_template.")


def _without_duplicate_bos(text: str, tokenizer: Any) -> str:
    """``text`` without a leading BOS token when encoding it would add a second one."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
    return text[len(bos):] if adds_bos else text


#: The prompt-template registry: built-ins, :func:`register_template` and entry points in
#: the group ``circuitdiff.templates`` (see :mod:`circuitdiff.registry`). A factory takes
#: no arguments and returns a :class:`PromptTemplate`.
registry = Registry("prompt template", "circuitdiff.templates",
                    hint=", or register one with circuitdiff.data.templates.register_template")


def register_template(template: PromptTemplate, *, replace: bool = False) -> PromptTemplate:
    """Make ``template`` available under ``template.name``; returns it.

    Raises:
        DuplicateNameError: the name is taken and ``replace`` is False.
    """
    if not isinstance(template, PromptTemplate):
        raise ArgumentTypeError(f"register_template takes a PromptTemplate; got {type(template).__name__}.")
    registry.register(template.name, lambda: template, replace=replace)
    return template


def available_templates() -> list[str]:
    """Every template name, sorted (plugins listed without being imported)."""
    return registry.available()


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """The template registered as ``template``, or ``template`` itself when it is a :class:`PromptTemplate`.

    Raises:
        UnknownNameError: no template of that name (the message lists the available ones).
        PluginLoadError: the plugin providing the name failed to import.
    """
    if isinstance(template, PromptTemplate):
        return template
    if not isinstance(template, str):
        raise ArgumentTypeError(f"template must be a name ({', '.join(available_templates())}) or a "
                                f"PromptTemplate; got {type(template).__name__}.")
    found = registry.get(template)
    if not isinstance(found, PromptTemplate):
        raise ArgumentTypeError(f"prompt template {template!r}: its factory returned {type(found).__name__}, "
                                "not a PromptTemplate.")
    return found


def template_identity(template: str | PromptTemplate, tokenizer: Any = None) -> dict[str, Any]:
    """What a run records about its prompt template (``run.json``'s ``"template"``). A resumed run with another
    template is refused through the cached answers' identity, which holds each rendered prompt's SHA-256.

    Returns:
        ``{"name", "chat": bool, "sha256"}``: the SHA-256 covers :data:`PLACEHOLDER`
        rendered with ``tokenizer`` and, for chat templates, the tokenizer's chat
        template text, so a change of either changes the identity.
    """
    template = get_template(template)
    rendered = template.render(PLACEHOLDER, tokenizer)
    chat_template = getattr(tokenizer, "chat_template", None) if template.chat else None
    text = json.dumps({"rendered": rendered, "chat_template": chat_template}, sort_keys=True, ensure_ascii=False)
    return {"name": template.name, "chat": template.chat, "sha256": hashlib.sha256(text.encode()).hexdigest()}


_QWEN_MATH = "https://huggingface.co/Qwen/Qwen2.5-Math-7B-Instruct"
_DEEPSEEK_MATH = "https://huggingface.co/deepseek-ai/deepseek-math-7b-rl"
_R1_DISTILL = "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B#usage-recommendations"
_DART_MATH = "https://github.com/hkust-nlp/dart-math/blob/main/dart_math/utils.py"
_USER_TURN = "{question}\n" + _INSTRUCTION.replace("{}", "{{}}")

for _template in (
    PromptTemplate("plain", DEFAULT_TEMPLATE, source="circuitdiff's default (questions.DEFAULT_TEMPLATE)"),
    PromptTemplate("chat", _USER_TURN, chat=True, source="the tokenizer's chat template"),
    PromptTemplate("qwen2.5-math", "{question}", system=_INSTRUCTION, chat=True, source=_QWEN_MATH),
    PromptTemplate("deepseek-math", _USER_TURN, chat=True, source=_DEEPSEEK_MATH),
    PromptTemplate("r1-distill", _USER_TURN, chat=True, response_prefix="<think>\n", source=_R1_DISTILL),
    PromptTemplate("mistral-math-shepherd", "User:\n{question}\n\nAssistant:", source=_DART_MATH),
):
    register_template(_template)
del _template
