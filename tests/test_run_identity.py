"""Scenario 2 of the trust issue: a resumed run never reuses shards of another run.

Before run identities, a re-run into the same checkpoint directory with other weights
returned the old shards as the new model's scores: weights replaced on disk, an
in-memory model edited in place, base and tuned runs sharing one directory at the same
time, a deleted manifest. Each shard was checked only against its batch's token ids.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.identity import differences, model_identity, weights_fingerprint
from circuitdiff.scorers.eap import EAP
from test_resume import CountingEAP, assert_same, make_batches, run


def test_weights_replaced_on_disk_are_refused(checkpoints, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(checkpoints["llama"], path)
    batches, ckpt = make_batches(3), tmp_path / "ckpt"
    run(cd.load_model(path, device="cpu"), batches, ckpt)
    other = tm.write_checkpoint("llama", tmp_path / "other", seed=5)
    shutil.copy(other / "model.safetensors", path / "model.safetensors")  # e.g. a later training step
    replaced = cd.load_model(path, device="cpu")
    with pytest.raises(cd.IdentityMismatchError, match=r"the model weights changed \(stored [0-9a-f]{12}…, now") as info:
        run(replaced, batches, ckpt)
    assert "fresh=True" in str(info.value) and "--fresh" in str(info.value)
    fresh = run(replaced, batches, ckpt, fresh=True)  # the flag the message names starts over
    assert_same(fresh, run(replaced, batches))


def test_an_in_memory_model_edited_in_place_is_refused(checkpoints, tmp_path):
    model = cd.load_model(checkpoints["gpt2"], device="cpu")
    batches, ckpt = make_batches(2), tmp_path / "ckpt"
    run(model, batches, ckpt)
    with torch.no_grad():
        model.original_model.transformer.h[1].mlp.c_fc.weight[3, 7] += 1e-3  # one element
    with pytest.raises(cd.IdentityMismatchError, match="the model weights changed"):
        run(model, batches, ckpt)


def test_a_run_on_the_model_in_another_dtype_is_refused(checkpoints, tmp_path):
    batches, ckpt = make_batches(2), tmp_path / "ckpt"
    run(cd.load_model(checkpoints["gpt2"], device="cpu"), batches, ckpt)
    with pytest.raises(cd.IdentityMismatchError, match='the model dtype changed \\(stored "float32", now "float64"\\)'):
        run(cd.load_model(checkpoints["gpt2"], device="cpu", dtype=torch.float64), batches, ckpt)


class GatedEAP(EAP):
    """EAP that waits for a signal before scoring (so a second run can try the directory meanwhile)."""

    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self._started, self._release = started, release

    def score_batch(self, context, batch, batch_index):
        self._started.set()
        self._release.wait(30)
        return super().score_batch(context, batch, batch_index)


def test_two_runs_in_one_directory_at_once_are_refused(checkpoints, tmp_path):
    base, tuned = cd.load_model(checkpoints["llama"], device="cpu"), cd.load_model(checkpoints["qwen2"], device="cpu")
    batches, ckpt = make_batches(4), tmp_path / "shared"
    started, release, outcome = threading.Event(), threading.Event(), {}

    def first():
        outcome["base"] = run(base, batches, ckpt, method=GatedEAP(started, release))

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert started.wait(30)
        with pytest.raises(cd.RunLockedError, match="another process is writing into checkpoint_dir"):
            run(tuned, batches, ckpt)
    finally:
        release.set()
        worker.join(60)
    assert_same(outcome["base"], run(base, batches))  # the first run was not disturbed
    with pytest.raises(cd.IdentityMismatchError, match="the model weights changed"):  # and afterwards: refused
        run(tuned, batches, ckpt)


def test_shards_are_checked_even_without_the_manifest(checkpoints, tmp_path):
    model = cd.load_model(checkpoints["llama"], device="cpu")
    other = cd.load_model(tm.write_checkpoint("llama", tmp_path / "other", seed=3), device="cpu")
    batches, ckpt = make_batches(3), tmp_path / "ckpt"
    expected = run(model, batches, ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(cd.IdentityMismatchError, match="shard-00000.safetensors' was written by a different run "
                                                       "\\(the model weights changed"):
        run(other, batches, ckpt)
    (ckpt / "manifest.json").unlink()
    assert_same(run(model, batches, ckpt), expected)  # the same run still resumes from its shards


def test_old_checkpoint_directories_are_refused_not_reused(get_model, tmp_path):
    model, batches, ckpt = get_model("gpt2"), make_batches(2), tmp_path / "ckpt"
    run(model, batches, ckpt)
    manifest = ckpt / "manifest.json"
    manifest.write_text('{"format": "circuitdiff-checkpoint", "version": 1, "model": {}}')
    with pytest.raises(cd.IdentityMismatchError, match="written by an older circuitdiff"):
        run(model, batches, ckpt)


def test_scores_carry_their_identity(get_model, tmp_path):
    model = get_model("gpt2")
    batches = make_batches(2)
    scores = run(model, batches, level="head")
    identity = scores.metadata["identity"]
    assert set(identity) == {"fingerprint", "circuitdiff", "model", "graph", "scorer", "intervention", "objective",
                             "per_sample", "data", "attention"}  # "attention": fused, the default
    assert identity["model"]["weights"] == weights_fingerprint(model)
    scores.save(tmp_path / "s.cdiff")
    assert cd.EdgeScores.load(tmp_path / "s.cdiff").metadata["identity"] == identity
    again = run(model, batches, level="head")
    assert again.metadata["identity"] == identity  # deterministic
    other = run(model, make_batches(2, seed=9), level="head")
    assert differences(identity, other.metadata["identity"], ["data"]) == [
        f"the data (token ids, labels or sample ids) changed (stored {identity['data'][:12]}…, "
        f"now {other.metadata['identity']['data'][:12]}…)"]


def test_any_change_to_any_parameter_element_changes_the_weights_fingerprint(checkpoints):
    model = cd.load_model(checkpoints["neox"], device="cpu")
    original = weights_fingerprint(model)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    with torch.no_grad():
        for name, parameter in model.original_model.named_parameters():
            flat = parameter.view(-1)
            index = int(torch.randint(flat.numel(), (1,), generator=generator))
            old = flat[index].clone()
            flat[index] = torch.nextafter(old, old + 1)  # the smallest possible change
            changed = weights_fingerprint(model)
            flat[index] = old
            assert changed != original, name
            seen.add(changed)
    assert weights_fingerprint(model) == original and len(seen) == len(list(model.original_model.parameters()))
    swapped = [p for _, p in model.original_model.named_parameters() if p.dim() == 2][0]
    with torch.no_grad():
        swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert weights_fingerprint(model) != original


def test_the_fingerprint_covers_dtype_config_and_tokenizer(checkpoints, tmp_path):
    base = model_identity(cd.load_model(checkpoints["llama"], device="cpu"))
    bf16 = model_identity(cd.load_model(checkpoints["llama"], device="cpu", dtype=torch.bfloat16))
    assert base["weights"] != bf16["weights"] and base["dtype"] != bf16["dtype"]  # same values, other bytes
    moved = tmp_path / "moved"
    shutil.copytree(checkpoints["llama"], moved)
    assert model_identity(cd.load_model(moved, device="cpu")) == base  # a moved checkpoint is the same model
    config = (moved / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    assert config != (moved / "config.json").read_text()
    (moved / "config.json").write_text(config)
    changed = model_identity(cd.load_model(moved, device="cpu"))
    assert changed["config"] != base["config"] and changed["weights"] == base["weights"]
    assert differences({"model": base}, {"model": changed})[0].startswith("the model's config.json changed")


def test_the_weights_fingerprint_does_not_depend_on_chunks_devices_or_implementation(get_model, monkeypatch):
    from circuitdiff import fingerprints

    model = get_model("qwen2")
    expected = weights_fingerprint(model)
    monkeypatch.setattr(fingerprints, "_CHUNK_CPU", 1000)  # chunk boundaries inside tensors
    assert weights_fingerprint(model) == expected
    # the accelerators' int64 torch path, run on CPU, gives the numpy uint32 path's numbers
    monkeypatch.setattr(fingerprints, "_CpuWordStream", lambda: fingerprints._WordStream(torch.device("cpu")))
    assert weights_fingerprint(model) == expected
    # tensors on two devices: the streams' sums add up to one stream's (positions are global)
    words = [fingerprints._words(torch.randn(3001)), fingerprints._words(torch.randn(77).bfloat16())]
    one = fingerprints._WordStream(torch.device("cpu"))
    first, second = fingerprints._CpuWordStream(), fingerprints._CpuWordStream()
    one.add(words[0], 0)
    one.add(words[1], 3001)
    first.add(words[0], 0)
    second.add(words[1], 3001)
    split = [(a + b) & ((1 << 62) - 1) for a, b in zip(first.result(), second.result())]
    assert split == one.result()


def test_sign_flips_and_swaps_change_the_weights_fingerprint():
    """The edits a weak mix misses: flipping the top bit of two words (negating two weights) or of a whole bias."""
    import random

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    original = weights_fingerprint(layer)
    flat, rng = layer.weight.data.view(-1), random.Random(0)
    with torch.no_grad():
        for _ in range(300):
            i, j = rng.sample(range(flat.numel()), 2)
            for edit in ("negate", "swap"):
                before = flat[[i, j]].clone()
                if edit == "negate":
                    flat[[i, j]] = -before
                else:
                    flat[[i, j]] = before.flip(0)
                assert weights_fingerprint(layer) != original, (edit, i, j)
                flat[[i, j]] = before
        layer.bias.neg_()
        assert weights_fingerprint(layer) != original
        layer.bias.neg_()
    assert weights_fingerprint(layer) == original


class WeightedNLL:
    """A module-level objective class with options (identified by its class and public attributes)."""

    def __init__(self, weights, settings=None) -> None:
        self.weights, self.settings = weights, settings or {"scale": 1.0}

    def __call__(self, logits, batch):
        return cd.objectives.answer_nll()(logits, batch) * float(self.weights.sum()) * self.settings["scale"]


def test_component_options_are_in_the_identity_or_refused(get_model, tmp_path):
    import numpy as np

    model, batches = get_model("gpt2"), make_batches(2)
    run(model, batches, tmp_path / "a", objective=WeightedNLL(np.ones(3)))
    with pytest.raises(cd.IdentityMismatchError, match="the objective changed \\(options"):
        run(model, batches, tmp_path / "a", objective=WeightedNLL(np.full(3, 2.0)))  # arrays by content
    with pytest.raises(cd.IdentityMismatchError, match="the objective changed"):
        run(model, batches, tmp_path / "a", objective=WeightedNLL(np.ones(3), {"scale": 2.0}))  # dicts too
    with pytest.raises(cd.ArgumentError, match="cannot identify the objective option settings=dict"):
        run(model, batches, tmp_path / "b", objective=WeightedNLL(np.ones(3), {"scale": object()}))


def test_fused_and_eager_attention_shards_are_not_mixed(get_model, tmp_path):
    """In a bfloat16 model the two attentions' scores differ by bfloat16 rounding: the identity says which ran."""
    model, batches = get_model("llama"), make_batches(2)
    fused = run(model, batches, tmp_path / "a", method=CountingEAP())  # the default
    assert fused.metadata["identity"]["attention"] == "fused"
    with pytest.raises(cd.IdentityMismatchError, match="the attention .* changed"):
        run(model, batches, tmp_path / "a", method=CountingEAP(fused_attention=False))
    eager = run(model, batches, tmp_path / "b", method=CountingEAP(fused_attention=False))
    assert "attention" not in eager.metadata["identity"]
    resumed = CountingEAP(fused_attention=True)  # True and the default name the same run here
    assert_same(run(model, batches, tmp_path / "a", method=resumed), fused)
    assert resumed._scored == []


