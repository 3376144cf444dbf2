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

Only the (copy, receiver) pairs with an ablated edge are computed.

Sources upstream of a receiver are recorded before it reads them, so ``delta`` always
holds the current run's outputs: ablating a set of edges is exact, also when an
ablated edge changes what later sources write (circuit evaluation).

With one edge per copy (``one_edge_per_copy=True``, the ``exact`` scorer) nothing
upstream of the ablated receiver changes, so ``delta`` is the clean one, recorded once
per batch; the passes then record nothing and only the shifted copies are computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.engine.bridge import NormParams, spread_over
from circuitdiff.engine.sources import HookList, Window
from circuitdiff.errors import ArgumentError, UnsupportedModelError
from circuitdiff.typecheck import shape_checked

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun
    from circuitdiff.graph import ReceiverGroup

__all__ = ["EdgeAblation"]

#: ``(copies [k], receivers [k], shifts [k, pos, d_model])``: one entry per shifted (copy, receiver)
Shifts = tuple[Int[Tensor, "k"], Int[Tensor, "k"], Float[Tensor, "k pos d_model"]]


class EdgeAblation:
    """Ablated forward passes over copies of one batch's samples.

    Construction runs the intervention's pass (e.g. the corrupted forward) and the
    clean forward once; :meth:`losses` then runs any number of ablation patterns.

    Args:
        run: the bound run (``graph.bind(model, ...)``), entered (``with run:``: eval
            mode, no parameter gradients).
        batch: the samples (on the model's device).
        batch_index: the batch's position in the dataset (for error messages).
        one_edge_per_copy: promise that every copy ablates at most one edge (checked).
            Then no source upstream of the ablated receiver has changed, so
            ``delta = replacement - clean output`` is fixed: it is recorded once, in the
            clean pass, and :meth:`losses` records nothing (faster; used by ``exact``).
    """

    def __init__(self, run: "AttributionRun", batch: Batch, batch_index: int, *,
                 one_edge_per_copy: bool = False) -> None:
        devices = spread_over(run.model)
        if devices:
            raise UnsupportedModelError(
                f"ablated forward passes (exact scores, circuit faithfulness, ACDC) need the whole model on one "
                f"device; this one is spread over {', '.join(devices)} (device_map). Use scorer='eap', "
                "which supports device maps, or load the model onto one device."
            )
        self.run = run
        self.batch = batch
        self.batch_index = batch_index
        self.one_edge_per_copy = one_edge_per_copy
        # one_edge_per_copy: the fixed delta; else the replacement (None: zero replacement)
        self._buffer, self.clean_logits = run.clean_pass(batch, record=one_edge_per_copy)
        #: ``[batch]`` the objective on the clean run.
        self.clean_losses: Float[Tensor, "batch"] = run.loss(self.clean_logits, batch, batch_index)

    @shape_checked
    def losses(
        self,
        rows: Int[Tensor, "copies"],
        ablate: Bool[Tensor, "copies n_sources n_receivers"],
    ) -> Float[Tensor, "copies"]:
        """The objective of copy ``c`` (sample ``rows[c]``) with the edges ``ablate[c]`` ablated.

        One forward pass over all copies. Cells of ``ablate`` outside the graph's
        ``edge_mask`` are ignored.
        """
        run = self.run
        graph = run.graph
        if tuple(ablate.shape) != (rows.shape[0], graph.n_sources, graph.n_receivers):
            raise ArgumentError(
                f"ablate has shape {tuple(ablate.shape)}; expected "
                f"{(rows.shape[0], graph.n_sources, graph.n_receivers)} (copies, sources, receivers)."
            )
        rows = rows.to(self.batch.input_ids.device)
        copies = self.batch.select(rows)
        ablate = ablate.to(rows.device) & graph.edge_mask.to(rows.device)
        if self.one_edge_per_copy:
            if bool((ablate.flatten(1).sum(1) > 1).any()):
                raise ArgumentError("this EdgeAblation was built with one_edge_per_copy=True, but a copy ablates "
                                 "several edges; build it with one_edge_per_copy=False.")
            fixed = self._buffer
            recording: HookList = []

            def read(active: Tensor, n: int) -> Tensor:
                return fixed[rows[active], :n]
        else:
            if self._buffer is not None:
                delta, record = self._buffer[rows], "subtract"
            else:
                delta, record = run.new_delta(copies), "negate"
            recording = run.sources.hooks(delta, copies.attention_mask, record, Window())

            def read(active: Tensor, n: int) -> Tensor:
                return delta[active, :n]
        weights = ablate.to(run.dtype)
        with torch.no_grad(), run.hooked(recording + self._receiver_hooks(read, weights)):
            logits = run.model(copies.input_ids, attention_mask=copies.attention_mask)
        return run.loss(logits, copies, self.batch_index, clean_logits=self.clean_logits[rows])

    # ------------------------------------------------------------------ hooks
    def _receiver_hooks(self, read: Callable[[Tensor, int], Tensor], weights: Tensor) -> HookList:
        """Hooks shifting each receiver's input; ``read(copies, n)`` gives those copies' ``delta[:, :n]``."""
        graph, bridge = self.run.graph, self.run.bridge

        def shifts(group: "ReceiverGroup", first: int = 0, count: int | None = None) -> Shifts | None:
            """Input shifts of receivers ``first : first + count`` of ``group``, where nonzero.

            Returns ``(copies [k], receivers [k], shifts [k, pos, d_model])`` for the k
            (copy, receiver) pairs with an ablated edge, or None. Only those pairs are
            computed: with one edge per copy (``exact``) there is one pair per copy.
            """
            start = group.columns.start + first
            stop = group.columns.stop if count is None else start + count
            w = weights[:, : group.n_sources_read, start:stop]  # [copies, sources read, receivers]
            pairs = w.any(1).nonzero()
            if pairs.shape[0] == 0:
                return None
            copies, receivers = pairs.unbind(1)
            delta = read(copies, group.n_sources_read)  # [k, sources read, pos, d_model]
            k, n, p, d = delta.shape
            shift = torch.bmm(w[copies, :, receivers].unsqueeze(1), delta.reshape(k, n, p * d))
            return copies, receivers, shift.view(k, p, d)

        def shift_input(group: "ReceiverGroup") -> Callable[[Tensor, Any], Tensor | None]:
            def hook(x: Tensor, hook: Any) -> Tensor | None:
                found = shifts(group)
                if found is None:
                    return None
                copies, _, shift = found  # one receiver per copy here
                return x.index_add(0, copies, shift.to(x.dtype))
            return hook

        hooks: HookList = []
        for layer in range(graph.n_layers):
            hooks += _attention_hooks(self.run, layer, shifts)
            hooks.append((bridge.mlp_input_hook(layer), shift_input(graph.group("mlp", layer))))
        hooks.append((bridge.logits_input_hook, shift_input(graph.group("logits"))))
        return hooks


