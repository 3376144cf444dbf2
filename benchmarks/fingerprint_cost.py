"""What a run's identity costs, against the attribution run it identifies.

Every ``cd.attribute`` call fingerprints the model once (``identity.model_identity``:
weights, config, tokenizer) and every batch (``identity.batch_fingerprint``); every cached
``generate_answers`` call fingerprints the model once. This script measures that work
side by side with the attribution it belongs to (medians of interleaved repeats) and
prints the ratio. Goal (issue 18): under 2% of an attribution run.

Cases:

- ``demo``: the bundled demo base model and a demo-sized scoring run (187 samples in
  batches of 32, prompt + 12 answer tokens, layer level, zero ablation: what
  ``circuitdiff demo`` scores per model);
- ``llama-512``: benchmarks/eap_overhead.py's Llama shape (d_model 256, 4 layers, vocab
  512), one batch of 8 x 64 tokens, head-level EAP: the identity against ONE batch;
- ``7b`` (CUDA only): the two 7B shapes of benchmarks/gpu_7b.py in bfloat16, one
  sample of 512 tokens, head-level EAP: the weights fingerprint against ONE pass, and
  how many such batches a run needs for the fingerprint to stay under 2%.

    python benchmarks/fingerprint_cost.py                 # demo and llama-512 (CPU)
    python benchmarks/fingerprint_cost.py --cases 7b      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import circuitdiff as cd  # noqa: E402
from circuitdiff.demo import DEMO_DATA  # noqa: E402
from circuitdiff.identity import batch_fingerprint, model_identity, weights_fingerprint  # noqa: E402

GOAL = 0.02


def median_times(runs: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved (one warm-up each)."""
    for run in runs.values():
        run()
        sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def identity_cost(model: Any, batches: list[cd.Batch]) -> None:
    """The identity work an attribute() call adds: the model once, every batch once."""
    model_identity(model)
    for batch in batches:
        batch_fingerprint(batch)


def demo_case(repeats: int) -> dict[str, float]:
    model = cd.load_model(DEMO_DATA / "base", device="cpu", dtype=torch.float32)
    graph = cd.AttributionGraph.from_model(model, level="layer")
    questions = cd.data.read_questions(DEMO_DATA / "questions.jsonl")[:187]
    g = torch.Generator().manual_seed(0)
    answers = [torch.randint(4, model.cfg.d_vocab, (12,), generator=g).tolist() for _ in questions]
    batches = cd.make_batches(model.tokenizer, [q.prompt for q in questions], answers, batch_size=32,
                              sample_ids=[q.id for q in questions])
    times = median_times({
        "identity": lambda: identity_cost(model, batches),
        "attribute": lambda: cd.attribute(model, graph, batches, objective="answer_nll", progress=False),
    }, repeats, lambda: None)
    return {**times, "ratio": times["identity"] / times["attribute"]}


def llama_case(repeats: int) -> dict[str, float]:
    from eap_overhead import Runner, build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(build_checkpoint("llama-512", Path(tmp)), "cpu", torch.float32)
    model, batch = runner.model, runner.batch
    graph = cd.AttributionGraph.from_model(model, level="head")
    times = median_times({
        "identity": lambda: identity_cost(model, [batch]),
        "attribute": lambda: cd.attribute(model, graph, [batch], objective="answer_nll", progress=False),
    }, repeats, lambda: None)
    return {**times, "ratio": times["identity"] / times["attribute"]}


def seven_b_case(repeats: int) -> dict[str, dict[str, float]]:
    from gpu_7b import MODELS, build_model, build_tokenizer, make_batch

    out = {}
    for name, shape in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = cd.load_model(build_model(shape, "cuda", torch.bfloat16),
                                  tokenizer=build_tokenizer(shape.vocab, Path(tmp)))
        graph = cd.AttributionGraph.from_model(model, level="head")
        batch = make_batch(shape.vocab, 512, 0.25, "cuda")
        times = median_times({
            "fingerprint": lambda: weights_fingerprint(model),
            "one pass": lambda: cd.attribute(model, graph, [batch], objective="answer_nll", progress=False),
        }, repeats, torch.cuda.synchronize)
        ratio = times["fingerprint"] / times["one pass"]
        out[name] = {**times, "ratio": ratio, "batches for 2%": ratio / GOAL}
        del model
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("demo", "llama-512", "7b"), default=["demo", "llama-512"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved "
          f"repeats; goal: identity <= {GOAL:.0%} of the run")
    if "demo" in args.cases:
        r = demo_case(args.repeats)
        print(f"demo (187 samples, 6 batches, layer level): identity {r['identity'] * 1e3:.1f} ms, attribute "
              f"{r['attribute']:.2f} s -> {r['ratio']:.2%}")
    if "llama-512" in args.cases:
        r = llama_case(args.repeats)
        print(f"llama-512 (one batch 8 x 64, head level): identity {r['identity'] * 1e3:.1f} ms, attribute "
              f"{r['attribute'] * 1e3:.0f} ms -> {r['ratio']:.2%} of a one-batch run")
    if "7b" in args.cases:
        if not torch.cuda.is_available():
            print("7b: skipped (needs a CUDA device)")
        else:
            for name, r in seven_b_case(args.repeats).items():
                print(f"{name} (bf16, 512 tokens, head level): weights fingerprint {r['fingerprint'] * 1e3:.0f} ms, "
                      f"one EAP pass {r['one pass'] * 1e3:.0f} ms -> {r['ratio']:.1%} of one batch; under 2% of a "
                      f"run from {r['batches for 2%']:.0f} batches on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
