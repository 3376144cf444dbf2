"""The .cdiff file format: exact round trips, and refusal of anything else."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import circuitdiff as cd
from circuitdiff.io import FORMAT_VERSION, _checksum


@pytest.fixture(scope="module")
def scores(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5]], [[6, 7], [8]], batch_size=2)
    return cd.attribute(model, graph, batches, objective="answer_nll", progress=False)


def test_round_trip_is_bit_exact(scores, tmp_path):
    path = tmp_path / "run.cdiff"
    scores.save(path)
    loaded = cd.EdgeScores.load(path)
    assert loaded.graph == scores.graph
    assert torch.equal(loaded.mean, scores.mean)
    assert torch.equal(loaded.per_sample, scores.per_sample)
    assert torch.equal(loaded.objective_values, scores.objective_values)
    assert loaded.metadata == scores.metadata
    assert loaded.sample_ids == scores.sample_ids
    assert loaded.edge_names() == scores.edge_names()
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file is gone


def test_round_trip_without_per_sample(scores, tmp_path):
    mean_only = cd.EdgeScores(scores.graph, scores.mean, None, scores.objective_values, scores.metadata)
    mean_only.save(tmp_path / "m.cdiff")
    loaded = cd.EdgeScores.load(tmp_path / "m.cdiff")
    assert loaded.per_sample is None and torch.equal(loaded.mean, scores.mean)


def _small(sample_ids=None, metadata=None) -> cd.EdgeScores:
    """Three samples of random scores on a small grouped-query graph."""
    graph = cd.AttributionGraph(2, 4, 2)
    per_sample = torch.randn(3, graph.n_sources, graph.n_receivers) * graph.edge_mask
    return cd.EdgeScores(graph, per_sample.mean(0), per_sample, torch.tensor([0.5, 1.5, 2.5]),
                         metadata or {"method": "eap"}, sample_ids=sample_ids)


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_sample_ids_and_metadata_round_trip(tmp_path, mmap):
    metadata = {"method": "eap", "nested": {"list": [1, 2.5, None, True], "text": "é\n"}, "n": 3}
    scores = _small(sample_ids=["q-7", "q-3", "q-9"], metadata=metadata)
    scores.save(tmp_path / "run.cdiff")
    loaded = cd.EdgeScores.load(tmp_path / "run.cdiff", mmap=mmap)
    assert loaded.sample_ids == ("q-7", "q-3", "q-9")
    assert loaded.metadata == {**metadata, "sample_ids": "given"} == scores.metadata
    assert torch.equal(loaded.per_sample, scores.per_sample)


def test_saving_into_a_missing_folder_says_so(tmp_path):
    with pytest.raises(cd.MissingPathError, match="does not exist; create it first"):
        _small().save(tmp_path / "no-such-folder" / "run.cdiff")


def test_positional_sample_ids_round_trip(tmp_path):
    scores = _small()
    scores.save(tmp_path / "run.cdiff")
    loaded = cd.EdgeScores.load(tmp_path / "run.cdiff")
    assert loaded.sample_ids == ("0", "1", "2")
    assert loaded.metadata == scores.metadata == {"method": "eap", "sample_ids": "position"}


def test_version_1_file_loads_with_positional_sample_ids(tmp_path):
    """A file as circuitdiff wrote it before sample ids (format version 1)."""
    graph = cd.AttributionGraph(2, 4, 2)
    per_sample = torch.randn(3, graph.n_sources, graph.n_receivers) * graph.edge_mask
    tensors = {"mean": per_sample.mean(0), "objective_values": torch.arange(3.0), "edge_mask": graph.edge_mask,
               "per_sample": per_sample}
    header = {"format_version": 1, "graph": graph.to_dict(), "metadata": {"method": "eap"}}
    header["sha256"] = _checksum(tensors, header)
    save_file(tensors, str(tmp_path / "v1.cdiff"), metadata={"circuitdiff": json.dumps(header)})
    loaded = cd.EdgeScores.load(tmp_path / "v1.cdiff")
    assert loaded.sample_ids == ("0", "1", "2")
    assert loaded.metadata == {"method": "eap", "sample_ids": "position"}
    assert loaded.graph == graph and torch.equal(loaded.per_sample, per_sample)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 2), (3, 8, 1), (5, 6, 6), (4, 12, 4)], ids=str)
@pytest.mark.parametrize("level", ["head", "layer"])
def test_graph_dimensions_match_built_graph(shape, level):
    graph = cd.AttributionGraph(*shape, level=level)
    assert cd.AttributionGraph.dimensions(*shape, level) == (graph.n_sources, graph.n_receivers)


def _edit_header(path, edit) -> None:
    """Rewrite the circuitdiff JSON inside a safetensors header with ``edit(inner_dict)``."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    inner = json.loads(header["__metadata__"]["circuitdiff"])
    edit(inner)
    header["__metadata__"]["circuitdiff"] = json.dumps(inner)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def test_flipped_tensor_byte_is_rejected(scores, tmp_path):
    path = tmp_path / "run.cdiff"
    scores.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # a byte inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(cd.FileFormatError, match="failed its checksum"):
        cd.EdgeScores.load(path)


