"""Named choices (circuitdiff.choices): string enums that accept their strings and name the valid values."""

from __future__ import annotations

import json

import pytest

import circuitdiff as cd
from circuitdiff.choices import GroupKind, InterventionName, Level, NonFinitePolicy, ReceiverKind, SourceKind

VALUES = {
    Level: ("head", "layer"),
    SourceKind: ("input", "attn", "mlp"),
    ReceiverKind: ("q", "k", "v", "mlp", "logits"),
    GroupKind: ("attn", "mlp", "logits"),
    InterventionName: ("zero", "patching", "mean", "mean-positional"),
    NonFinitePolicy: ("error", "drop"),
}


@pytest.mark.parametrize("choice", list(VALUES), ids=lambda c: c.__name__)
def test_parse_accepts_the_member_or_its_string(choice):
    assert tuple(choice) == VALUES[choice]
    for value in VALUES[choice]:
        member = choice.parse(value)
        assert member is choice(value) and choice.parse(member) is member
        assert member == value and str(member) == value and f"{member}" == value and hash(member) == hash(value)
        assert json.dumps({member: [member]}) == json.dumps({value: [value]})  # JSON output is the plain string


@pytest.mark.parametrize("choice", list(VALUES), ids=lambda c: c.__name__)
def test_a_bad_value_is_an_unknown_name_error_listing_the_valid_ones(choice):
    for bad in ("nope", "HEAD", None, 3, ["zero"]):
        with pytest.raises(cd.UnknownNameError) as info:
            choice.parse(bad)
        assert str(info.value) == f"unknown {choice.label} {bad!r}; valid: {', '.join(VALUES[choice])}."
        assert isinstance(info.value, (cd.ArgumentError, ValueError))


def test_messages_name_the_choice():
    with pytest.raises(cd.UnknownNameError, match=r"^unknown graph level 'neuron'; valid: head, layer\.$"):
        Level.parse("neuron")
    with pytest.raises(cd.UnknownNameError, match="unknown intervention 'resample'; valid: zero, patching, mean, "
                                                  "mean-positional"):
        InterventionName.parse("resample")
    with pytest.raises(cd.UnknownNameError, match=r"unknown non-finite policy 'skip'; valid: error, drop\."):
        NonFinitePolicy.parse("skip")


def test_the_label_is_not_a_member():
    assert Level.label == "graph level" and "label" not in Level.__members__
