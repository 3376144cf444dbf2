"""EAP with integrated gradients (Hanna et al. 2024): EAP's gradient averaged along a path.

Both scorers use the same fixed source differences as EAP,
``delta_u = replacement(u) - clean(u)`` (from the intervention), and replace EAP's
gradient at the clean point by its average over ``steps`` points of a path from the
ablated run (``alpha = 0``) to the clean run (``alpha = 1``):

    score[b, u, v] = sum over positions, d_model of
                     delta_u * (1/steps) * sum_{k=1..steps} dL_b/d(input of v) at alpha = k/steps

The points are right endpoints (``alpha = 1/steps, ..., 1``), so ``steps=1`` is
exactly EAP, and a score approaches the integrated-gradients value along the path as
``steps`` grows.

- ``"eap-ig-inputs"``: the path interpolates the input embeddings (``blocks.0.hook_in``)
  from their replacement to their clean value; everything downstream follows. With
  ``intervention="patching"`` the ``alpha = 0`` end is the corrupted run. Cost per
  batch: ``steps`` forward+backward passes (plus the intervention's own pass).
- ``"eap-ig-activations"``: for each source block (the input; each attention layer,
  all of its heads together; each MLP) the path interpolates that block's output alone
  from its replacement to its clean value, and only the edges leaving that block are
  scored on it. Cost per batch: ``(2 * n_layers + 1) * steps`` forward+backward passes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hooks import INPUT_HOOK
from circuitdiff.objectives import evaluate
from circuitdiff.scorers.base import ScoringContext

__all__ = ["EAPIGInputs", "EAPIGActivations"]

ScoresAndLosses = tuple[Float[Tensor, "batch n_sources n_receivers"], Float[Tensor, "batch"]]


class _IntegratedGradients:
    """The shared loop: fixed ``delta``, gradients averaged over interpolation steps."""

    name = ""
    default_steps = 5

    def __init__(self, steps: int | None = None) -> None:
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ArgumentError(f"{self.name}: steps must be a positive integer; got {steps!r}.")
        self.steps = steps

    def paths(self, graph: AttributionGraph) -> list[tuple[str, slice, slice]]:
        """(hook point, source rows whose ``delta`` it adds times ``1 - alpha``, rows scored)."""
        raise NotImplementedError

    def score_batch(self, context: ScoringContext, batch: Batch, batch_index: int) -> ScoresAndLosses:
        """Per-sample scores averaged over ``steps`` interpolation points, and clean losses."""
        hooks, model, mask = context.hooks, context.model, batch.attention_mask
        delta, _, clean_logits = hooks.clean_pass(context.intervention, batch, record=True)
        clean_losses = evaluate(context.objective, clean_logits, batch, batch_index)
        scores = hooks.new_scores(batch)
        paths = self.paths(context.graph)
        bar = context.progress_bar(len(paths) * self.steps, f"{self.name} steps")
        for hook_name, shifted, rows in paths:
            difference = delta[:, shifted].sum(1)  # [batch, pos, d_model]: the block's replacement - clean
            for step in range(1, self.steps + 1):
                shift = _add((1.0 - step / self.steps) * difference)
                with torch.enable_grad(), model.hooks(
                    fwd_hooks=[(hook_name, shift)] + hooks.hooks(delta, mask, None, scores, source_rows=rows)
                ):
                    logits = model(batch.input_ids, attention_mask=mask)
                    losses = evaluate(context.objective, logits, batch, batch_index, clean_logits=clean_logits)
                    losses.sum().backward()
                bar.update(1)
        bar.close()
        return scores / self.steps, clean_losses


def _add(shift: Tensor) -> Callable[[Tensor, Any], Tensor]:
    def hook(x: Tensor, hook: Any) -> Tensor:
        return x + shift.to(x.device, x.dtype)  # a layer may sit on another device (device_map)

    return hook


class EAPIGInputs(_IntegratedGradients):
    """EAP-IG with the input embeddings interpolated (Hanna et al. 2024).

    Args:
        steps: interpolation points (default 5, as in Hanna et al.); ``steps=1`` is EAP.
    """

    name = "eap-ig-inputs"

    def paths(self, graph: AttributionGraph) -> list[tuple[str, slice, slice]]:
        """One path (the input moves), along which every edge is scored."""
        return [(INPUT_HOOK, slice(0, 1), slice(0, graph.n_sources))]


class EAPIGActivations(_IntegratedGradients):
    """EAP-IG with each source block's output interpolated on its own.

    Args:
        steps: interpolation points per block (default 5); ``steps=1`` is EAP.
    """

    name = "eap-ig-activations"

    def paths(self, graph: AttributionGraph) -> list[tuple[str, slice, slice]]:
        """One path per source block (the input, each attention layer, each MLP)."""
        blocks = [(INPUT_HOOK, slice(0, 1))]
        for layer in range(graph.n_layers):
            blocks.append((f"blocks.{layer}.attn.o.hook_out", graph.attention_sources(layer)))
            row = graph.mlp_source(layer)
            blocks.append((f"blocks.{layer}.mlp.hook_out", slice(row, row + 1)))
        return [(hook, rows, rows) for hook, rows in blocks]
