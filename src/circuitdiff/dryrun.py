"""``--dry-run``: what a pipeline run would do, without loading weights or generating.

:func:`describe_plan` resolves each model (a directory or a cached Hub id), reads its
``config.json`` and tokenizer, reads the questions, and estimates the attribution's peak
memory with :func:`circuitdiff.planner.estimate_memory` from the config alone. The
sequence length it plans for is an upper bound: the longest prompt plus
``alpha * max_new_tokens`` answer tokens (``T_cut = alpha * T_bar`` cannot exceed it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from circuitdiff.engine.architectures import ModelShape, check_level
from circuitdiff.graph import AttributionGraph
from circuitdiff.hub import resolve_checkpoint
from circuitdiff.planner import GIB, estimate_memory
from circuitdiff.report import markdown_table

__all__ = ["describe_plan"]


def describe_plan(models: dict[str, str | os.PathLike[str]], questions: list[Any], config: Any,
                  questions_source: str, out: str | os.PathLike[str]) -> str:
    """A markdown plan of a run: the models, the questions, the graph and the memory estimate.

    Args:
        models: side (``"base"``, ``"tuned"``, ``"model"``) -> directory or Hub id.
        questions: the questions the run would ask (:class:`circuitdiff.data.Question`),
            their prompts rendered with the run's template.
        config: the run's :class:`circuitdiff.pipeline.PipelineConfig` (validated).
        questions_source: where the questions come from, for the plan's text.
        out: the output directory (not created).

    Raises:
        MissingPathError: a model is neither a directory nor cached.
        UnsupportedModelError: a model cannot be attributed at the run's level.
    """
    from transformers import AutoTokenizer

    rows, shapes, longest = [], {}, 0
    for side, source in models.items():
        path = resolve_checkpoint(source)
        with open(path / "config.json", encoding="utf-8") as f:
            hf_config = json.load(f)
        shape = ModelShape.from_config(hf_config)
        check_level(shape.architecture, config.level)
        tokenizer = AutoTokenizer.from_pretrained(path)
        lengths = [len(ids) for ids in tokenizer([q.prompt for q in questions])["input_ids"]]
        longest = max(longest, *lengths)
        shapes[side] = (shape, hf_config)
        rows.append([side, str(source), str(path), shape.architecture,
                     f"{shape.n_layers} x {shape.n_heads} heads ({shape.n_kv_heads} kv), d_model {shape.d_model}",
                     f"{shape.parameter_bytes() / shape.element_size / 1e9:.2f} B"])
    shape, hf_config = next(iter(shapes.values()))
    graph = AttributionGraph(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.parallel_blocks, config.level)
    seq_len = longest + max(1, math.floor(config.alpha * config.max_new_tokens))
    dtype = config.torch_dtype(config.resolved_device())
    memory = estimate_memory(hf_config, graph, batch_size=config.batch_size, seq_len=seq_len,
                             scorer=config.scorer if config.scorer in ("eap", "eap-ig-inputs", "eap-ig-activations")
                             else "eap", dtype=dtype, positions_per_pass=config.positions_per_pass)
    lines = ["# circuitdiff dry run (nothing loaded, nothing written)", "",
             markdown_table(["side", "given", "resolved", "architecture", "shape", "parameters"], rows), "",
             f"- questions: {len(questions)} from {questions_source}"
             + (f" (first {config.max_questions})" if config.max_questions else "")
             + f"; template {getattr(config, 'template', 'plain')!r}; longest prompt {longest} tokens",
             f"- generation: greedy, at most {config.max_new_tokens} new tokens, batch {config.batch_size}, "
             f"{config.resolved_device()} in {str(dtype).removeprefix('torch.')}",
             f"- selection: rule {config.rule}, alpha {config.alpha}, beta {config.beta}, gamma {config.gamma}, "
             f"delta {config.delta}, n {config.n}, seed {config.seed}",
             f"- graph: {config.level} level, {graph.n_sources} sources x {graph.n_receivers} receivers, "
             f"{graph.n_edges:,} edges; scorer {config.scorer}, {config.intervention} ablation",
             f"- attribution peak memory, estimated for batch {config.batch_size} x {seq_len} tokens (longest prompt "
             f"+ alpha x max_new_tokens, an upper bound): **{memory.total / GIB:.2f} GiB** (a plain "
             f"forward+backward: {memory.plain / GIB:.2f} GiB)",
             f"- output: {os.fspath(out)}"]
    if config.scorer not in ("eap", "eap-ig-inputs", "eap-ig-activations"):
        lines.append(f"- the memory model covers eap and eap-ig; {config.scorer} is estimated as eap (its batch is "
                     "a forward pass per edge, without gradients, so this is an upper bound)")
    return "\n".join(lines)

