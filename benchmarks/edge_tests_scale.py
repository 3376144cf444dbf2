"""Time and memory of ``edge_tests`` on a 7B head-level graph, streamed from ``.cdiff`` files.

Writes two ``.cdiff`` files of synthetic per-sample scores (default: Llama-2-7B's shape,
``AttributionGraph(32, 32, 32)``, 1,592,881 real edges, 500 samples: 6.6 GB each). The
scores are never held whole in anonymous memory: each side is generated chunk by chunk
into a memory-mapped scratch file, and ``EdgeScores.save`` writes the file from that
mapping (``io.write_scores_file`` hashes it in blocks and safetensors writes from its
pointer). Base scores are a per-sample level plus per-edge level plus noise; tuned =
base + noise, plus a planted shift on 1% of the edges (``|d_z|`` uniform in
[0.05, 0.5], random sign), so the counts are not trivial.

Then both files are loaded memory-mapped (``EdgeScores.load(mmap=True)``, which verifies
their checksums: one read of each file, timed separately), and, ``--repeats`` times
interleaved, with ``torch.set_num_threads(--threads)``:

- (a) the I/O floor: every sample of both files copied chunk by chunk into a buffer
  (the same chunks ``edge_tests`` reads);
- (b) ``edge_tests(base, tuned)`` (paired).

It prints the medians, the ratio b / a, the peak anonymous memory (``RssAnon`` sampled
every 10 ms) and ``VmHWM``; memory-mapped file pages count in RSS and ``VmHWM`` but not
in ``RssAnon``: they are page cache, evictable, not memory the analysis holds. Timings
read the files from the page cache when both fit in RAM (printed). With ``--cold`` each
repeat first evicts them (``posix_fadvise(DONTNEED)`` after dropping the mappings), so the
load's checksum pass reads them from disk; (a) and (b) then read what the load brought
into the page cache, as ``load`` + ``edge_tests`` would in use ("end to end").

    python benchmarks/edge_tests_scale.py [--samples 500] [--layers 32 --heads 32 --kv-heads 32]
        [--repeats 3] [--threads 2] [--dir DIR] [--keep] [--cold] [--unpaired] [--plot volcano.png]
    python benchmarks/edge_tests_scale.py --samples 20 --layers 4   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import circuitdiff as cd
from circuitdiff.differential import CHUNK_VALUES, edge_tests
from circuitdiff.plots import plot_volcano

GB = 1e9


def proc_field(key: str, path: str = "/proc/self/status") -> int:
    """A ``/proc`` field in bytes (Linux), e.g. ``"RssAnon"``, ``"VmHWM"`` or, in ``/proc/meminfo``, ``"MemAvailable"``."""
    with open(path) as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in {path}: this benchmark needs Linux /proc.")


class PeakAnonymous:
    """Samples ``RssAnon`` every 10 ms while in use; ``peak`` is the largest value seen."""

    def __enter__(self) -> "PeakAnonymous":
        self.peak = proc_field("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, proc_field("RssAnon"))
            time.sleep(0.01)

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, proc_field("RssAnon"))


def write_pair(graph: cd.AttributionGraph, n: int, directory: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """Write base.cdiff and tuned.cdiff chunk by chunk through a memory-mapped scratch file.

    Returns the two paths and the planted shift per edge (0 where nothing was planted).
    """
    n_edges, cells = graph.n_edges, graph.n_sources * graph.n_receivers
    flat = torch.nonzero(graph.edge_mask.flatten()).flatten()
    g = torch.Generator().manual_seed(seed)
    edge_level = torch.randn(n_edges, generator=g)
    shift = torch.zeros(n_edges)
    planted = torch.randperm(n_edges, generator=g)[: max(1, n_edges // 100)]
    signs = torch.randint(0, 2, (planted.numel(),), generator=g) * 2.0 - 1.0
    noise_sd = 1.0  # SD of the per-sample differences tuned - base
    shift[planted] = signs * noise_sd * (0.05 + 0.45 * torch.rand(planted.numel(), generator=g))
    chunk = max(1, CHUNK_VALUES // n_edges)
    ids = [f"q{i}" for i in range(n)]
    scratch_path = directory / "scratch.f32"
    paths = []
    for side in ("base", "tuned"):
        scratch = np.memmap(scratch_path, dtype=np.float32, mode="w+", shape=(n, graph.n_sources, graph.n_receivers))
        rows = torch.from_numpy(scratch).view(n, cells)  # zero-filled: structural zeros stay 0
        total = torch.zeros(n_edges, dtype=torch.float64)
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            c = torch.Generator().manual_seed(seed * 1_000_003 + start)  # the same base draws for both sides
            values = torch.randn(k, 1, generator=c) * 2.0 + edge_level + torch.randn(k, n_edges, generator=c)
            if side == "tuned":
                values += noise_sd * torch.randn(k, n_edges, generator=c) + shift
            rows[start:start + k].index_copy_(1, flat, values)
            total += values.sum(0, dtype=torch.float64)
        mean = torch.zeros(cells)
        mean[flat] = (total / n).float()
        path = directory / f"{side}.cdiff"
        cd.EdgeScores(graph=graph, mean=mean.view(graph.n_sources, graph.n_receivers), per_sample=rows.view(scratch.shape),
                      objective_values=torch.zeros(n), metadata={"model_id": f"synthetic-{side}"},
                      sample_ids=ids).save(path)
        del rows, scratch
        gc.collect()
        paths.append(path)
    scratch_path.unlink()
    return paths[0], paths[1], shift.numpy()


def read_floor(scores: dict[str, cd.EdgeScores], chunk: int) -> None:
    """Copy every sample of both sides into a reused buffer, ``chunk`` samples at a time."""
    for side in scores.values():
        per_sample = side.per_sample
        buffer = torch.empty(min(chunk, side.n_samples), *per_sample.shape[1:], dtype=per_sample.dtype)
        for start in range(0, side.n_samples, chunk):
            part = per_sample[start:start + chunk]
            buffer[:part.shape[0]].copy_(part)


def evict(paths: tuple[Path, Path]) -> None:
    """Drop the files' pages from the page cache (they must not be mapped any more)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(run: Callable[[], Any]) -> tuple[float, Any, int]:
    """Seconds, result and peak RssAnon of ``run()``."""
    with PeakAnonymous() as memory:
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
    return elapsed, result, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Llama-2-7B has no GQA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder to write the files into (a new temporary folder inside it; default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the files instead of deleting them at the end")
    parser.add_argument("--cold", action="store_true",
                        help="evict the files from the page cache before each repeat's load")
    parser.add_argument("--unpaired", action="store_true", help="Welch t-tests instead of paired ones")
    parser.add_argument("--plot", type=Path, default=None, help="also time plot_volcano, writing this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    graph = cd.AttributionGraph(args.layers, args.heads, args.kv_heads or args.heads, level="head")
    n, n_edges, cells = args.samples, graph.n_edges, graph.n_sources * graph.n_receivers
    chunk = max(1, CHUNK_VALUES // n_edges)
    file_bytes = n * cells * 4
    print(f"graph: {args.layers} layers, {args.heads} heads ({args.kv_heads or args.heads} kv), head level: "
          f"{n_edges:,} edges, {cells:,} cells; {n} samples per model; {file_bytes / GB:.2f} GB per file; "
          f"{args.threads} threads; chunk {chunk} samples; {'unpaired' if args.unpaired else 'paired'}")
    directory = Path(tempfile.mkdtemp(prefix="edge_tests_scale-", dir=args.dir))
    paths = (directory / "base.cdiff", directory / "tuned.cdiff")
    try:
        start = time.perf_counter()
        with PeakAnonymous() as writing:
            _, _, shift = write_pair(graph, n, directory)
        print(f"wrote both files in {time.perf_counter() - start:.0f} s (peak RssAnon {writing.peak / GB:.2f} GB)")
        print(f"page cache: both files {2 * file_bytes / GB:.1f} GB, MemAvailable {proc_field('MemAvailable', '/proc/meminfo') / GB:.1f} GB; "
              f"{'evicted before each repeat (--cold)' if args.cold else 'warm when they fit'}")

        times: dict[str, list[float]] = {"load": [], "floor": [], "edge_tests": []}
        peak = 0
        scores: dict[str, cd.EdgeScores] = {}
        for repeat in range(args.repeats):
            scores, result = {}, None
            gc.collect()
            if args.cold:
                evict(paths)
            load_s, scores, _ = timed(lambda: {side: cd.EdgeScores.load(path, mmap=True)
                                               for side, path in zip(("base", "tuned"), paths)})
            gc.collect()
            floor_s, _, _ = timed(lambda: read_floor(scores, chunk))
            gc.collect()
            baseline = proc_field("RssAnon")
            tests_s, result, run_peak = timed(lambda: edge_tests(scores["base"], scores["tuned"],
                                                                 paired=not args.unpaired))
            peak = max(peak, run_peak)
            for name, value in (("load", load_s), ("floor", floor_s), ("edge_tests", tests_s)):
                times[name].append(value)
            print(f"repeat {repeat + 1}: load (checksums) {load_s:.2f} s, (a) read floor {floor_s:.2f} s, "
                  f"(b) edge_tests {tests_s:.2f} s; RssAnon before (b) {baseline / GB:.2f} GB, "
                  f"peak during (b) {run_peak / GB:.2f} GB")

        median = {name: statistics.median(values) for name, values in times.items()}
        counts = result.counts()
        found, planted = result.significant(), shift != 0
        print(f"medians: load {median['load']:.1f} s, (a) read floor {median['floor']:.1f} s, (b) edge_tests "
              f"{median['edge_tests']:.1f} s, b / a = {median['edge_tests'] / median['floor']:.2f}; "
              f"range of b {min(times['edge_tests']):.1f}-{max(times['edge_tests']):.1f} s; end to end (load + b) "
              f"{statistics.median(a + b for a, b in zip(times['load'], times['edge_tests'])):.1f} s")
        print(f"memory: peak RssAnon during (b) {peak / GB:.2f} GB; VmHWM {proc_field('VmHWM') / GB:.2f} GB "
              "(VmHWM counts the mapped file pages too)")
        print(f"result: {counts['significant']:,} of {counts['edges']:,} edges significant at FDR {result.fdr:g} "
              f"({counts['strengthened']:,} strengthened, {counts['weakened']:,} weakened); planted "
              f"{int(planted.sum()):,}, found {int((found & planted).sum()):,}, false discoveries "
              f"{int((found & ~planted).sum()):,} (FDP {(found & ~planted).sum() / max(found.sum(), 1):.3f})")
        start = time.perf_counter()
        result.to_markdown()
        print(f"to_markdown: {time.perf_counter() - start:.1f} s")
        if args.plot is not None:
            start = time.perf_counter()
            plot_volcano(result, args.plot)
            print(f"plot_volcano ({n_edges:,} points): {time.perf_counter() - start:.1f} s -> {args.plot}")
    finally:
        scores = result = None
        gc.collect()
        if args.keep:
            print(f"kept {paths[0]} and {paths[1]}")
        else:
            shutil.rmtree(directory)
    verdict = "yes" if median["edge_tests"] < 60 else "no"
    print(f"edge_tests: {median['edge_tests']:.1f} s median for {n_edges:,} edges x {n} samples "
          f"(< 60 s: {verdict}), peak anonymous memory {peak / GB:.2f} GB")


if __name__ == "__main__":
    main()
