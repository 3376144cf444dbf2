"""The engine's per-layer products on the model's own tensors, against float64 references.

Per-head source outputs ``z_h @ W_O[h]`` and the attention receivers' input gradients are
computed from the model's own bfloat16 (or float32) activations, gradients and weights,
with exact products summed in float32 (``hooks._product``). Each is compared with the same
quantity computed in float64 from the same inputs; the receiver gradients by autograd
through the norm rather than by the closed form the hooks use.
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff.engine import Window
from circuitdiff.engine import products as hooks_module

BF16 = torch.bfloat16
# CUDA runs the float32-output products (torch.mm / torch.bmm with out_dtype) of bfloat16
# models that CPU only checks on meta tensors; run this file on a GPU machine to check them.
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: checks the GPU's float32-output products")
DTYPES_AND_DEVICES = [("float32", "cpu"), ("bfloat16", "cpu"), pytest.param("bfloat16", "cuda", marks=NEEDS_CUDA)]


@pytest.fixture
def edge_hooks(get_model, checkpoints):
    """``edge_hooks(arch, dtype, level, device)``: the bound run of a tiny model on ``device``."""
    def make(arch, dtype, level, device):
        if device == "cpu":
            model = get_model(arch, dtype)
        else:
            model = cd.load_model(checkpoints[arch], dtype=getattr(torch, dtype), device=device)
        graph = cd.AttributionGraph.from_model(model, level=level)
        return graph.bind(model, objective="answer_nll")
    return make


def _assert_float32_sum_of_exact_products(product, a, b, atol=1e-5):
    """``product`` is float32 and equals the float64 product ``a @ b`` to 1e-5 relative (and ``atol``)."""
    assert product.dtype == torch.float32
    expected = a.double().cpu() @ b.double().cpu()
    torch.testing.assert_close(product.double().cpu(), expected, rtol=1e-5, atol=atol)


def _norm(x, norm):
    """The bridge's norm without its bias, in float64."""
    if not norm.rms:
        x = x - x.mean(-1, keepdim=True)
    return norm.weight.double() * x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])  # RMSNorm, LayerNorm, RMSNorm with GQA
