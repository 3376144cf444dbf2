"""Data-parallel scaling of ``circuitdiff.distributed.attribute`` on CPU.

Samples per second of 1 process x 1 thread against N processes x 1 thread each
(``python -m torch.distributed.run --standalone``, gloo), on a random Llama big enough
that compute dominates (d_model 512, 8 layers, 8 heads, 128-token samples, vocabulary
512), head-level EAP with zero ablation and per-sample scores. The time covers scoring
and the gather of per-sample scores, after one warm-up call; not process start or
model loading. Runs alternate between 1 and N processes; the medians are printed with
their ratio. Goal (issue 7): >= 1.6x for 2 processes.

    python benchmarks/distributed_scaling.py                  # 2 processes, 3 repeats
    python benchmarks/distributed_scaling.py --nproc 4 --repeats 5 --batches 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D_MODEL, N_LAYERS, N_HEADS, VOCAB, POS, ANSWER, BATCH = 512, 8, 8, 512, 128, 8, 4


def build_checkpoint(directory: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=4 * D_MODEL,
                         num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
                         max_position_embeddings=POS + 1, initializer_range=0.05)
    LlamaForCausalLM(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return directory


def worker(checkpoint: Path, n_batches: int, out: Path) -> None:
    """Runs in every process of one torchrun launch."""
    import torch.distributed as dist

    import circuitdiff as cd
    import circuitdiff.distributed as cdd

    torch.set_num_threads(1)
    model = cd.load_model(checkpoint, device="cpu", dtype=torch.float32)
    graph = cd.AttributionGraph.from_model(model, level="head")
    g = torch.Generator().manual_seed(0)
    n = n_batches * BATCH
    ids = torch.randint(0, VOCAB - 1, (n, POS + 1), generator=g).tolist()
    batches = cd.make_batches(model.tokenizer, [r[: POS + 1 - ANSWER] for r in ids],
                              [r[POS + 1 - ANSWER:] for r in ids], batch_size=BATCH, add_special_tokens=False)
    kwargs = dict(objective="answer_nll", intervention="zero", progress=False)
    cdd.init_process_group("cpu")
    world = dist.get_world_size()
    cdd.attribute(model, graph, batches[:world], **kwargs)  # warm-up: one batch per rank
    dist.barrier()
    start = time.perf_counter()
    scores = cdd.attribute(model, graph, batches, **kwargs)
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"processes": world, "samples": scores.n_samples, "seconds": elapsed}))


def launch(nproc: int, checkpoint: Path, n_batches: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", str(checkpoint), "--batches", str(n_batches), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help=f"batches of {BATCH} samples")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.batches, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="circuitdiff-dist-bench-") as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "model")
        rates: dict[int, list[float]] = {1: [], args.nproc: []}
        for repeat in range(args.repeats):
            for nproc in (1, args.nproc):
                result = launch(nproc, checkpoint, args.batches, Path(tmp) / f"result-{nproc}-{repeat}.json")
                rates[nproc].append(result["samples"] / result["seconds"])
                print(f"repeat {repeat}: {nproc} process(es) x 1 thread: {result['samples']} samples in "
                      f"{result['seconds']:.2f} s = {rates[nproc][-1]:.2f} samples/s", flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.nproc])
    print(f"\nLlama d_model {D_MODEL}, {N_LAYERS} layers, {POS}-token samples, batch {BATCH}, "
          f"{args.batches} batches, head-level EAP, zero ablation, per-sample scores")
    print(f"median samples/s: 1 x 1 thread {one:.2f}, {args.nproc} x 1 thread {many:.2f}; "
          f"ratio {many / one:.2f}x (goal for 2 processes: >= 1.6x)")


if __name__ == "__main__":
    main()
