"""How far are bfloat16 EAP scores from float32 ones, for circuitdiff and for TransformerLens's flags path?

    python benchmarks/bf16_accuracy.py [--layers 4 --d-model 256 --tokens 128 --device cpu]

For a random Llama (no GQA) and a random Qwen2 (GQA) of the given size, the same weights
are scored in float32 and in bfloat16, at layer and head level, by circuitdiff's EAP (with
its default float32 contraction and with ``contraction_dtype=torch.bfloat16``) and by the
EAP-IG-style pass on TransformerLens's split-qkv / attn-result / mlp-in flags
(``gpu_7b.tl_flags_pass``). Printed: the relative Frobenius difference of each run's mean
scores from circuitdiff's float32 scores. On CPU (one thread) it takes about a minute; with
``--device cuda`` it checks the GPU's bfloat16 products (cuBLAS) too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_7b  # noqa: E402

import circuitdiff as cd  # noqa: E402

LEVELS = ("layer", "head")


def mean_scores(shape: gpu_7b.Shape, dtype: torch.dtype, tokens: int, tmp: Path,
                device: str) -> dict[tuple[str, str], torch.Tensor]:
    """``{(path, level): mean scores}`` for path in ("circuitdiff", "circuitdiff-bf16-contraction", "tl-flags")."""
    model = cd.load_model(gpu_7b.build_model(shape, device, dtype), tokenizer=gpu_7b.build_tokenizer(shape.vocab, tmp),
                          device=device)
    batch = gpu_7b.make_batch(shape.vocab, tokens, 0.25, device)
    objective = cd.objectives.answer_nll()
    graphs = {level: cd.AttributionGraph.from_model(model, level=level) for level in LEVELS}
    out = {}
    for level in LEVELS:
        out["circuitdiff", level] = gpu_7b.eap_pass(model, graphs[level], batch, objective, {}).mean.float()
        out["circuitdiff-bf16-contraction", level] = gpu_7b.eap_pass(
            model, graphs[level], batch, objective, {"contraction_dtype": torch.bfloat16}).mean.float()
    model.set_use_split_qkv_input(True)  # circuitdiff refuses such a bridge, so its passes come first
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    for level in LEVELS:
        scores = gpu_7b.tl_flags_pass(model, graphs[level], batch, objective)
        out["tl-flags", level] = scores.float() / batch.input_ids.shape[0]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    d = args.d_model
    shapes = {"llama": gpu_7b.Shape("llama", args.layers, d, d // 32, d // 32, 4 * d, 512),
              "qwen2": gpu_7b.Shape("qwen2", args.layers, d, d // 32, 2, 4 * d, 512)}
    print("| model | level | cd bf16 vs cd f32 | cd bf16, bf16 contraction vs cd f32 | cd f32, bf16 contraction "
          "vs cd f32 | TL bf16 vs cd f32 | TL f32 vs cd f32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, shape in shapes.items():
        with tempfile.TemporaryDirectory() as tmp:
            full = mean_scores(shape, torch.float32, args.tokens, Path(tmp), args.device)
            half = mean_scores(shape, torch.bfloat16, args.tokens, Path(tmp), args.device)
        for level in LEVELS:
            reference = full["circuitdiff", level]

            def rel(x: torch.Tensor) -> str:
                return f"{((x - reference).norm() / reference.norm()).item():.2e}"

            contraction = "circuitdiff-bf16-contraction", level
            print(f"| {name} | {level} | {rel(half['circuitdiff', level])} | {rel(half[contraction])} | "
                  f"{rel(full[contraction])} | {rel(half['tl-flags', level])} | {rel(full['tl-flags', level])} |")


if __name__ == "__main__":
    main()