@pytest.mark.parametrize("dtype, device", DTYPES_AND_DEVICES)
@pytest.mark.parametrize("level", ["head", "layer"])
def test_attention_receiver_gradients_match_autograd_through_the_norm(edge_hooks, arch, dtype, level, device):
    hooks = edge_hooks(arch, dtype, level, device)
    layer, (b, p) = 1, (2, 5)
    weights = hooks.bridge.layers[layer]
    model_dtype = weights.w_q.dtype
    x = (3 * torch.randn(b, p, hooks.spec.d_model)).to(model_dtype)
    upstream = {proj: torch.randn(b, p, *getattr(weights, f"w_{proj}").shape[:2]).to(model_dtype) for proj in "qkv"}
    stash = {(layer, "x"): x.to(device)} | {(layer, proj): g.to(device) for proj, g in upstream.items()}

    gradients = hooks.receivers.attention_gradients(layer, stash)  # [batch, receivers, pos, d_model]

    assert gradients.dtype == torch.float32 and gradients.device.type == device and not stash
    expected = []
    for proj in "qkv":
        w, g = getattr(weights, f"w_{proj}").double().cpu(), upstream[proj].double()  # [heads, d_head, d_model]
        for head in range(w.shape[0]) if level == "head" else [slice(None)]:
            x64 = x.double().requires_grad_(True)
            out = torch.einsum("bpd,hed->bphe", _norm(x64, weights.norm), w)
            (out[:, :, head] * g[:, :, head]).sum().backward()
            expected.append(x64.grad)
    expected = torch.stack(expected, 1)
    assert gradients.shape == expected.shape
    torch.testing.assert_close(gradients.double().cpu(), expected, rtol=2e-5,
                               atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype, device", DTYPES_AND_DEVICES)
def test_attention_source_outputs_are_exact_sums_of_the_models_products(edge_hooks, dtype, device):
    """Head level: each head's output ``z_h @ W_O[h]``, formed from the model's ``z`` and ``W_O``."""
    level = "head"
    hooks = edge_hooks("llama", dtype, level, device)
    layer = 2
    w_o = hooks.bridge.layers[layer].w_o  # [d_model, heads * d_head]
    heads, d_head = hooks.graph.n_heads, w_o.shape[1] // hooks.graph.n_heads
    z = torch.randn(2, 5, heads, d_head).to(w_o.dtype)
    ids, mask = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    expected = torch.einsum("bphe,dhe->bhpd", z.double(), w_o.double().cpu().view(-1, heads, d_head))
    rows = hooks.graph.attention_sources(layer)
    for record, sign in (("set", 1.0), ("negate", -1.0)):  # written straight into delta's rows
        delta = hooks.sources.new_delta(ids, Window()).fill_(float("nan"))  # uninitialised memory is ignored
        attention = dict(hooks.sources.hooks(delta, mask.to(device), record, Window()))
        attention[hooks.bridge.attention_values_hook(layer)](z.to(device), None)
        assert delta.dtype == torch.float32 and delta.device.type == device
        torch.testing.assert_close(delta[:, rows].double().cpu(), sign * expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())
    delta[:, rows] = 1.0  # "subtract": the replacement minus the clean outputs
    attention = dict(hooks.sources.hooks(delta, mask.to(device), "subtract", Window()))
    attention[hooks.bridge.attention_values_hook(layer)](z.to(device), None)
    torch.testing.assert_close(delta[:, rows].double().cpu(), 1.0 - expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # W_O with a bias and without
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_level_attention_sources_are_z_times_w_o(edge_hooks, arch, dtype):
    """Layer level: ``z @ W_O^T`` without the bias, against float64 from the model's own ``z``.

    float32 models: read from the attention output the model computed (less W_O's bias);
    bfloat16 models: formed from ``z`` and ``W_O`` with float32 sums (the model's output is rounded).
    """
    hooks = edge_hooks(arch, dtype, "layer", "cpu")
    ids = torch.randint(0, hooks.spec.d_vocab, (2, 5))
    mask = torch.ones_like(ids)
    delta, z = hooks.sources.new_delta(ids, Window()), {}
    recording = hooks.sources.hooks(delta, mask, "set", Window())
    values = [(hooks.bridge.attention_values_hook(layer), lambda x, hook: z.__setitem__(hook.name, x.clone()))
              for layer in range(hooks.graph.n_layers)]
    with torch.no_grad(), hooks.hooked(values + recording):
        hooks.model(ids, attention_mask=mask)
    for layer in range(hooks.graph.n_layers):
        w_o = hooks.bridge.layers[layer].w_o.double()
        expected = z[hooks.bridge.attention_values_hook(layer)].double().flatten(2) @ w_o.T
        got = delta[:, hooks.graph.attention_sources(layer)].squeeze(1)
        assert got.dtype == torch.float32
        # float32: the model's own product (float32 rounding); bfloat16: exact products summed in float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype, reads", [("float32", "projection_input_hook"), ("bfloat16", "projection_hook")])
def test_layer_level_receivers_read_the_models_input_gradients_only_in_full_precision(edge_hooks, dtype, reads):
    """float32: the model's own ``W^T g`` at each projection's input; bfloat16: ``g`` at its output (exact products)."""
    hooks = edge_hooks("llama", dtype, "layer", "cpu")
    delta = hooks.sources.new_delta(torch.zeros(1, 3, dtype=torch.long), Window())
    names = {name for name, _ in hooks.receivers.hooks(delta, hooks.new_scores(cd.Batch(torch.zeros(1, 3,
                                                       dtype=torch.long))), Window())}
    other = "projection_hook" if reads == "projection_input_hook" else "projection_input_hook"
    for layer in range(hooks.graph.n_layers):
        for proj in "qkv":
            assert getattr(hooks.bridge, reads)(layer, proj) in names
            assert getattr(hooks.bridge, other)(layer, proj) not in names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_layer_level_is_the_coarsened_head_level(get_model, arch):
    """Both levels form their products exactly from the bfloat16 model's tensors: they agree to float32 rounding."""
    model = get_model(arch, "bfloat16")
    objective = cd.objectives.answer_nll()
    ids = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = cd.IGNORE
    batch = cd.Batch(ids, labels=labels)
    scores = {level: cd.attribute(model, cd.AttributionGraph.from_model(model, level=level), [batch],
                                  objective=objective, progress=False) for level in ("head", "layer")}
    scale = scores["layer"].mean.abs().max().item()
    torch.testing.assert_close(scores["head"].to_layer_level().mean, scores["layer"].mean, rtol=1e-5,
                               atol=1e-5 * scale)


@pytest.mark.parametrize("slice_elements", [2**24, 64])  # 64: the factors are upcast a slice of k at a time
@pytest.mark.parametrize("shape_a, shape_b", [  # long reductions (sliced) and a short one (copied whole)
    ((5, 1000), (3, 1000)), ((4, 6, 40), (4, 7, 40)), ((4, 30, 8), (4, 20, 8))])
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_cpu_product_sums_exact_products_in_float32(monkeypatch, slice_elements, shape_a, shape_b, dtype):
    monkeypatch.setattr(hooks_module, "_CPU_SLICE_ELEMENTS", slice_elements)
    a, b = torch.randn(shape_a).to(dtype), torch.randn(shape_b).to(dtype).transpose(-1, -2)  # b transposed, as in the hooks
    _assert_float32_sum_of_exact_products(hooks_module.product(a, b), a, b)


@NEEDS_CUDA
@pytest.mark.parametrize("shape_a, shape_b", [((7, 2**20), (5, 2**20)), ((4, 300, 64), (4, 200, 64))])
def test_cuda_product_sums_exact_products_in_float32(shape_a, shape_b):
    """Summed in bfloat16, a 2**20-long sum of products would be off by about 1e-2 relative."""
    a = torch.randn(shape_a).to(BF16).cuda()
    b = torch.randn(shape_b).to(BF16).cuda().transpose(-1, -2)
    scale = (a.double() @ b.double()).abs().max().item()  # float32 sums of 2**20 terms: relative to the largest
    _assert_float32_sum_of_exact_products(hooks_module.product(a, b), a, b, atol=1e-5 * scale)


def test_cpu_product_of_the_shape_that_crashed_torchs_bfloat16_kernel():
    """torch 2.13.0's CPU bfloat16 matrix product died with SIGFPE on this shape with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.ones(3, 524288, dtype=BF16), torch.ones(524288, 3, dtype=BF16)
        assert torch.equal(hooks_module.product(a, b), torch.full((3, 3), 524288.0))
    finally:
        torch.set_num_threads(threads)


def test_product_of_mixed_dtypes_is_taken_in_the_promoted_dtype():
    a, b = torch.randn(4, 30).to(BF16), torch.randn(30, 2, dtype=torch.float64)
    product = hooks_module.product(a, b)
    assert product.dtype == torch.float64
    torch.testing.assert_close(product, a.double() @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape_a, shape_b", [
    ((991, 2**21), (2**21, 96)),  # the contraction: delta rows @ receiver gradients^T
    ((96, 2048, 128), (96, 128, 4096)),  # the attention receivers: q/k/v gradients @ weights
])
def test_cuda_product_asks_for_a_float32_result(monkeypatch, shape_a, shape_b):
    """The CUDA branch's call, on meta tensors (torch registers the float32-output products for them)."""
    monkeypatch.setattr(hooks_module, "_FLOAT32_OUTPUT_DEVICES", ("meta",))
    a, b = torch.empty(shape_a, dtype=BF16, device="meta"), torch.empty(shape_b, dtype=BF16, device="meta")
    product = hooks_module.product(a, b)
    assert product.shape == (*shape_a[:-1], shape_b[-1]) and product.dtype == torch.float32


def test_torch_without_float32_output_matmul_falls_back_to_float32_copies(monkeypatch):
    """torch before 2.8 has no out_dtype: the products are summed in float32 from float32 copies instead."""
    monkeypatch.setattr(hooks_module, "_FLOAT32_OUTPUT_DEVICES", ("cpu",))  # where out_dtype would raise
    assert hooks_module._matmul_has_out_dtype()  # this torch has it
    monkeypatch.setattr(hooks_module, "_matmul_has_out_dtype", lambda: False)
    a, b = torch.randn(5, 1000).to(BF16), torch.randn(1000, 3).to(BF16)
    _assert_float32_sum_of_exact_products(hooks_module.product(a, b), a, b)