def _attention_hooks(run: "AttributionRun", layer: int, shifts: Callable[..., Shifts | None]) -> HookList:
    """Hooks correcting ``layer``'s q, k, v outputs for the receivers whose input is shifted.

    The attention norm is shared by all heads, so the receiving head's projection output
    is corrected instead of its input: ``q_h += (norm(x + shift_h) - norm(x)) @ W_Q[h]^T``.
    """
    graph, bridge = run.graph, run.bridge
    weights = bridge.layers[layer]
    group = graph.group("attn", layer)
    n_q, n_k, _ = graph.receivers_per_attention
    state: dict[str, Tensor] = {}

    def capture(x: Tensor, hook: Any) -> None:
        state["x"] = x.detach()

    def correct(weight: Tensor, first: int, count: int) -> Callable[[Tensor, Any], Tensor | None]:
        def hook(out: Tensor, hook: Any) -> Tensor | None:
            # out: [copies, pos, heads of this projection, d_head]
            found = shifts(group, first, count)
            if found is None:
                return None
            copies, receivers, shift = found
            change = _norm_change(state["x"][copies].to(shift.dtype), shift, weights.norm)  # [k, pos, d_model]
            w = weight.to(shift.dtype)  # [heads, d_head, d_model]
            if graph.level == "layer":  # the projection's only receiver feeds every head
                return out.index_add(0, copies, torch.einsum("kpd,hed->kphe", change, w).to(out.dtype))
            # head level: receiver r is head r of this projection
            c, p, h, e = out.shape
            correction = torch.einsum("kpd,ked->kpe", change, w[receivers])
            extra = out.new_zeros(c * h, p, e).index_add(0, copies * h + receivers, correction.to(out.dtype))
            return out + extra.view(c, h, p, e).transpose(1, 2)
        return hook

    return [
        (bridge.attention_input_hook(layer), capture),
        (bridge.projection_hook(layer, "q"), correct(weights.w_q, 0, n_q)),
        (bridge.projection_hook(layer, "k"), correct(weights.w_k, n_q, n_k)),
        (bridge.projection_hook(layer, "v"), correct(weights.w_v, n_q + n_k, n_k)),
    ]


def _norm_change(
    x: Float[Tensor, "k pos d_model"],
    shift: Float[Tensor, "k pos d_model"],
    norm: NormParams | None,
) -> Float[Tensor, "k pos d_model"]:
    """``norm(x + shift) - norm(x)`` (the norm's bias cancels); ``shift`` without a norm."""
    if norm is None:
        return shift

    def normalized(y: Tensor) -> Tensor:
        if not norm.rms:
            y = y - y.mean(-1, keepdim=True)
        return y / (y.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()

    return norm.weight.to(x.device, x.dtype) * (normalized(x + shift) - normalized(x))