def test_edited_metadata_is_rejected(scores, tmp_path):
    path = tmp_path / "run.cdiff"
    scores.save(path)
    _edit_header(path, lambda inner: inner["metadata"].update(method="exact"))
    with pytest.raises(cd.FileFormatError, match="failed its checksum"):
        cd.EdgeScores.load(path)


def test_newer_format_version_is_refused(scores, tmp_path):
    path = tmp_path / "run.cdiff"
    scores.save(path)
    _edit_header(path, lambda inner: inner.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(cd.FileFormatError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade circuitdiff"):
        cd.EdgeScores.load(path)


def test_truncated_and_foreign_files_are_refused(scores, tmp_path):
    path = tmp_path / "run.cdiff"
    scores.save(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(cd.FileFormatError, match="not a readable safetensors file"):
        cd.EdgeScores.load(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(cd.FileFormatError, match="not one written by circuitdiff"):
        cd.EdgeScores.load(foreign)
    (tmp_path / "junk.cdiff").write_bytes(b"\x00" * 3)
    with pytest.raises(cd.FileFormatError):
        cd.EdgeScores.load(tmp_path / "junk.cdiff")
    with pytest.raises(FileNotFoundError):
        cd.EdgeScores.load(tmp_path / "missing.cdiff")


def test_loading_never_unpickles(scores, tmp_path, monkeypatch):
    path = tmp_path / "run.cdiff"
    scores.save(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert torch.equal(cd.EdgeScores.load(path).mean, scores.mean)


def test_edge_views(scores):
    values = scores.edge_values()
    assert values.shape == (scores.graph.n_edges,)
    assert scores.edge_values(per_sample=True).shape == (scores.n_samples, scores.graph.n_edges)
    name, value = scores.top(1)[0]
    assert abs(value) == values.abs().max().item()
    assert name in scores.edge_names()
    assert "eap" in repr(scores) and "per-sample" in repr(scores)


def test_memory_mapped_load_equals_normal_load(tmp_path):
    graph = cd.AttributionGraph(2, 4, 2)
    per_sample = torch.randn(7, graph.n_sources, graph.n_receivers) * graph.edge_mask
    scores = cd.EdgeScores(graph=graph, mean=per_sample.mean(0), per_sample=per_sample,
                           objective_values=torch.arange(7.0), metadata={"method": "eap"})
    path = tmp_path / "run.cdiff"
    scores.save(path)
    mapped = cd.EdgeScores.load(path, mmap=True)
    assert torch.equal(mapped.per_sample, per_sample) and torch.equal(mapped.mean, scores.mean)
    mapped.per_sample[0] += 1.0  # copy-on-write: the file is not changed
    assert torch.equal(cd.EdgeScores.load(path).per_sample, per_sample)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(cd.FileFormatError, match="checksum"):
        cd.EdgeScores.load(path, mmap=True)
