"""EAP with integrated gradients (Hanna et al. 2024): EAP's gradient averaged along a path.

Both scorers use the same fixed source differences as EAP,
``delta_u = replacement(u) - clean(u)`` (from the intervention), and replace EAP's
gradient at the clean point by its average over ``steps`` points of a path from the
ablated run (``alpha = 0``) to the clean run (``alpha = 1``):

    score[b, u, v] = sum over positions, d_model of
                     delta_u * (1/steps) * sum_{k=1..steps} dL_b/d(input of v) at alpha = k/steps

By default the points are right endpoints (``alpha = 1/steps, ..., 1``), so ``steps=1``
is exactly EAP, and a score approaches the integrated-gradients value along the path as
``steps`` grows. ``points="left"`` takes ``alpha = 0, 1/steps, ..., (steps-1)/steps``
instead: the rule of hannamw/EAP-IG's ``get_scores_eap_ig`` (its
``get_scores_ig_activations`` uses right endpoints). Both sums converge to the same
integral; at a finite ``steps`` they differ by ``(grad at alpha=1 - grad at alpha=0) / steps``
times ``delta``.

- ``"eap-ig-inputs"``: the path interpolates the input embeddings (``blocks.0.hook_in``)
  from their replacement to their clean value; everything downstream follows. With
  ``intervention="patching"`` the ``alpha = 0`` end is the corrupted run. Cost per
  batch: ``steps`` forward+backward passes (plus the intervention's own pass).
- ``"eap-ig-activations"``: for each source block (the input; each attention layer,
  all of its heads together; each MLP) the path interpolates that block's output alone
  from its replacement to its clean value, and only the edges leaving that block are
  scored on it. Cost per batch: ``(2 * n_layers + 1) * steps`` forward+backward passes.

On mixture-of-experts models (top-k routing) the objective jumps wherever a token's
experts change along the path, and the average gradient does not see those jumps: the
scores' completeness holds only up to them (a warning says so; exact ablation has no
such limit).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.engine.architectures import FAMILIES
from circuitdiff.engine.sources import Window
from circuitdiff.errors import ArgumentError
from circuitdiff.scorers.base import ScoresAndLosses, boolean, positive_int

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun
    from circuitdiff.graph import AttributionGraph

__all__ = ["EAPIGInputs", "EAPIGActivations"]

#: Where along the path the gradients are taken (see the module docstring).
POINTS = ("right", "left")

#: ``(hook point, source rows whose delta it adds times 1 - alpha, rows scored)``
Path = tuple[str, slice, slice]


@dataclass(frozen=True)
class _IntegratedGradients:
    """The shared loop: fixed ``delta``, gradients averaged over interpolation steps."""

    steps: int = 5
    points: str = "right"
    checkpoint_blocks: bool = False
    positions_per_chunk: int | None = None
    fused_attention: bool | None = None

    name: ClassVar[str] = ""
    #: Options that change memory and speed, not the scores (see :mod:`circuitdiff.identity`).
    not_in_identity: ClassVar[tuple[str, ...]] = ("checkpoint_blocks", "positions_per_chunk", "fused_attention")

    def __post_init__(self) -> None:
        positive_int(self.name, "steps", self.steps)
        positive_int(self.name, "positions_per_chunk", self.positions_per_chunk, allow_none=True)
        boolean(self.name, "checkpoint_blocks", self.checkpoint_blocks)
        boolean(self.name, "fused_attention", self.fused_attention, allow_none=True)
        if self.points not in POINTS:
            raise ArgumentError(f"{self.name}: points must be one of {POINTS} (where along the path the gradient is "
                             f"taken); got {self.points!r}.")

    def alphas(self) -> list[float]:
        """The interpolation points: ``k/steps`` for ``k = 1..steps`` (right) or ``0..steps-1`` (left)."""
        first = 1 if self.points == "right" else 0
        return [k / self.steps for k in range(first, first + self.steps)]

    def paths(self, run: "AttributionRun") -> list[Path]:
        """The interpolation paths and the rows each scores."""
        raise NotImplementedError

    def score_batch(self, run: "AttributionRun", batch: Batch, batch_index: int) -> ScoresAndLosses:
        """Per-sample scores averaged over ``steps`` interpolation points, and clean losses."""
        if FAMILIES[run.spec.architecture].moe:
            warnings.warn(f"{self.name} on a mixture-of-experts model ({run.spec.architecture}): top-k routing makes "
                          "the objective jump where a token's experts change along the interpolation path, and "
                          "integrated gradients miss those jumps, so the scores need not add up to the ablation "
                          "effect however many steps; use scorer='exact' as the reference (docs/support.md).",
                          stacklevel=2)
        with run.bridge.fused_attention(self.fused_attention):
            return self._integrate(run, batch, batch_index)

    def _integrate(self, run: "AttributionRun", batch: Batch, batch_index: int) -> ScoresAndLosses:
        window = Window()
        delta, clean_logits = run.clean_pass(batch, record=True)
        clean_losses = run.loss(clean_logits, batch, batch_index)
        scores = run.new_scores(batch)
        paths = self.paths(run)
        bar = run.progress_bar(len(paths) * self.steps, f"{self.name}: {len(paths)} path(s) x {self.steps} steps",
                               unit="pass")
        for hook_name, shifted, rows in paths:
            difference = delta[:, shifted].sum(1)  # [batch, pos, d_model]: the block's replacement - clean
            for alpha in self.alphas():
                shift = _add((1.0 - alpha) * difference)
                hooks = [(hook_name, shift)] + run.receivers.hooks(delta, scores, window, source_rows=rows,
                                                                       positions_per_chunk=self.positions_per_chunk)
                run.backward_pass(batch, batch_index, hooks, checkpoint_blocks=self.checkpoint_blocks,
                                  clean_logits=clean_logits)
                bar.update(1)
        bar.close()
        return scores / self.steps, clean_losses


def _add(shift: Tensor) -> Callable[[Tensor, Any], Tensor]:
    def hook(x: Tensor, hook: Any) -> Tensor:
        return x + shift.to(x.device, x.dtype)  # a layer may sit on another device (device_map)

    return hook


@dataclass(frozen=True)
class EAPIGInputs(_IntegratedGradients):
    """EAP-IG with the input embeddings interpolated (Hanna et al. 2024).

    Args:
        steps: interpolation points (default 5, as in Hanna et al.); ``steps=1`` is EAP.
        points: ``"right"`` (default; ``alpha = 1/steps..1``) or ``"left"`` (``0..(steps-1)/steps``,
            hannamw/EAP-IG's rule for this scorer).
        checkpoint_blocks: keep only each block's input for the backward passes and rerun
            the blocks there (as ``EAP(checkpoint_blocks=True)``); same scores.
        fused_attention: attention through torch's fused kernel, without the bridge's
            ``[batch, heads, pos, pos]`` pattern: as ``EAP(fused_attention=...)`` (default
            None: wherever the kernel computes the model's attention).
        positions_per_chunk: as ``EAP(positions_per_chunk=...)``.
    """

    name: ClassVar[str] = "eap-ig-inputs"

    def paths(self, run: "AttributionRun") -> list[Path]:
        """One path (the input moves), along which every edge is scored."""
        return [(run.bridge.input_hook, slice(0, 1), slice(0, run.graph.n_sources))]


@dataclass(frozen=True)
class EAPIGActivations(_IntegratedGradients):
    """EAP-IG with each source block's output interpolated on its own.

    Args:
        steps: interpolation points per block (default 5); ``steps=1`` is EAP.
        points: ``"right"`` (default) or ``"left"``, as for :class:`EAPIGInputs`.
        checkpoint_blocks: as for :class:`EAPIGInputs`.
        fused_attention: as for :class:`EAPIGInputs`.
        positions_per_chunk: as for :class:`EAPIGInputs`.
    """

    name: ClassVar[str] = "eap-ig-activations"

    def paths(self, run: "AttributionRun") -> list[Path]:
        """One path per source block (the input, each attention layer, each MLP)."""
        graph: AttributionGraph = run.graph
        blocks = [(run.bridge.input_hook, slice(0, 1))]
        for layer in range(graph.n_layers):
            blocks.append((run.bridge.attention_output_hook(layer), graph.attention_sources(layer)))
            row = graph.mlp_source(layer)
            blocks.append((run.bridge.mlp_output_hook(layer), slice(row, row + 1)))
        return [(hook, rows, rows) for hook, rows in blocks]
