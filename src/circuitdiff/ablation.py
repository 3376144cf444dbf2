"""Forward passes in which chosen edges read their source's replacement: exact ablation.

Ablating edge (u -> v) means receiver v reads ``replacement(u)`` instead of u's output
in the current run, while every other receiver still reads u's output. Many ablations
run in one forward pass: the batch axis holds *copies* of samples, and each copy has its
own set of ablated edges, ``ablate[copy, source, receiver]``.

How, without per-receiver copies of the residual stream: every source's output is
recorded as the pass goes (``delta = replacement - current output``, the same buffer
EAP uses), and each receiver's input is shifted by ``sum_u ablate[c, u, v] * delta_u``
where it is read:

- MLP and logits receivers: the input of the MLP's norm / the final norm is shifted.
- q, k, v receivers: the attention norm is shared by all heads, so the projection
  output of the receiving head is corrected instead:
  ``q_h += (norm(x + shift_h) - norm(x)) @ W_Q[h]^T`` (the norm's bias cancels).

Sources upstream of a receiver are recorded before it reads them, so ``delta`` always
holds the current run's outputs: ablating a set of edges is exact, also when an
ablated edge changes what later sources write (circuit evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.graph import ReceiverGroup
from circuitdiff.hooks import LOGITS_INPUT_HOOK, HookList
from circuitdiff.models import NormParams
from circuitdiff.objectives import evaluate

if TYPE_CHECKING:  # scorers import this module
    from circuitdiff.scorers.base import ScoringContext

__all__ = ["EdgeAblation"]


class EdgeAblation:
    """Ablated forward passes over copies of one batch's samples.

    Construction runs the intervention's pass (e.g. the corrupted forward) and the
    clean forward once; :meth:`losses` then runs any number of ablation patterns.

    Args:
        context: from :func:`circuitdiff.scorers.base.make_context`; the model must be
            in :func:`circuitdiff.models.attribution_mode`.
        batch: the samples (on the model's device).
        batch_index: the batch's position in the dataset (for error messages).
    """

    def __init__(self, context: ScoringContext, batch: Batch, batch_index: int) -> None:
        self.context = context
        self.batch = batch
        self.batch_index = batch_index
        hooks = context.hooks
        replacement = hooks.new_delta(batch)
        self.replaced = context.intervention.prefill(hooks, batch, replacement)
        self.replacement = replacement if self.replaced else None
        with torch.no_grad():
            self.clean_logits = context.model(batch.input_ids, attention_mask=batch.attention_mask)
        #: ``[batch]`` the objective on the clean run.
        self.clean_losses: Float[Tensor, "batch"] = evaluate(context.objective, self.clean_logits, batch, batch_index)

    def losses(
        self,
        rows: Int[Tensor, "copies"],
        ablate: Bool[Tensor, "copies n_sources n_receivers"],
    ) -> Float[Tensor, "copies"]:
        """The objective of copy ``c`` (sample ``rows[c]``) with the edges ``ablate[c]`` ablated.

        One forward pass over all copies. Cells of ``ablate`` outside the graph's
        ``edge_mask`` are ignored.
        """
        context, hooks = self.context, self.context.hooks
        graph = context.graph
        if tuple(ablate.shape) != (rows.shape[0], graph.n_sources, graph.n_receivers):
            raise ValueError(
                f"ablate has shape {tuple(ablate.shape)}; expected "
                f"{(rows.shape[0], graph.n_sources, graph.n_receivers)} (copies, sources, receivers)."
            )
        rows = rows.to(self.batch.input_ids.device)
        copies = self.batch.select(rows)
        if self.replacement is not None:
            delta, record = self.replacement[rows], "subtract"
        else:
            delta, record = hooks.new_delta(copies), "negate"
        weights = (ablate.to(delta.device) & graph.edge_mask.to(delta.device)).to(delta.dtype)
        with torch.no_grad(), context.model.hooks(
            fwd_hooks=hooks.hooks(delta, copies.attention_mask, record) + self._receiver_hooks(delta, weights)
        ):
            logits = context.model(copies.input_ids, attention_mask=copies.attention_mask)
        return evaluate(context.objective, logits, copies, self.batch_index, clean_logits=self.clean_logits[rows])

    # ------------------------------------------------------------------ hooks
    def _receiver_hooks(self, delta: Tensor, weights: Tensor) -> HookList:
        graph = self.context.graph

        def shifts(group: ReceiverGroup) -> Tensor | None:
            """``[copies, receivers in group, pos, d_model]`` input shifts, or None if all zero."""
            w = weights[:, : group.n_sources_read, group.columns]
            if not bool(w.any()):
                return None
            c, n, p, d = delta.shape[0], group.n_sources_read, delta.shape[2], delta.shape[3]
            return torch.bmm(w.transpose(1, 2), delta[:, :n].reshape(c, n, p * d)).view(c, -1, p, d)

        def shift_input(group: ReceiverGroup) -> Callable[[Tensor, Any], Tensor | None]:
            def hook(x: Tensor, hook: Any) -> Tensor | None:
                s = shifts(group)
                return None if s is None else x + s[:, 0].to(x.dtype)
            return hook

        hooks: HookList = []
        for layer in range(graph.n_layers):
            hooks += self._attention_hooks(layer, shifts)
            hooks.append((f"blocks.{layer}.ln2.hook_in", shift_input(graph.group("mlp", layer))))
        hooks.append((LOGITS_INPUT_HOOK, shift_input(graph.group("logits"))))
        return hooks

    def _attention_hooks(self, layer: int, shifts: Callable[[ReceiverGroup], Tensor | None]) -> HookList:
        graph, weights = self.context.graph, self.context.hooks.layers[layer]
        n_q, n_k, _ = graph.receivers_per_attention
        state: dict[str, Tensor] = {}

        def capture(x: Tensor, hook: Any) -> None:
            state.clear()
            s = shifts(graph.group("attn", layer))
            if s is not None:
                state["x"], state["shifts"] = x.detach(), s

        def correct(weight: Tensor, start: int, count: int) -> Callable[[Tensor, Any], Tensor | None]:
            def hook(out: Tensor, hook: Any) -> Tensor | None:
                # out: [copies, pos, heads of this projection, d_head]
                if not state:
                    return None
                s = state["shifts"][:, start:start + count]  # [copies, receivers, pos, d_model]
                if not bool(s.any()):
                    return None
                change = _norm_change(state["x"].to(s.dtype), s, weights.norm)
                w = weight.to(s.dtype)  # [heads, d_head, d_model]
                if graph.level == "head":
                    correction = torch.einsum("crpd,red->cpre", change, w)
                else:
                    correction = torch.einsum("cpd,hed->cphe", change[:, 0], w)
                return out + correction.to(out.dtype)
            return hook

        return [
            (f"blocks.{layer}.ln1.hook_in", capture),
            (f"blocks.{layer}.attn.q.hook_out", correct(weights.w_q, 0, n_q)),
            (f"blocks.{layer}.attn.k.hook_out", correct(weights.w_k, n_q, n_k)),
            (f"blocks.{layer}.attn.v.hook_out", correct(weights.w_v, n_q + n_k, n_k)),
        ]


def _norm_change(
    x: Float[Tensor, "copies pos d_model"],
    shifts: Float[Tensor, "copies receivers pos d_model"],
    norm: NormParams,
) -> Float[Tensor, "copies receivers pos d_model"]:
    """``norm(x + shift) - norm(x)`` for each receiver's shift (the norm's bias cancels)."""

    def normalized(y: Tensor) -> Tensor:
        if not norm.rms:
            y = y - y.mean(-1, keepdim=True)
        return y / (y.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()

    return norm.weight.to(x.device, x.dtype) * (normalized(x.unsqueeze(1) + shifts) - normalized(x).unsqueeze(1))
