"""Prompt templates: each named template rendered by hand with a tiny tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

import circuitdiff as cd
from circuitdiff.data.datasets import load_questions
from circuitdiff.data.templates import (PLACEHOLDER, PromptTemplate, available_templates, get_template,
                                        register_template, registry, template_identity)
from plugin_helpers import installed_package

#: A small Jinja chat template in the usual shape: BOS, one tagged block a turn, the assistant tag last.
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTION = "What is {x} if x = 2 + 2?"  # braces in a question are text, not placeholders
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def tokenizer(chat_template: str | None = CHAT, adds_bos: bool = True):
    """A word-level tokenizer whose encodings start with <s> (if ``adds_bos``), with ``chat_template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "<s>": 2, "x": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>")
    fast.chat_template = chat_template
    return fast


EXPECTED = {  # written out by hand; the tokenizer adds <s> itself, so the rendered text drops it
    "plain": f"{QUESTION}\n{INSTRUCTION}\n",
    "chat": f"<|user|>{QUESTION}\n{INSTRUCTION}<|end|><|assistant|>",
    "qwen2.5-math": f"<|system|>{INSTRUCTION}<|end|><|user|>{QUESTION}<|end|><|assistant|>",
    "deepseek-math": f"<|user|>{QUESTION}\n{INSTRUCTION}<|end|><|assistant|>",
    "r1-distill": f"<|user|>{QUESTION}\n{INSTRUCTION}<|end|><|assistant|><think>\n",
    "mistral-math-shepherd": f"User:\n{QUESTION}\n\nAssistant:",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_named_template_renders_by_hand(name):
    assert get_template(name).render(QUESTION, tokenizer()) == EXPECTED[name]


def test_the_builtins_are_available():
    assert set(EXPECTED) <= set(available_templates())


def test_bos_text_stays_when_the_tokenizer_adds_none():
    text = get_template("chat").render("q", tokenizer(adds_bos=False))
    assert text == f"<s><|user|>q\n{INSTRUCTION}<|end|><|assistant|>"


def test_r1_distill_does_not_open_think_twice():
    opened = CHAT.replace("<|assistant|>{% endif %}", "<|assistant|><think>\n{% endif %}")  # newer R1 tokenizers
    assert get_template("r1-distill").render("q", tokenizer(opened)).endswith("<|assistant|><think>\n")
    assert not get_template("r1-distill").render("q", tokenizer(opened)).endswith("<think>\n<think>\n")


def test_chat_templates_need_a_tokenizer_with_a_chat_template():
    with pytest.raises(cd.ArgumentError, match="'chat' needs a chat template, but the tokenizer .* has none"):
        get_template("chat").render("q", tokenizer(chat_template=None))
    with pytest.raises(cd.ArgumentError, match="'qwen2.5-math' renders through the tokenizer's chat template; "
                                               "pass tokenizer="):
        get_template("qwen2.5-math").render("q")
    assert get_template("plain").render("q") == f"q\n{INSTRUCTION}\n"  # plain text needs none


def test_unknown_name_lists_the_templates():
    with pytest.raises(cd.UnknownNameError, match=r"unknown prompt template 'qwen'; available: .*chat, "
                                                  r"deepseek-math, mistral-math-shepherd, plain, qwen2\.5-math, "
                                                  r"r1-distill"):
        get_template("qwen")
    with pytest.raises(cd.ArgumentTypeError, match="template must be a name"):
        get_template(3)


def test_register_a_template():
    mine = PromptTemplate("test-terse", "Q: {question}\nA:")
    try:
        assert register_template(mine) is mine
        assert "test-terse" in available_templates() and get_template("test-terse") is mine
        with pytest.raises(cd.DuplicateNameError, match="'test-terse' is already registered"):
            register_template(PromptTemplate("test-terse", "{question}"))
        questions = load_questions(FIXTURES / "gsm8k.jsonl", dataset_format="gsm8k",
                                   template="test-terse", max_questions=1)
        assert questions[0].prompt == "Q: Ann has 3 boxes of 6 pens. How many pens does she have?\nA:"
    finally:
        registry.unregister("test-terse")
    assert "test-terse" not in available_templates()


def test_a_template_from_an_installed_package(tmp_path, monkeypatch):
    """An entry point in the group circuitdiff.templates, found after import, loaded only when asked for."""
    source = ("from circuitdiff.data.templates import PromptTemplate\n"
              "def socratic():\n"
              "    return PromptTemplate('socratic', 'Let us think about {question} together.')\n")
    installed_package(tmp_path, monkeypatch, "my-prompts", {"circuitdiff.templates": {"socratic": "my_prompts:socratic"}},
                      {"my_prompts": source})
    try:
        assert "socratic" in available_templates() and "my_prompts" not in sys.modules
        assert get_template("socratic").render("2 + 2") == "Let us think about 2 + 2 together."
    finally:
        sys.modules.pop("my_prompts", None)


@pytest.mark.parametrize(("options", "message"), [
    (dict(name="x", user="no placeholder"), "must contain \\{question\\}"),
    (dict(name="x", user="{question} \\boxed{}"), "double literal braces"),
    (dict(name="x", user="{question} {answer}"), "not a format string with only \\{question\\}"),
    (dict(name="x", user="{question}", system="be brief"), "a system turn needs chat=True"),
    (dict(name="", user="{question}"), "non-empty string"),
])
def test_bad_templates(options, message):
    with pytest.raises(cd.ArgumentError, match=message):
        PromptTemplate(**options)


def test_load_questions_with_a_chat_template():
    questions = load_questions(FIXTURES / "math500.jsonl", dataset_format="math500",
                               template="qwen2.5-math", tokenizer=tokenizer(), max_questions=1)
    assert questions[0].prompt == f"<|system|>{INSTRUCTION}<|end|><|user|>What is $2^{{10}}$?<|end|><|assistant|>"
    with pytest.raises(cd.ArgumentError, match="pass tokenizer="):
        load_questions(FIXTURES / "math500.jsonl", dataset_format="math500", template="chat")


def test_template_identity():
    tok = tokenizer()
    chat = template_identity("chat", tok)
    assert chat["name"] == "chat" and chat["chat"] is True and len(chat["sha256"]) == 64
    assert template_identity("chat", tokenizer()) == chat  # a fingerprint, not an object id
    assert template_identity("deepseek-math", tok)["sha256"] == chat["sha256"]  # the same text...
    assert template_identity("deepseek-math", tok)["name"] != chat["name"]  # ...under another name
    assert template_identity("qwen2.5-math", tok)["sha256"] != chat["sha256"]
    # the chat template's text counts even where the placeholder renders the same
    commented = tokenizer(CHAT + "{# revised #}")
    assert get_template("chat").render(PLACEHOLDER, commented) == get_template("chat").render(PLACEHOLDER, tok)
    assert template_identity("chat", commented)["sha256"] != chat["sha256"]
    # plain text: the tokenizer plays no part; the hash is of the placeholder rendered (docs/datasets.md)
    recipe = {"chat_template": None, "rendered": f"{{question}}\n{INSTRUCTION}\n"}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert template_identity("plain") == template_identity("plain", tok) == {"name": "plain", "chat": False,
                                                                             "sha256": digest}
