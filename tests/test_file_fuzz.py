"""Hostile and broken .cdiff files: each one raises FileFormatError, in well under a second.

Hand-made regressions first, then property-based fuzzing of the circuitdiff header's
fields, of truncation, of flipped bytes and of the safetensors header's entries.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import circuitdiff as cd
from circuitdiff.io import _checksum

# The autouse seeding fixture of conftest.py is function-scoped; it does not affect these tests.
# Derandomized: CI checks the same 300 cases every run (CIRCUITDIFF_FUZZ_SEEDS=random explores new ones).
FUZZ = settings(max_examples=300, deadline=1000, database=None,
                derandomize=os.environ.get("CIRCUITDIFF_FUZZ_SEEDS") != "random",
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SAMPLE_IDS = ["q-a", "q-b", "q-c"]


class _Delete:
    """The edit that removes a field."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
# Arbitrary JSON, plus values close to valid ones, so that the checks past the type checks run too.
EDITS = st.one_of(st.just(DELETE), JSON_VALUES, st.integers(-2, 5), st.sampled_from(["head", "layer", "0" * 64]),
                  st.lists(st.sampled_from(["q-a", "q-b", "q-c", "q-d", ""]), min_size=2, max_size=4))


class Valid:
    """A valid file: its bytes, its tensors and a path to write variants to."""

    def __init__(self, data: bytes, tensors: dict[str, torch.Tensor], scratch: Path) -> None:
        self.data, self.tensors, self.scratch = data, tensors, scratch

    def __repr__(self) -> str:  # keeps hypothesis' reports short
        return f"Valid({len(self.data)} bytes)"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    graph = cd.AttributionGraph(2, 4, 2)
    per_sample = torch.randn(3, graph.n_sources, graph.n_receivers, generator=torch.Generator().manual_seed(0))
    per_sample *= graph.edge_mask
    scores = cd.EdgeScores(graph, per_sample.mean(0), per_sample, torch.tensor([0.5, 1.5, 2.5]),
                           {"method": "eap", "n": 3}, sample_ids=SAMPLE_IDS)
    path = tmp_path_factory.mktemp("fuzz") / "valid.cdiff"
    scores.save(path)
    return Valid(path.read_bytes(), load_file(str(path)), path.with_name("variant.cdiff"))


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """A file's safetensors header, its circuitdiff header and the tensor bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    outer = json.loads(data[8:8 + length])
    return outer, json.loads(outer["__metadata__"]["circuitdiff"]), data[8 + length:]


def join(outer: dict, inner: object, body: bytes) -> bytes:
    """The file with these headers and tensor bytes (header padded to 8 bytes, as safetensors does)."""
    outer = {**outer, "__metadata__": {"circuitdiff": json.dumps(inner)}}
    encoded = json.dumps(outer, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + body


def rehash(inner: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Recompute the checksum, as a forger would, so only the field checks can catch an edit."""
    inner["sha256"] = _checksum(tensors, {key: value for key, value in inner.items() if key != "sha256"})


def outcome(path: Path, data: bytes) -> cd.EdgeScores | cd.FileFormatError:
    """The scores loaded from ``data``, or the FileFormatError; any other exception propagates."""
    path.write_bytes(data)
    try:
        return cd.EdgeScores.load(path)
    except cd.FileFormatError as exc:
        return exc


# ---------------------------------------------------------------------- hand-made regressions
def test_header_claiming_a_huge_graph_fails_fast(tmp_path):
    graph = cd.AttributionGraph(2, 4, level="layer")
    scores = cd.EdgeScores(graph, torch.zeros(graph.n_sources, graph.n_receivers), None, torch.zeros(2))
    path = tmp_path / "huge.cdiff"
    scores.save(path)
    outer, inner, body = split(path.read_bytes())
    inner["graph"]["n_layers"] = 10000
    rehash(inner, load_file(str(path)))
    path.write_bytes(join(outer, inner, body))
    start = time.perf_counter()
    with pytest.raises(cd.FileFormatError) as error:
        cd.EdgeScores.load(path)
    assert time.perf_counter() - start < 1.0
    assert "needs [20001, 40001]" in str(error.value)  # caught by the size check, before building the graph


