"""Batched exact ablation against one forward pass per edge, side by side in one run.

Both measure the same thing, the objective of every sample of one batch with one edge
ablated, with the same hooks (:class:`circuitdiff.engine.ablation.EdgeAblation`):

- one forward per edge: a forward over the batch with that edge ablated in every
  sample (what a hand-written loop over edges does);
- batched: ``scorer=Exact(edges_per_forward=N)``, whose forward passes hold
  ``N`` (sample, edge) copies, so ``N / batch`` edges share a pass.

Prints the median time per edge of each (for the whole batch) and their ratio, per
model shape and batch size. Goal (issue 3): batched >= 10x faster per edge on a tiny
model.

    python benchmarks/exact_batched.py [--repeats 5] [--config tiny] [--batch 1 4] [--json out.json]

The gain is the fixed cost of a forward pass (Python, hooks, kernel launches) that the
copies share; it shrinks as the compute per copy grows (wider models on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import circuitdiff as cd  # noqa: E402
from circuitdiff.engine.ablation import EdgeAblation  # noqa: E402
from circuitdiff.scorers.exact import Exact  # noqa: E402

CONFIGS = {
    # The shape of the test suite's models (tests/tiny_models.py).
    "tiny": dict(vocab=40, d_model=32, n_layers=3, n_heads=4),
    # Wider, with a real-ish vocabulary: more compute per copy, so less to gain.
    "small": dict(vocab=512, d_model=64, n_layers=2, n_heads=4),
}
POS, ANSWER = 16, 4
EDGES_PER_FORWARD = (16, 64, 256)
NAIVE_EDGES = 40  # edges timed one forward each (per repeat)


def build_checkpoint(config: dict, directory: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab, d_model = config["vocab"], config["d_model"]
    hf_config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model,
                            num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                            num_key_value_heads=config["n_heads"] // 2, max_position_embeddings=POS + 1)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(directory)
    words = {f"t{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return directory


def make_batch(vocab: int, size: int, device: str) -> cd.Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (size, POS + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, : POS - ANSWER] = cd.IGNORE
    corrupted = torch.randint(0, vocab, (size, POS), generator=g)
    return cd.Batch(ids[:, :POS], labels=labels, corrupted_input_ids=corrupted).to(device)


def measure(model, batch: cd.Batch, args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Median seconds per edge (whole batch) of each way; the number of edges."""
    graph = cd.AttributionGraph.from_model(model, level=args.level)
    run = graph.bind(model, objective="answer_nll", intervention=args.intervention, progress=False)
    sources, receivers = torch.nonzero(graph.edge_mask, as_tuple=True)
    n_edges, size = int(sources.shape[0]), batch.size
    rows = torch.arange(size)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def naive_per_edge() -> float:
        """Median seconds of one forward over the batch with one edge ablated."""
        ablation = EdgeAblation(run, batch, 0, one_edge_per_copy=True)
        times = []
        for i in torch.linspace(0, n_edges - 1, NAIVE_EDGES).long().tolist():
            ablate = torch.zeros(size, graph.n_sources, graph.n_receivers, dtype=torch.bool)
            ablate[:, sources[i], receivers[i]] = True
            sync()
            start = time.perf_counter()
            ablation.losses(rows, ablate)
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def batched_per_edge(edges_per_forward: int) -> float:
        sync()
        start = time.perf_counter()
        cd.attribute(model, graph, [batch], objective="answer_nll", scorer=Exact(edges_per_forward),
                     intervention=args.intervention, progress=False)
        sync()
        return (time.perf_counter() - start) / n_edges

    results: dict[str, list[float]] = {"one forward per edge": []}
    results |= {f"batched, {n} copies/forward": [] for n in EDGES_PER_FORWARD}
    with run:
        naive_per_edge()  # warm-up
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
            results["one forward per edge"].append(naive_per_edge())
            for n in EDGES_PER_FORWARD:
                results[f"batched, {n} copies/forward"].append(batched_per_edge(n))
    return {name: statistics.median(times) for name, times in results.items()}, n_edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="samples per batch")
    parser.add_argument("--level", choices=["head", "layer"], default="head")
    parser.add_argument("--intervention", default="patching")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    print(f"{args.level} level, {args.intervention}, {POS} tokens, {args.device}, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved repeats; goal: batched >= 10x faster per edge")
    report = []
    for name in CONFIGS if args.config == "all" else [args.config]:
        config = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            model = cd.load_model(build_checkpoint(config, Path(tmp)), device=args.device, dtype=torch.float32)
        for size in args.batch:
            medians, n_edges = measure(model, make_batch(config["vocab"], size, args.device), args)
            naive = medians["one forward per edge"]
            print(f"\n{name}: Llama {config['n_layers']} layers, d_model {config['d_model']}, "
                  f"{config['n_heads']} heads, vocab {config['vocab']}; {n_edges} edges; batch {size}")
            print(f"  {'method':<30} {'ms per edge':>12} {'speed-up':>9}")
            for method, t in medians.items():
                print(f"  {method:<30} {t * 1e3:>12.3f} {naive / t:>8.1f}x")
            report.append({"config": name, **config, "batch": size, "n_edges": n_edges,
                           "medians_s_per_edge": medians})
    if args.json:
        args.json.write_text(json.dumps({"level": args.level, "intervention": args.intervention,
                                         "device": args.device, "results": report}, indent=2))


if __name__ == "__main__":
    main()
