"""The memory planner: estimates against measured peaks (CPU profiler, H200), and plan_batch_size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
from circuitdiff.planner import MemoryPlanError, ModelShape, estimate_memory, measure_peak, plan_batch_size
import tiny_models as tm
from tiny_models import TINY_SHAPES, Shape, build_model, build_tokenizer

GIB = 2**30

# Measured on an NVIDIA H200, bfloat16, batch 1, answer_nll on the last quarter of the tokens:
# benchmarks/results/gpu_7b_h200_2026-11-27.json ("eap"/"plain" peak_bytes,
# torch.cuda.max_memory_allocated, weights included). Measurements, not outputs of this code.
H200_PEAKS = {  # (model, level, tokens): (eap peak, plain peak)
    ("deepseek-math-7b", "layer", 512): (18242442752, 17569473024),
    ("deepseek-math-7b", "head", 512): (27020031488, 17569473024),
    ("deepseek-math-7b", "layer", 2048): (49790819840, 47257425920),
    ("deepseek-math-7b", "head", 2048): (82685672960, 47257425920),
    ("qwen2.5-7b", "layer", 512): (19799820800, 19282317824),
    ("qwen2.5-7b", "head", 512): (25417500672, 19282317824),
    ("qwen2.5-7b", "layer", 2048): (48097617920, 46027698176),
    ("qwen2.5-7b", "head", 2048): (70297221120, 46027698176),
}
H200_WEIGHT_BYTES = {"deepseek-math-7b": 13820731392, "qwen2.5-7b": 15231233024}

SHAPES_7B = {
    "deepseek-math-7b": ModelShape("LlamaForCausalLM", 30, 32, 32, 4096, 128, 11008, 102400, torch.bfloat16),
    "qwen2.5-7b": ModelShape("Qwen2ForCausalLM", 28, 28, 4, 3584, 128, 18944, 152064, torch.bfloat16,
                             qkv_bias=True),
}


@pytest.mark.parametrize("key", sorted(H200_PEAKS))
def test_7b_estimates_match_h200_measurements(key):
    name, level, tokens = key
    # measured before fused attention was the default: the bridge's eager attention
    est = estimate_memory(SHAPES_7B[name], level, batch_size=1, seq_len=tokens, loss_positions=tokens // 4,
                          fused_attention=False)
    eap, plain = H200_PEAKS[key]
    assert est.weights == H200_WEIGHT_BYTES[name]
    assert abs(est.total / eap - 1) < 0.20, (est.total / GIB, eap / GIB)
    assert abs(est.plain / plain - 1) < 0.20, (est.plain / GIB, plain / GIB)


def test_7b_shape_from_hf_config_needs_no_weights():
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    shape = ModelShape.from_config(config, dtype=torch.bfloat16)
    assert shape == SHAPES_7B["qwen2.5-7b"]
    assert shape.parameter_bytes() == H200_WEIGHT_BYTES["qwen2.5-7b"]


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_weight_bytes_from_config_match_the_model(arch):
    from transformers import AutoModelForCausalLM

    from tiny_models import hf_config

    config = hf_config(arch)
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    shape = ModelShape.from_config(config, dtype=torch.float32)
    assert shape.parameter_bytes() == sum(p.numel() * 4 for p in model.parameters())


def test_estimate_linear_in_batch_and_in_seq_with_fused_attention_only():
    shape = SHAPES_7B["deepseek-math-7b"]
    one, two, three = (estimate_memory(shape, "head", batch_size=b, seq_len=512) for b in (1, 2, 3))
    assert two.total - one.total == three.total - two.total > 0  # linear in the batch size
    assert one.source_buffer * 2 == two.source_buffer
    for fused in (True, False):
        short, long = (estimate_memory(shape, "head", batch_size=1, seq_len=p, fused_attention=fused)
                       for p in (512, 1024))
        assert long.source_buffer == 2 * short.source_buffer
        if fused:  # the default: nothing pos^2
            assert long.saved_activations == 2 * short.saved_activations
        else:  # the eager pos^2 attention probabilities
            assert long.saved_activations > 2 * short.saved_activations
            assert long.total - long.weights > 2 * (short.total - short.weights)
    assert "peak" in str(one) and "source buffer" in one.to_markdown() and "fused attention" in one.to_markdown()


def test_plan_batch_size_picks_largest_fitting_batch():
    shape = SHAPES_7B["qwen2.5-7b"]
    budget = 80 * GIB
    best = plan_batch_size(shape, "layer", seq_len=512, max_memory=budget)
    fits = [estimate_memory(shape, "layer", batch_size=b, seq_len=512).total <= budget for b in range(1, best + 2)]
    assert all(fits[:best]) and not fits[best]
    assert plan_batch_size(shape, "layer", seq_len=512, max_memory=2 * budget) >= best  # monotonic
    assert plan_batch_size(shape, "head", seq_len=512, max_memory=budget) <= best


def test_batch_one_does_not_fit_names_the_alternatives():
    shape = SHAPES_7B["deepseek-math-7b"]
    with pytest.raises(MemoryPlanError) as info:
        plan_batch_size(shape, "head", seq_len=2048, max_memory=50 * GIB)
    text = str(info.value)
    assert "batch size 1 does not fit" in text and "layer-level" in text and "fits" in text
    assert "at most" in text and "tokens" in text and "chunking" in text
    assert isinstance(info.value, cd.DataError) and "fused attention" not in text  # already the default
    with pytest.raises(MemoryPlanError, match=r"fused attention, the default: .* \(fits;"):  # 55.7 GiB
        plan_batch_size(shape, "head", seq_len=2048, max_memory=60 * GIB, fused_attention=False)
    with pytest.raises(ValueError, match="max_memory is required"):
        plan_batch_size(_cpu_model("tiny-llama"), "head", seq_len=16)


# ---------------------------------------------------------------------------- CPU peaks
_MODELS: dict[str, object] = {}
CPU_SHAPES = {
    "tiny-llama": TINY_SHAPES["tiny-llama"],
    "tiny-qwen2": TINY_SHAPES["tiny-qwen2"],
    "llama-256": Shape("llama", 4, 256, 8, 4, 512, 512),
}


def _cpu_model(name: str):
    if name not in _MODELS:
        import tempfile

        shape = CPU_SHAPES[name]
        hf = build_model(shape, "cpu", torch.float32)
        tokenizer = build_tokenizer(shape.vocab, Path(tempfile.mkdtemp(prefix="cd-planner-")))
        _MODELS[name] = cd.load_model(hf, tokenizer=tokenizer, device="cpu")
    return _MODELS[name]


def cpu_answer_batch(name: str | int, batch: int, tokens: int) -> cd.Batch:
    """Random tokens of model ``name``'s vocabulary (or of a vocabulary of that size), the last quarter the answer."""
    vocab = name if isinstance(name, int) else CPU_SHAPES[name].vocab
    ids = torch.randint(0, vocab, (batch, tokens + 1), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 1:].clone()
    labels[:, : tokens - tokens // 4] = cd.IGNORE
    return cd.Batch(ids[:, :tokens], labels=labels)


def cpu_peak(model, run) -> int:
    """Parameter bytes + the CPU profiler's allocation peak of ``run()``, after one warm-up call."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    run()  # warm-up
    return measure_peak(run, "cpu", baseline_bytes=weights)


def planned_and_measured_peak(name: str, level: str, batch: int, tokens: int, **eap_options) -> tuple[int, int]:
    """(planner estimate, CPU profiler peak) of one EAP batch with ``eap_options``; they must agree within 30%."""
    model = _cpu_model(name)
    graph = cd.AttributionGraph.from_model(model, level=level)
    data = cpu_answer_batch(name, batch, tokens)
    method = cd.scorers.get("eap", **eap_options)
    measured = cpu_peak(model, lambda: cd.attribute(model, graph, [data], objective="answer_nll", method=method,
                                                    progress=False))
    planned = estimate_memory(model, graph, batch_size=batch, seq_len=tokens, loss_positions=tokens // 4,
                              **eap_options).total
    print(f"{name} {level} b{batch} p{tokens} {eap_options}: estimated {planned / 2**20:.2f} MiB, "
          f"measured {measured / 2**20:.2f} MiB ({planned / measured - 1:+.1%})")
    assert abs(planned / measured - 1) < 0.30
    return planned, measured


def test_dense_layers_between_moe_layers_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                            architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(cd.UnsupportedModelError, match="dense MLP layers.*no proof test"):
        ModelShape.from_config(config)
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(cd.UnsupportedModelError, match="dense MLP layers.*no proof test"):  # and before any scoring
        cd.load_model(hf, tokenizer=build_tokenizer(64, tmp_path))


def test_no_plan_for_a_head_level_graph_of_a_post_norm_family():
    from transformers import Olmo2Config

    config = Olmo2Config(num_hidden_layers=2, architectures=["Olmo2ForCausalLM"])
    with pytest.raises(cd.UnsupportedModelError, match="post-norm"):
        estimate_memory(config, "head", batch_size=1, seq_len=16)
    assert estimate_memory(config, "layer", batch_size=1, seq_len=16).total > 0


MOE = dict(num_experts_per_tok=2, intermediate_size=512)


@pytest.mark.parametrize("config_class, options", [("Qwen3MoeConfig", dict(num_experts=8, **MOE)),
                                                   ("MixtralConfig", dict(num_local_experts=4, **MOE)),
                                                   ("Olmo2Config", dict(intermediate_size=1024)),
                                                   ("Gemma2Config", dict(intermediate_size=1024, head_dim=32))])
def test_new_family_estimate_within_30_percent_of_cpu_profiler_peak(config_class, options, tmp_path):
    """Expert weights and every routed expert's activations count (counted as one dense MLP, Qwen3-MoE was +65%);
    so do post-norms (layer level)."""
    import transformers

    if config_class == "Qwen3MoeConfig":
        options = {**options, "moe_intermediate_size": options.pop("intermediate_size")}
    config = getattr(transformers, config_class)(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=4096, tie_word_embeddings=False, **options)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.config.architectures = [type(hf).__name__]
    model = cd.load_model(hf, tokenizer=build_tokenizer(512, tmp_path), device="cpu")
    shape = ModelShape.from_model(model)
    assert shape.parameter_bytes() == replace(shape, weight_bytes=None).parameter_bytes()  # the shape's own count
    if "num_experts_per_tok" in options:
        assert (shape.d_mlp, shape.experts_per_token) == (512, 2)
        assert shape.n_experts == (options.get("num_experts") or 4)
    graph = cd.AttributionGraph.from_model(model, level="layer" if "Olmo" in config_class or "Gemma" in config_class
                                           else "head")
    tokens = 256
    data = cpu_answer_batch(512, 1, tokens)
    measured = cpu_peak(model, lambda: cd.attribute(model, graph, [data], objective="answer_nll", progress=False))
    planned = estimate_memory(model, graph, batch_size=1, seq_len=tokens, loss_positions=tokens // 4).total
    print(f"{config_class} {graph.level}: estimated {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB "
          f"({planned / measured - 1:+.1%})")
    assert abs(planned / measured - 1) < 0.30, (planned / 2**20, measured / 2**20)


@pytest.mark.parametrize("name, level, batch, tokens", [
    ("tiny-llama", "head", 2, 32),
    ("tiny-qwen2", "layer", 4, 32),
    ("llama-256", "head", 1, 256),
    ("llama-256", "layer", 2, 128),
])
def test_estimate_within_30_percent_of_cpu_profiler_peak(name, level, batch, tokens):
    planned_and_measured_peak(name, level, batch, tokens)
