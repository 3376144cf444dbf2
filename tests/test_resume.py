"""``attribute(checkpoint_dir=...)``: resumable runs.

A checkpointed run equals a plain one bit for bit; finished shards are read instead of
scored; runs that differ are refused; leftovers of a crash are ignored; a process killed
with SIGKILL and started again ends with the uninterrupted result.
"""

from __future__ import annotations

import dataclasses

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.data import IGNORE
from circuitdiff.scorers.eap import EAP

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@dataclasses.dataclass(frozen=True)
class CountingEAP(EAP):
    """EAP that records which batches it scored (private field: not an option)."""

    _scored: list[int] = dataclasses.field(default_factory=list, compare=False)

    def score_batch(self, run, batch, batch_index):
        self._scored.append(batch_index)
        return super().score_batch(run, batch, batch_index)


def negated_max_logit(logits, batch):
    """A module-level callable objective (identified by its qualified name)."""
    return -logits[:, -1].max(-1).values


def make_batches(n_batches: int = 4, size: int = 2, pos: int = 6, seed: int = 0) -> list[cd.Batch]:
    batches = []
    for b in range(n_batches):
        ids = tm.random_ids(size, pos, seed=seed + b)
        labels = torch.full_like(ids, IGNORE)
        labels[:, 2:-1] = ids[:, 3:]
        batches.append(cd.Batch(input_ids=ids, labels=labels))
    return batches


def run(model, batches, checkpoint_dir=None, **kwargs):
    graph = cd.AttributionGraph.from_model(model, level=kwargs.pop("level", "layer"))
    kwargs.setdefault("objective", "answer_nll")
    return cd.attribute(model, graph, batches, progress=False, checkpoint_dir=checkpoint_dir, **kwargs)


def assert_same(a: cd.EdgeScores, b: cd.EdgeScores) -> None:
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(a.objective_values, b.objective_values)
    assert (a.per_sample is None) == (b.per_sample is None)
    if a.per_sample is not None:
        assert torch.equal(a.per_sample, b.per_sample)


def shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("shard-*.safetensors"))


@pytest.mark.parametrize("per_sample", [True, False])
def test_checkpointed_run_equals_plain_run_and_reuses_shards(get_model, tmp_path, per_sample):
    model, batches, ckpt = get_model("gpt2"), make_batches(), tmp_path / "ckpt"
    plain = run(model, batches, per_sample=per_sample)
    scorer = CountingEAP()
    assert_same(run(model, batches, ckpt, method=scorer, per_sample=per_sample), plain)
    assert scorer._scored == [0, 1, 2, 3] and shards(ckpt) == [f"shard-0000{i}.safetensors" for i in range(4)]
    assert (ckpt / "manifest.json").is_file()

    scorer._scored.clear()  # all shards there: nothing is scored
    assert_same(run(model, batches, ckpt, method=scorer, per_sample=per_sample), plain)
    assert scorer._scored == []

    (ckpt / "shard-00002.safetensors").unlink()  # one shard lost: only that batch is scored
    assert_same(run(model, batches, ckpt, method=scorer, per_sample=per_sample), plain)
    assert scorer._scored == [2]


def test_head_level_with_mean_intervention_and_callable_objective(get_model, tmp_path):
    model, batches, ckpt = get_model("llama"), make_batches(3), tmp_path / "ckpt"
    reference = make_batches(2, seed=50)
    kwargs = dict(level="head", intervention="mean", reference_batches=reference, objective=negated_max_logit)
    plain = run(model, batches, **kwargs)
    scorer = CountingEAP()
    assert_same(run(model, batches, ckpt, method=scorer, **kwargs), plain)
    scorer._scored.clear()
    assert_same(run(model, iter(batches), ckpt, method=scorer, **{**kwargs, "reference_batches": iter(reference)}),
                plain)  # generators work too (they are read into lists)
    assert scorer._scored == []
    # the scorer's class is part of the run's identity, not only its name
    with pytest.raises(cd.IdentityMismatchError, match='scorer or its options changed \\(class: stored "test_resume.CountingEAP"'):
        run(model, batches, ckpt, **kwargs)
    # the fingerprint covers the reference data
    with pytest.raises(cd.IdentityMismatchError, match="the intervention or its reference data changed.*fresh=True"):
        run(model, batches, ckpt, **{**kwargs, "reference_batches": make_batches(2, seed=51)})


@pytest.mark.parametrize("change", ["intervention", "batches", "fewer batches", "model", "level", "per_sample",
                                    "objective", "method"])
