"""Edge attribution patching (EAP): a first-order estimate of every edge at once.

For edge (u -> v) and sample b,

    score[b, u, v] = sum over positions and d_model of (a_u' - a_u) * dL_b / d(input of v)

where ``a_u`` is u's clean output, ``a_u'`` its replacement (the intervention) and
``L_b`` the sample's objective. This is the derivative of ``L_b`` along the straight
line from reading ``a_u`` to reading ``a_u'``, i.e. the first-order Taylor estimate of
``L_b(edge ablated) - L_b(clean)``. Cost per batch: one hooked forward and backward
(plus one forward without gradients for patching).

Checkpointed blocks (``EAP(checkpoint_blocks=True)``): the model's own saved activations
are bounded to one block's (plus every block's input) by rerunning each block's forward
in the backward pass; the scores are the same.

Position chunks (``EAP(positions_per_chunk=c)``): inside the one backward pass, the
attention receivers' gradients are formed and contracted ``c`` positions at a time, so
their per-layer transients scale with ``c``; the scores are the same up to float32
summation order, at no extra pass.

Position windows (``EAP(positions_per_pass=w)``): the sum over positions is split into
windows of ``w`` positions, one forward and backward per window (and one intervention
pass per window for patching). The float32 source buffer and the per-layer receiver
gradients then scale with ``w`` instead of the sequence length; the scores are the
same up to float32 summation order. Use it when even batch size 1 does not fit
(``circuitdiff.plan_batch_size`` suggests a ``w``).

bfloat16 contraction (``EAP(contraction_dtype=torch.bfloat16)``): the source buffer and
the receiver gradients are rounded to bfloat16 before their product, which is summed in
float32. The buffer takes half the memory and, on GPUs, the products run on bfloat16
matrix units. Meant for bfloat16 models, whose own arithmetic already carries this
relative rounding error (2^-9); see ``benchmarks/bf16_accuracy.py`` for what it adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.engine.products import CONTRACTION_DTYPES, is_contraction_dtype
from circuitdiff.engine.sources import Window
from circuitdiff.errors import ArgumentError
from circuitdiff.scorers.base import ScoresAndLosses, boolean, positive_int

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun

__all__ = ["EAP"]


@dataclass(frozen=True)
class EAP:
    """Edge attribution patching (Syed et al. 2023), per-sample, float32 accumulation.

    Args:
        positions_per_pass: score each batch in windows of this many positions, one
            forward and backward per window, to bound memory (default None: all
            positions in one pass).
        contraction_dtype: store the source buffer and contract it with the receiver
            gradients in this dtype: ``torch.bfloat16`` halves the buffer and lets GPUs
            run the products on bfloat16 matrix units; products are summed in float32
            and scores stay float32.
            Default None: the accumulation dtype (float32, float64 for float64 models).
        positions_per_chunk: form and contract the attention receivers' gradients this many
            positions at a time inside the one backward pass (default None: all positions
            of the window at once). Bounds the per-layer receiver transients (at head level
            ``[heads + 2 x kv heads, batch x positions, d_model]`` float32) by the chunk instead of the
            sequence, at no extra pass. Same scores up to float32 summation order.
        checkpoint_blocks: keep only each transformer block's input for the backward pass
            and rerun the blocks' forwards there, one block at a time: the model's saved
            activations shrink from every block's to one block's (plus each block's
            input), for one more forward pass of the blocks. Same scores.
        fused_attention: run attention through torch's fused ``scaled_dot_product_attention``
            instead of the bridge's eager attention, which keeps ``[batch, heads, pos, pos]``
            scores and pattern for the backward pass; the engine needs neither
            (:meth:`~circuitdiff.engine.bridge.Bridge.fused_attention`). Same scores up to
            float32 rounding, less memory, and faster. Default None: fused wherever the
            kernel computes the model's attention (all validated families but Gemma 2, whose
            soft-capped scores it does not compute); True refuses a model it cannot run;
            False keeps the bridge's eager attention.
    """

    positions_per_pass: int | None = None
    contraction_dtype: torch.dtype | None = None
    checkpoint_blocks: bool = False
    positions_per_chunk: int | None = None
    fused_attention: bool | None = None

    name: ClassVar[str] = "eap"
    #: Options that change memory and speed, not the scores (beyond float32 summation order): a run
    #: resumed with another window size reuses its shards (see :mod:`circuitdiff.identity`).
    not_in_identity: ClassVar[tuple[str, ...]] = ("positions_per_pass", "checkpoint_blocks", "positions_per_chunk",
                                                  "fused_attention")

    def __post_init__(self) -> None:
        positive_int("eap", "positions_per_pass", self.positions_per_pass, allow_none=True)
        positive_int("eap", "positions_per_chunk", self.positions_per_chunk, allow_none=True)
        boolean("eap", "checkpoint_blocks", self.checkpoint_blocks)
        boolean("eap", "fused_attention", self.fused_attention, allow_none=True)
        if self.contraction_dtype is not None and not is_contraction_dtype(self.contraction_dtype):
            raise ArgumentError(
                f"eap: contraction_dtype must be None (the accumulation dtype), torch.float32, torch.float64 or one "
                f"of {CONTRACTION_DTYPES}; got {self.contraction_dtype!r}. (torch.float16 is not offered: its "
                "range, 6e-8 to 65504, loses small gradients and large activations.)")

    def score_batch(self, run: "AttributionRun", batch: Batch, batch_index: int) -> ScoresAndLosses:
        """One hooked forward and backward per window (after the intervention's own pass, if any)."""
        width = batch.input_ids.shape[1]
        step = self.positions_per_pass or width
        scores = run.new_scores(batch)
        with run.bridge.fused_attention(self.fused_attention):
            losses = self._add_window(run, batch, batch_index, Window.over(slice(0, step), self.contraction_dtype),
                                      scores)
            for start in range(step, width, step):  # every window computes the same clean losses
                self._add_window(run, batch, batch_index,
                                 Window.over(slice(start, start + step), self.contraction_dtype), scores)
        return scores, losses

    def _add_window(self, run: "AttributionRun", batch: Batch, batch_index: int, window: Window,
                    scores: Tensor) -> Float[Tensor, "batch"]:
        """Add the contributions of ``window``'s positions to ``scores``; return the clean losses."""
        delta = run.replacement(batch, window)
        record = "negate" if delta is None else "subtract"
        delta = run.new_delta(batch, window) if delta is None else delta
        hooks = (run.sources.hooks(delta, batch.attention_mask, record, window)
                 + run.receivers.hooks(delta, scores, window, positions_per_chunk=self.positions_per_chunk))
        return run.backward_pass(batch, batch_index, hooks, checkpoint_blocks=self.checkpoint_blocks)