def _with(key, value):
    return lambda inner: {**inner, key: value}


def _without(key):
    return lambda inner: {k: v for k, v in inner.items() if k != key}


def _with_graph(key, value):
    return lambda inner: {**inner, "graph": {**inner["graph"], key: value}}


BROKEN_HEADERS = {
    "format_version_zero": _with("format_version", 0),
    "format_version_negative": _with("format_version", -1),
    "format_version_string": _with("format_version", "1"),
    "format_version_bool": _with("format_version", True),
    "header_not_object": lambda inner: [inner],
    "graph_not_object": _with("graph", [2, 4, 2]),
    "graph_missing_level": lambda inner: {**inner, "graph": _without("level")(inner["graph"])},
    "graph_extra_key": _with_graph("dropout", 0.1),
    "graph_unknown_level": _with_graph("level", "neuron"),
    "graph_n_layers_string": _with_graph("n_layers", "2"),
    "graph_n_kv_heads_not_divisor": _with_graph("n_kv_heads", 3),
    "graph_parallel_blocks_int": _with_graph("parallel_blocks", 0),
    "metadata_list": _with("metadata", []),
    "metadata_dropped_not_records": lambda inner: {**inner, "metadata": {**inner["metadata"], "dropped": [1]}},
    "metadata_dropped_id_not_string": lambda inner: {**inner, "metadata": {**inner["metadata"],
                                                                           "dropped": [{"id": 3, "reason": "x"}]}},
    "metadata_sample_ids_unknown": lambda inner: {**inner, "metadata": {**inner["metadata"], "sample_ids": "maybe"}},
    "sha256_missing": _without("sha256"),
    "sample_ids_missing": _without("sample_ids"),
    "sample_ids_too_few": _with("sample_ids", ["q-a", "q-b"]),
    "sample_ids_repeated": _with("sample_ids", ["q-a", "q-a", "q-b"]),
    "sample_ids_not_strings": _with("sample_ids", [1, 2, 3]),
}


@pytest.mark.parametrize("edit", BROKEN_HEADERS.values(), ids=BROKEN_HEADERS.keys())
def test_broken_header_is_refused(valid, edit):
    """Each broken header, with its checksum recomputed: caught by the field checks."""
    outer, inner, body = split(valid.data)
    edited = edit(inner)
    if isinstance(edited, dict) and "sha256" in edited:
        rehash(edited, valid.tensors)
    valid.scratch.write_bytes(join(outer, edited, body))
    with pytest.raises(cd.FileFormatError, match="invalid circuitdiff header"):
        cd.EdgeScores.load(valid.scratch)


def _edit_entry(name, key, value):
    """Set ``outer[name]`` (key None) or ``outer[name][key]`` in the safetensors header."""

    def edit(data: bytes) -> bytes:
        outer, inner, body = split(data)
        if key is None:
            outer[name] = value
        else:
            outer[name][key] = value
        return join(outer, inner, body)

    return edit


def _pad_with_tabs(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].rstrip(b" ")
    assert len(header) < length, "the test file needs a padded header"
    return data[:8] + header + b"\t" * (length - len(header)) + data[8 + length:]


