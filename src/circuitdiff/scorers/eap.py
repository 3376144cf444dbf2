"""Edge attribution patching (EAP): a first-order estimate of every edge at once.

For edge (u -> v) and sample b,

    score[b, u, v] = sum over positions and d_model of (a_u' - a_u) * dL_b / d(input of v)

where ``a_u`` is u's clean output, ``a_u'`` its replacement (the intervention) and
``L_b`` the sample's objective. This is the derivative of ``L_b`` along the straight
line from reading ``a_u`` to reading ``a_u'``, i.e. the first-order Taylor estimate of
``L_b(edge ablated) - L_b(clean)``. Cost per batch: one hooked forward and backward
(plus one forward without gradients for patching).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.objectives import evaluate
from circuitdiff.scorers.base import ScoringContext

__all__ = ["EAP"]


class EAP:
    """Edge attribution patching (Syed et al. 2023), per-sample, float32 accumulation."""

    name = "eap"

    def score_batch(
        self, context: ScoringContext, batch: Batch, batch_index: int
    ) -> tuple[Float[Tensor, "batch n_sources n_receivers"], Float[Tensor, "batch"]]:
        """One hooked forward and backward (after the intervention's own pass, if any)."""
        hooks = context.hooks
        delta = hooks.new_delta(batch)
        filled = context.intervention.prefill(hooks, batch, delta)
        scores = hooks.new_scores(batch)
        record = "subtract" if filled else "negate"
        with torch.enable_grad(), context.model.hooks(
            fwd_hooks=hooks.hooks(delta, batch.attention_mask, record, scores)
        ):
            logits = context.model(batch.input_ids, attention_mask=batch.attention_mask)
            losses = evaluate(context.objective, logits, batch, batch_index)
            losses.sum().backward()
        return scores, losses.detach()
