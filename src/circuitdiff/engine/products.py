"""The engine's arithmetic: accumulation dtypes and products summed in float32.

Scores and activation differences accumulate in float32 (float64 for float64 models)
whatever the model's dtype. :func:`product` multiplies two of the model's own
low-precision tensors exactly: products of two bfloat16 (or two float16) numbers are
exact in float32, so only the float32 summation order remains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "CONTRACTION_DTYPES", "is_contraction_dtype", "PROFILER_LABELS", "product", "add_product"]

#: The dtypes ``delta`` may be stored in besides the accumulation dtype. float16 is left
#: out: its range (6e-8 to 65504) loses small gradients and large activations of 7B models.
CONTRACTION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)

#: ``torch.profiler`` labels of EAP's own work: per-head source outputs (forward), the
#: attention receivers' gradients and the ``delta . G`` contractions (backward).
PROFILER_LABELS: tuple[str, ...] = ("circuitdiff.head_outputs", "circuitdiff.receiver_gradients",
                                    "circuitdiff.contract")

# Dtypes whose products are exact in float32 (8- and 11-bit significands).
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16)
# Devices whose bfloat16/float16 matrix products can return float32 (``torch.mm(..., out_dtype=)``).
_FLOAT32_OUTPUT_DEVICES = ("cuda",)
# CPU bfloat16/float16 products with a long reduction (k > m + n: the contraction over
# positions x d_model): at least this many slices of k, each with at most this many
# elements in its two float32 copies (2**24 elements: 64 MiB).
_CPU_SLICES = 8
_CPU_SLICE_ELEMENTS = 2**24


def accumulation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 models."""
    return torch.promote_types(model_dtype, torch.float32)


def is_contraction_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` may be asked for as a contraction dtype: an accumulation dtype or one of CONTRACTION_DTYPES."""
    return any(dtype is allowed for allowed in (torch.float32, torch.float64, *CONTRACTION_DTYPES))


def _matmul_has_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=...)`` (2.8 and later)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def product(a: Tensor, b: Tensor) -> Tensor:
    """``a [..., m, k] @ b [..., k, n]`` (2-d or batched 3-d); bfloat16/float16 factors are summed in float32.

    Products of two bfloat16 (or two float16) numbers are exact in float32, so for such
    factors the result is the exact product up to float32 summation order, and it is float32.
    CUDA: ``torch.mm`` / ``torch.bmm`` with ``out_dtype=torch.float32``, on the GPU's
    low-precision matrix units; cuBLAS then also sums its split-K partial products in
    float32 (for a bfloat16 result PyTorch lets it sum them in bfloat16). Elsewhere, and
    with torch before 2.8 (no ``out_dtype``), the factors are upcast to float32: whole for
    a short reduction (``k <= m + n``: the receivers' and source outputs' products), a
    slice of ``k`` at a time for a long one (the contraction over positions x d_model), so
    that the copies stay a fraction of the buffer they come from. (torch's own CPU bfloat16
    product rounds its result to bfloat16, and one of its kernels, torch 2.13.0 with one
    thread on a ``[3, 524288] @ [524288, 3]`` product, dies with SIGFPE.)

    Other factors: ``a @ b`` in their promoted dtype, at least float32.
    """
    if a.dtype != b.dtype or a.dtype not in _EXACT_IN_FLOAT32:
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dtype) @ b.to(dtype)
    if a.device.type in _FLOAT32_OUTPUT_DEVICES and _matmul_has_out_dtype():
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
    (m, k), n = a.shape[-2:], b.shape[-1]
    if k <= m + n:
        return a.float() @ b.float()
    per_k = (a.numel() + b.numel()) // k  # float32 elements copied per unit of k
    step = max(1, min(-(-k // _CPU_SLICES), _CPU_SLICE_ELEMENTS // per_k))
    out = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=torch.float32, device=a.device)
    for start in range(0, k, step):
        out += a[..., start:start + step].float() @ b[..., start:start + step, :].float()
    return out


def add_product(out: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float) -> Tensor:
    """``out = beta * out + alpha * (a @ b)`` in place, for ``a [batch, m, k] @ b [batch, k, n]``, ``beta`` 0 or 1.

    The same numbers as :func:`product` (factors that are exact in float32 multiplied in
    float32), written into ``out`` without a temporary where ``out`` has the factors'
    (upcast) dtype: one ``baddbmm_``. ``beta=0`` ignores what ``out`` held (it may be
    uninitialised). Elsewhere (a bfloat16 ``out``, products on a GPU's bfloat16 units)
    the product is formed, rounded to ``out``'s dtype and then added.
    """
    upcast = (a.dtype == b.dtype and a.dtype in _EXACT_IN_FLOAT32 and out.dtype == torch.float32
              and a.device.type not in _FLOAT32_OUTPUT_DEVICES and a.shape[-1] <= a.shape[-2] + b.shape[-1])
    if (a.dtype == b.dtype == out.dtype and out.dtype in (torch.float32, torch.float64)) or upcast:
        return out.baddbmm_(a.to(out.dtype), b.to(out.dtype), beta=beta, alpha=alpha)
    result = product(a, b).to(out.dtype)
    return torch.mul(result, alpha, out=out) if beta == 0 else out.add_(result, alpha=alpha)
