"""``--dry-run``: what a pipeline run would do, without loading weights or generating.

:func:`describe_plan` resolves each model (a directory or a cached Hub id), reads its
``config.json`` and tokenizer, reads the questions, and estimates the attribution's peak
memory with :func:`circuitdiff.planner.estimate_memory` from the config alone, plus the
weights of the other model a comparison keeps loaded. The sequence length it plans for
is an upper bound: the longest prompt plus ``alpha * max_new_tokens`` answer tokens
(``T_cut = alpha * T_bar`` cannot exceed it). Generation's own memory (the KV cache of
``batch_size`` answers of up to ``max_new_tokens`` tokens) is not included. It refuses
what the run would refuse later: tokenizers that encode the prompts differently, and
prompts that do not fit the context with ``max_new_tokens``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from circuitdiff.engine.architectures import ModelShape, check_level
from circuitdiff.errors import DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hub import resolve_checkpoint
from circuitdiff.planner import GIB, METHODS, estimate_memory
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
        DataError: the tokenizers disagree, or a prompt does not fit the context.
    """
    from transformers import AutoTokenizer

    rows, shapes, encoded = [], [], {}
    for side, source in models.items():
        path = resolve_checkpoint(source)
        with open(path / "config.json", encoding="utf-8") as f:
            hf_config = json.load(f)
        shape = ModelShape.from_config(hf_config)
        check_level(shape.architecture, config.level)
        encoded[side] = AutoTokenizer.from_pretrained(path)([q.prompt for q in questions])["input_ids"]
        context = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
        too_long = [n for n in map(len, encoded[side]) if context and n + config.max_new_tokens > context]
        if too_long:
            raise DataError(f"{side}: {len(too_long)} of {len(questions)} prompts do not fit the context of {context} "
                            f"tokens with max_new_tokens={config.max_new_tokens}; lower max_new_tokens.")
        shapes.append((shape, hf_config))
        rows.append([side, str(source), str(path), shape.architecture,
                     f"{shape.n_layers} x {shape.n_heads} heads ({shape.n_kv_heads} kv), d_model {shape.d_model}",
                     f"{shape.parameter_bytes() / shape.element_size / 1e9:.2f} B"])
    first, *others = encoded.values()
    if any(list(map(list, e)) != list(map(list, first)) for e in others):
        raise DataError("the checkpoints' tokenizers encode the prompts differently; compare models of the same "
                        "tokenizer family.")
    longest = max(map(len, first), default=0)
    (shape, hf_config), *rest = shapes
    graph = AttributionGraph(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.parallel_blocks, config.level)
    seq_len = longest + max(1, math.floor(config.alpha * config.max_new_tokens))
    dtype = config.torch_dtype(config.resolved_device())
    planned = config.make_scorer() if config.scorer in METHODS else "eap"
    memory = estimate_memory(hf_config, graph, batch_size=config.batch_size, seq_len=seq_len, scorer=planned,
                             dtype=dtype)
    other_weights = sum(ModelShape.from_config(c, dtype).parameter_bytes() for _, c in rest)
    lines = ["# circuitdiff dry run (nothing loaded, nothing written)", "",
             markdown_table(["side", "given", "resolved", "architecture", "shape", "parameters"], rows), "",
             f"- questions: {len(questions)} from {questions_source}"
             + (f" (first {config.max_questions})" if config.max_questions else "")
             + f"; template {config.template!r}, grader {config.grader!r}; longest prompt {longest} tokens",
             f"- generation: greedy, at most {config.max_new_tokens} new tokens, batch {config.batch_size}, "
             f"{config.resolved_device()} in {str(dtype).removeprefix('torch.')}",
             f"- selection: rule {config.rule}, alpha {config.alpha}, beta {config.beta}, gamma {config.gamma}, "
             f"delta {config.delta}, n {config.n}, seed {config.seed}",
             f"- graph: {config.level} level, {graph.n_sources} sources x {graph.n_receivers} receivers, "
             f"{graph.n_edges:,} edges; scorer {config.scorer}, {config.intervention} ablation",
             f"- attribution peak memory, estimated for batch {config.batch_size} x {seq_len} tokens (longest prompt "
             f"+ alpha x max_new_tokens, an upper bound): **{_size(memory.total + other_weights)}**"
             + (f", the other model's weights ({_size(other_weights)}) included" if rest else "")
             + f" (a plain forward+backward: {_size(memory.plain)}); generation's KV cache is not counted",
             f"- output: {os.fspath(out)}"]
    if config.scorer not in METHODS:
        lines.append(f"- the memory model covers {', '.join(METHODS)}; {config.scorer} is estimated as eap (its "
                     "passes run without gradients, so this bounds them)")
    return "\n".join(lines)


def _size(n_bytes: int) -> str:
    """``"15.20 GiB"``, or ``"3.4 MiB"`` below a GiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"
