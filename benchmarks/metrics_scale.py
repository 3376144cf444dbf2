"""Memory and time of ``cd.compare`` on a 7B-size head-level graph, streamed from files.

Writes two ``.cdiff`` files of random per-sample scores (base, and tuned = 1.1 x base +
noise), then loads both memory-mapped and runs ``cd.compare``, sampling the process's
anonymous (non-file) resident memory every 10 ms. Prints, side by side:

- the size of the per-sample scores of one model (what an in-memory analysis holds),
- the peak anonymous memory added during ``compare`` (what the streaming analysis held),
- their ratio, and the time.

Memory-mapped pages that the OS has read in count as file cache, not as anonymous
memory: they are evictable, so they are not memory the analysis needs.

    python benchmarks/metrics_scale.py [--samples 100] [--layers 32 --heads 32 --kv-heads 8] [--no-breakdown]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from pathlib import Path

import torch

import circuitdiff as cd


def anonymous_rss() -> int:
    """Bytes of anonymous resident memory of this process (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found: this benchmark needs Linux /proc.")


def write_pair(graph: cd.AttributionGraph, n: int, directory: Path) -> tuple[Path, Path]:
    paths = []
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, graph.n_sources, graph.n_receivers, generator=g) * graph.edge_mask
    for name, scores in (("base", base), ("tuned", 1.1 * base + 0.1 * torch.randn(base.shape, generator=g))):
        scores = scores * graph.edge_mask
        path = directory / f"{name}.cdiff"
        cd.EdgeScores(graph=graph, mean=scores.mean(0), per_sample=scores, objective_values=torch.zeros(n)).save(path)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: circuitdiff's own choice")
    args = parser.parse_args()

    graph = cd.AttributionGraph(args.layers, args.heads, args.kv_heads, level="head")
    with tempfile.TemporaryDirectory() as tmp:
        base_path, tuned_path = write_pair(graph, args.samples, Path(tmp))
        gc.collect()
        base = cd.EdgeScores.load(base_path, mmap=True)
        tuned = cd.EdgeScores.load(tuned_path, mmap=True)
        before = anonymous_rss()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], anonymous_rss())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        result = cd.compare(base, tuned, breakdown=not args.no_breakdown, chunk_size=args.chunk_size,
                            n_resamples=1000)
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    one_model = args.samples * graph.n_sources * graph.n_receivers * 4
    added = peak[0] - before
    print(f"graph: {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), head level: {graph.n_edges:,} edges, "
          f"{graph.n_sources * graph.n_receivers:,} cells; {args.samples} samples per model; "
          f"breakdown {'off' if args.no_breakdown else 'on'} ({len(result.groups)} groups); chunk {args.chunk_size}")
    print(f"per-sample scores of one model (float32): {one_model / 2**20:,.0f} MiB")
    print(f"peak anonymous memory added by compare:   {added / 2**20:,.0f} MiB ({added / one_model:.2f}x one model)")
    print(f"time: {elapsed:.1f} s")
    print(f"intensity change {result.get('intensity').percent_change:+.1f}% (expected about +10%)")


if __name__ == "__main__":
    main()
