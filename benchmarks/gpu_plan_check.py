"""Does ``cd.plan_batch_size`` pick a batch that fits, on a real GPU?

    python benchmarks/gpu_plan_check.py [--json out.json]     # on a CUDA machine (run_gpu_7b.sh sets it up)

For the Qwen2.5-7B shape (random bf16 weights, built on the GPU) at 2048 tokens, layer and
head level: ``plan_batch_size`` with its default budget (90% of free memory + weights), then
one ``cd.attribute`` (EAP, zero ablation, answer_nll on the last quarter) at that batch
size. Printed: the planned batch, the planner's estimate, the measured peak
(``torch.cuda.max_memory_allocated``) and the device's memory. The batch fits if the run
completes without running out of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_7b  # noqa: E402

import circuitdiff as cd  # noqa: E402

GIB = 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-7b", choices=list(gpu_7b.MODELS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = gpu_7b.MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        model = cd.load_model(gpu_7b.build_model(shape, "cuda", torch.bfloat16),
                              tokenizer=gpu_7b.build_tokenizer(shape.vocab, Path(tmp)), device="cuda")
    objective = cd.objectives.answer_nll()
    answer = args.seq // 4
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    print("| model | level | tokens | planned batch | estimate | measured peak | device memory |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for level in ("layer", "head"):
        graph = cd.AttributionGraph.from_model(model, level=level)
        torch.cuda.empty_cache()
        batch_size = cd.plan_batch_size(model, graph, seq_len=args.seq, loss_positions=answer)
        estimate = cd.estimate_memory(model, graph, batch_size=batch_size, seq_len=args.seq,
                                      loss_positions=answer).total
        batch = gpu_7b.make_batch(shape.vocab, args.seq, 0.25, "cuda", batch_size=batch_size)
        torch.cuda.reset_peak_memory_stats()
        try:
            cd.attribute(model, graph, [batch], objective=objective, progress=False)
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
        except torch.cuda.OutOfMemoryError:
            measured = None
        del batch
        rows.append({"model": args.model, "level": level, "tokens": args.seq, "planned_batch": batch_size,
                     "estimate_bytes": estimate, "measured_bytes": measured, "device_bytes": total})
        print(f"| {args.model} | {level} | {args.seq} | {batch_size} | {estimate / GIB:.1f} GiB | "
              + (f"{measured / GIB:.1f} GiB" if measured else "OOM") + f" | {total / GIB:.1f} GiB |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