BROKEN_LAYOUTS = {
    "unknown_tensor": _edit_entry("extra", None, {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
    "integer_dtype": _edit_entry("mean", "dtype", "I32"),
    "shape_larger_than_data": _edit_entry("mean", "shape", [11, 20]),
    "offsets_overlap": _edit_entry("objective_values", "data_offsets", [0, 12]),
    "offsets_not_ints": _edit_entry("mean", "data_offsets", [0.0, 836.0]),
    "header_length_past_end": lambda data: struct.pack("<Q", 2**63) + data[8:],
    "padding_not_spaces": _pad_with_tabs,
    "truncated_by_one_byte": lambda data: data[:-1],
}


@pytest.mark.parametrize("edit", BROKEN_LAYOUTS.values(), ids=BROKEN_LAYOUTS.keys())
def test_broken_safetensors_layout_is_refused(valid, edit):
    valid.scratch.write_bytes(edit(valid.data))
    with pytest.raises(cd.FileFormatError):
        cd.EdgeScores.load(valid.scratch)


# ---------------------------------------------------------------------- fuzzing
def _fields(inner: dict) -> list[str]:
    return [key for key in inner if key != "graph"] + ["graph"] + [f"graph.{key}" for key in inner["graph"]]


@FUZZ
@given(data=st.data(), forge=st.booleans())
def test_edited_header_field(valid, data, forge):
    """Replace or delete one field; it loads only if the file still describes its tensors."""
    outer, inner, body = split(valid.data)
    field = data.draw(st.sampled_from(_fields(inner)))
    value = data.draw(EDITS)
    owner, key = (inner["graph"], field[6:]) if field.startswith("graph.") else (inner, field)
    original = owner[key]
    if value is DELETE:
        del owner[key]
    else:
        owner[key] = value
    if forge and field != "sha256":
        rehash(inner, valid.tensors)
    if value is DELETE:
        acceptable = False
    elif field == "metadata":
        acceptable = isinstance(value, dict)
    elif field == "sample_ids":
        acceptable = (isinstance(value, list) and all(isinstance(v, str) and v for v in value)
                      and len(set(value)) == len(value) == 3)
    else:
        acceptable = type(value) is type(original) and value == original
    unchanged = value is not DELETE and json.dumps(value, sort_keys=True) == json.dumps(original, sort_keys=True)
    result = outcome(valid.scratch, join(outer, inner, body))
    if acceptable and (forge or unchanged):
        assert isinstance(result, cd.EdgeScores), result
        expected = {"sample_ids": "given", **inner["metadata"]}  # ids from the file are "given" unless it says
        assert result.metadata == expected and list(result.sample_ids) == inner["sample_ids"]
    else:
        assert isinstance(result, cd.FileFormatError), f"{field} = {value!r} loaded"


@FUZZ
@given(data=st.data())
def test_truncated_file(valid, data):
    cut = data.draw(st.integers(0, len(valid.data) - 1))
    assert isinstance(outcome(valid.scratch, valid.data[:cut]), cd.FileFormatError)


@FUZZ
@given(data=st.data())
def test_flipped_bytes(valid, data):
    """Flip 1-4 bytes: in the length field, the safetensors JSON, or anywhere."""
    header_end = 8 + struct.unpack("<Q", valid.data[:8])[0]
    position = st.one_of(st.integers(0, 7), st.integers(8, header_end - 1), st.integers(0, len(valid.data) - 1))
    flips = data.draw(st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=4))
    blob = bytearray(valid.data)
    for index, mask in flips:
        blob[index] ^= mask
    result = outcome(valid.scratch, bytes(blob))
    if bytes(blob) == valid.data:  # flips that cancel out
        assert isinstance(result, cd.EdgeScores)
    else:
        assert isinstance(result, cd.FileFormatError)


@FUZZ
@given(length=st.integers(0, 2**64 - 1))
def test_wrong_header_length(valid, length):
    if length == struct.unpack("<Q", valid.data[:8])[0]:
        return
    assert isinstance(outcome(valid.scratch, struct.pack("<Q", length) + valid.data[8:]), cd.FileFormatError)


@FUZZ
@given(data=st.data())
def test_edited_tensor_entry(valid, data):
    """Replace or delete a tensor's entry or one of its fields, or add an unknown tensor."""
    outer, inner, body = split(valid.data)
    before = json.dumps(outer, sort_keys=True)
    name = data.draw(st.sampled_from([key for key in outer if key != "__metadata__"] + ["extra"]))
    field = data.draw(st.sampled_from([None, "dtype", "shape", "data_offsets"])) if name in outer else None
    owner, key = (outer, name) if field is None else (outer[name], field)
    value = data.draw(EDITS | st.sampled_from(["F16", "F32", "F64", "BOOL", "I32", [0, 0], [3], [11, 19]]))
    if value is DELETE:
        owner.pop(key, None)
    else:
        owner[key] = value
    result = outcome(valid.scratch, join(outer, inner, body))
    if json.dumps(outer, sort_keys=True) == before:
        assert isinstance(result, cd.EdgeScores)
    else:
        assert isinstance(result, cd.FileFormatError), f"{name}.{field} = {value!r} loaded"