def test_another_position_window_resumes_from_the_same_shards(get_model, tmp_path):
    model, batches, ckpt = get_model("llama"), make_batches(3, pos=8), tmp_path / "ckpt"
    windowed = CountingEAP(positions_per_pass=3)
    whole = run(model, batches, ckpt, level="head", method=CountingEAP())
    assert_same(run(model, batches, ckpt, level="head", method=windowed), whole)
    assert windowed._scored == []  # every batch came from its shard


def test_the_fingerprints_stay_importable_from_identity():
    """The digests moved to circuitdiff.fingerprints; circuitdiff.identity still exports them (the same objects)."""
    from circuitdiff import fingerprints, identity

    for name in fingerprints.__all__:
        assert getattr(identity, name) is getattr(fingerprints, name) and name in identity.__all__


def test_run_settings_refuses_an_objective_that_is_neither_a_name_nor_a_callable(get_model):
    from circuitdiff.choices import InterventionName
    from circuitdiff.identity import run_settings

    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    with pytest.raises(cd.ArgumentTypeError, match="objective must be a name or a callable, got NoneType"):
        run_settings(model, graph, "eap", "zero", None, None, True)
    settings = run_settings(model, graph, "eap", InterventionName.ZERO, "answer_nll", None, True)
    assert settings["intervention"] == {"name": "zero"} and type(settings["intervention"]["name"]) is str