def test_a_different_run_is_refused(get_model, tmp_path, change):
    model, batches, ckpt = get_model("gpt2"), make_batches(3), tmp_path / "ckpt"
    run(model, batches[:2], ckpt)
    kwargs: dict = {}
    other, other_batches = model, batches[:2]
    if change == "intervention":
        kwargs = dict(intervention="mean", reference_batches=batches)
        expected = "the intervention or its reference data changed"
    elif change == "batches":
        other_batches = [batches[0], batches[2]]
        expected = r"batch\(es\) 1 differ"
    elif change == "fewer batches":
        other_batches = batches[:1]
        expected = r"the data \(token ids, labels or sample ids\) changed"
    elif change == "model":
        other = get_model("neox")
        expected = "the model's architecture changed .*the model weights changed"
    elif change == "level":
        kwargs, expected = dict(level="head"), "the graph changed"
    elif change == "per_sample":
        kwargs, expected = dict(per_sample=False), "per_sample changed \\(stored true, now false\\)"
    elif change == "objective":
        kwargs, expected = dict(objective=negated_max_logit), "the objective changed"
    else:
        kwargs, expected = dict(method=cd.scorers.get("eap-ig-inputs", steps=2)), "the scorer or its options changed"
    with pytest.raises(cd.IdentityMismatchError, match=expected) as info:
        run(other, other_batches, ckpt, **kwargs)
    assert str(ckpt) in str(info.value) and "choose another checkpoint_dir" in str(info.value)


def test_objectives_without_a_stable_name_are_refused(get_model, tmp_path):
    model = get_model("gpt2")
    with pytest.raises(cd.ArgumentError, match="lambda or a locally defined"):
        run(model, make_batches(1), tmp_path / "ckpt", objective=lambda logits, batch: logits[:, -1, 0])
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


def test_a_manifest_without_shards_is_taken_over(get_model, tmp_path):
    model, batches, ckpt = get_model("gpt2"), make_batches(2), tmp_path / "ckpt"
    run(model, batches, ckpt)
    for shard in ckpt.glob("shard-*"):  # as if the first run had failed in its first batch
        shard.unlink()
    assert_same(run(model, batches, ckpt, intervention="mean", reference_batches=batches),
                run(model, batches, intervention="mean", reference_batches=batches))
    with pytest.raises(cd.IdentityMismatchError, match="the intervention or its reference data changed"):
        run(model, batches, ckpt)


def test_crash_leftovers_are_ignored_and_damaged_shards_scored_again(get_model, tmp_path):
    model, batches, ckpt = get_model("gpt2"), make_batches(), tmp_path / "ckpt"
    scorer = CountingEAP()
    plain = run(model, batches, ckpt, method=scorer)
    (ckpt / "shard-00001.safetensors").unlink()
    (ckpt / ".shard-00001.safetensors.tmp-99999").write_bytes(b"\x10\x00\x00\x00half a shard")  # torn temp file
    scorer._scored.clear()
    assert_same(run(model, batches, ckpt, method=scorer), plain)
    assert scorer._scored == [1]
    assert not list(ckpt.glob(".*.tmp-*"))  # the killed writer's temporary file is gone

    path = ckpt / "shard-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the scores: the checksum catches it
    path.write_bytes(bytes(data))
    scorer._scored.clear()
    with pytest.warns(UserWarning, match="shard-00003.safetensors.*damaged"):
        assert_same(run(model, batches, ckpt, method=scorer), plain)
    assert scorer._scored == [3]


SCRIPT = """
import sys, time
sys.path[:0] = [{src!r}, {tests!r}]
import torch
import circuitdiff as cd
from circuitdiff.scorers.eap import EAP
import test_resume


class SlowEAP(EAP):
    def score_batch(self, context, batch, batch_index):
        print("scoring", batch_index, flush=True)
        time.sleep(0.15)
        return super().score_batch(context, batch, batch_index)


model = cd.load_model(sys.argv[1], dtype=torch.float32, device="cpu")
graph = cd.AttributionGraph.from_model(model, level="head")
scores = cd.attribute(model, graph, test_resume.make_batches(12), objective="answer_nll", method=SlowEAP(),
                      progress=False, checkpoint_dir=sys.argv[2])
scores.save(sys.argv[3])
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_uninterrupted_result(checkpoints, get_model, tmp_path):
    script = tmp_path / "long_run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(src=str(SRC), tests=str(TESTS))))
    ckpt, out = tmp_path / "ckpt", tmp_path / "scores.cdiff"
    args = [sys.executable, str(script), str(checkpoints["gpt2"]), str(ckpt), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        for line in process.stdout:  # "scoring 3" is printed once shards 0, 1 and 2 are on disk
            if line.strip() == "scoring 3" or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = shards(ckpt)
    assert 3 <= len(finished) < 12 and not out.exists()

    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rescored = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("scoring")]
    assert rescored == list(range(len(finished), 12))  # finished shards were read, not scored again
    assert len(shards(ckpt)) == 12

    model = get_model("gpt2")
    uninterrupted = run(model, make_batches(12), level="head")
    assert_same(cd.EdgeScores.load(out), uninterrupted)  # exact (same CPU arithmetic in both processes)
