"""circuitdiff.distributed: data-parallel attribution under torchrun equals one process.

The main test launches this file as a script under ``python -m torch.distributed.run
--nproc_per_node 2`` (gloo, one torch thread per process) on a tiny float64 Llama and
compares what rank 0 gathered with single-process ``cd.attribute`` runs. Tolerances:
per-sample scores and objective values are the same computation on the same batches and
are compared at rtol=1e-6 (float32 storage; only thread counts differ); the mean is a
float32 result of a float64 sum in another order (rtol=1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow  # launches torchrun processes


def _data(tokenizer, n: int, seed: int, bad_sample: int | None = None, contrast: bool = False):
    import circuitdiff as cd
    import tiny_models

    ids = tiny_models.random_ids(n, 6, seed=seed).tolist()
    prompts = [row[: 2 + i % 3] for i, row in enumerate(ids)]  # lengths differ: padding inside batches
    answers = [row[4:] for row in ids]
    if bad_sample is not None:
        prompts[bad_sample] = [tiny_models.VOCAB + 5]
    wrong = [[(t + 1) % 30 for t in a] for a in answers] if contrast else None
    return cd.make_batches(tokenizer, prompts, answers, contrast_answers=wrong, batch_size=2)


CASES = {  # name: (number of samples, attribute kwargs); batches of 2
    "zero": (9, dict(objective="answer_nll", intervention="zero")),  # 5 batches: ranks get 3 and 2
    "mean_no_per_sample": (7, dict(objective="answer_nll", intervention="mean-positional", per_sample=False)),
    "one_batch_idle_rank": (2, dict(objective="logit_diff", intervention="zero")),
}


def _worker(checkpoint: Path, out: Path) -> None:
    """Runs in every torchrun process."""
    import circuitdiff as cd
    import circuitdiff.distributed as cdd
    import tiny_models

    torch.set_num_threads(1)
    model = cd.load_model(checkpoint, dtype=torch.float64, device="cpu")
    tiny_models.float64_throughout(model)
    graph = cd.AttributionGraph.from_model(model, level="head")
    rank = int(os.environ["RANK"])
    reference = _data(model.tokenizer, 5, seed=7)
    for name, (n, kwargs) in CASES.items():
        batches = _data(model.tokenizer, n, seed=1, contrast=kwargs["objective"] == "logit_diff")
        if kwargs["intervention"].startswith("mean"):
            kwargs = {**kwargs, "reference_batches": reference}
        scores = cdd.attribute(model, graph, batches, **kwargs)
        if rank == 0:
            scores.save(out / f"{name}.cdiff")
    assert cdd.attribute(model, graph, _data(model.tokenizer, 4, seed=1), objective="answer_nll", dst=1,
                         progress=False) is None or rank == 1
    errors = {}
    try:  # each rank passes a different (sharded) reference set
        cdd.attribute(model, graph, _data(model.tokenizer, 4, seed=1), objective="answer_nll",
                      intervention="mean", reference_batches=_data(model.tokenizer, 2, seed=10 + rank))
    except Exception as exc:
        errors["sharded_reference"] = f"{type(exc).__name__}: {exc}"
    try:  # batch 1 (rank 1's first) holds a token id outside the vocabulary
        cdd.attribute(model, graph, _data(model.tokenizer, 4, seed=1, bad_sample=2), objective="answer_nll")
    except Exception as exc:
        errors["bad_batch"] = f"{type(exc).__name__}: {exc}"
    (out / f"errors{rank}.json").write_text(json.dumps(errors))


@pytest.fixture(scope="module")
def launched(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), str(checkpoints["llama"]), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(launched, get_model, name):
    import circuitdiff as cd

    model = get_model("llama", "float64")
    graph = cd.AttributionGraph.from_model(model, level="head")
    n, kwargs = CASES[name]
    batches = _data(model.tokenizer, n, seed=1, contrast=kwargs["objective"] == "logit_diff")
    if kwargs["intervention"].startswith("mean"):
        kwargs = {**kwargs, "reference_batches": _data(model.tokenizer, 5, seed=7)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = cd.attribute(model, graph, batches, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)
    gathered = cd.EdgeScores.load(launched / f"{name}.cdiff")
    assert gathered.metadata["world_size"] == 2 and gathered.metadata["n_samples"] == n
    assert gathered.metadata["intervention"] == single.metadata["intervention"]
    assert gathered.sample_ids == single.sample_ids and gathered.metadata["sample_ids"] == "given"
    assert gathered.metadata["identity"] == single.metadata["identity"]  # the same run, whatever the processes
    scale = float(single.mean.abs().max())
    torch.testing.assert_close(gathered.objective_values, single.objective_values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gathered.mean, single.mean, rtol=1e-6, atol=1e-7 * scale)
    assert (gathered.per_sample is None) == (single.per_sample is None)
    if single.per_sample is not None:
        torch.testing.assert_close(gathered.per_sample, single.per_sample, rtol=1e-6, atol=1e-7 * scale)


def test_errors_reach_every_rank(launched):
    errors = [json.loads((launched / f"errors{rank}.json").read_text()) for rank in (0, 1)]
    for rank in (0, 1):
        assert errors[rank]["sharded_reference"].startswith("DataError: the replacement means differ")
        assert "whole reference_batches" in errors[rank]["sharded_reference"]
    assert errors[1]["bad_batch"].startswith("DataError: batch 0")  # rank 1's own error
    assert errors[0]["bad_batch"].startswith("DistributedError: distributed attribution failed while scoring")
    assert "rank 1" in errors[0]["bad_batch"] and "batches [1] of 2" in errors[0]["bad_batch"]


def test_without_torchrun_it_is_plain_attribute(get_model, monkeypatch):
    import circuitdiff as cd
    import circuitdiff.distributed as cdd

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = _data(model.tokenizer, 3, seed=1)
    plain = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    other = cdd.attribute(model, graph, iter(batches), objective="answer_nll", progress=False)
    assert torch.equal(plain.per_sample, other.per_sample) and "world_size" not in other.metadata


def test_group_disagreeing_with_torchrun_is_refused(get_model, monkeypatch):
    import torch.distributed as dist

    import circuitdiff as cd
    import circuitdiff.distributed as cdd

    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="world_size 1 but the environment says WORLD_SIZE=2"):
            cdd.attribute(model, graph, _data(model.tokenizer, 2, seed=1), objective="answer_nll")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
