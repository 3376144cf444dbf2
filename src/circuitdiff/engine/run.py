"""``AttributionRun``: one model bound to one graph, objective and intervention.

Made by ``graph.bind(model, objective=..., intervention=...)`` (or the constructor),
validated once (the model's architecture and flags, the graph's shape, the objective
and intervention names; mean interventions run their reference data here). Scorers
receive a run, faithfulness and ACDC work through one, and the memory planner counts the
buffers it allocates (:func:`scores_shape`); it owns the hooks' lifetime (:meth:`hooked`)
and the model's attribution mode (``with run:``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuitdiff import objectives
from circuitdiff.data import Batch
from circuitdiff.engine import interventions
from circuitdiff.engine.bridge import Bridge, attribution_mode
from circuitdiff.engine.receivers import ReceiverGradients
from circuitdiff.engine.sources import HookList, SourceRecorder, Window
from circuitdiff.errors import ArgumentError, DataError

if TYPE_CHECKING:
    from circuitdiff.graph import AttributionGraph

__all__ = ["AttributionRun", "scores_shape", "as_run"]


class AttributionRun:
    """A TransformerBridge bound to a graph, an objective and an intervention.

    Args:
        model: a TransformerBridge (see :func:`circuitdiff.load_model`).
        graph: ``AttributionGraph.from_model(model, level=...)``.
        objective: a name (``"answer_nll"``, ...) or a callable
            ``(logits [batch, pos, vocab], batch) -> losses [batch]``.
        intervention: a name (``"zero"``, ``"patching"``, ``"mean"``,
            ``"mean-positional"``) or an :class:`~circuitdiff.engine.interventions.Intervention`.
        reference_batches: the data whose average activations replace ablated sources
            (``"mean"``, ``"mean-positional"``).
        progress: show progress bars.

    Attributes:
        sources: the :class:`~circuitdiff.engine.sources.SourceRecorder` (forward hooks into ``delta``).
        receivers: the :class:`~circuitdiff.engine.receivers.ReceiverGradients` (backward contractions).
    """

    def __init__(self, model: Any, graph: "AttributionGraph", *, objective: str | Callable[..., Tensor],
                 intervention: str | interventions.Intervention = "zero",
                 reference_batches: Iterable[Batch] | None = None, progress: bool = True) -> None:
        self.bridge = Bridge(model)
        spec = self.bridge.spec
        if (graph.n_layers, graph.n_heads, graph.n_kv_heads, graph.parallel_blocks) != (
                spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.parallel_blocks):
            raise DataError(
                f"the graph ({graph!r}) was not built for this model ({spec.n_layers} layers, "
                f"{spec.n_heads} heads, {spec.n_kv_heads} kv heads); use AttributionGraph.from_model(model)."
            )
        self.model, self.graph, self.progress = model, graph, progress
        self.objective = objectives.resolve(objective)
        self.sources = SourceRecorder(self.bridge, graph)
        self.receivers = ReceiverGradients(self.bridge, graph)
        self.intervention = interventions.resolve(intervention, model, graph, reference_batches)
        self._modes: list[contextlib.ExitStack] = []

    @property
    def spec(self) -> Any:
        """The model's :class:`~circuitdiff.ModelSpec`."""
        return self.bridge.spec

    @property
    def device(self) -> torch.device:
        """Where batches and buffers live (the first device under a device map)."""
        return self.bridge.device

    @property
    def dtype(self) -> torch.dtype:
        """The accumulation dtype: float32, or float64 for float64 models."""
        return self.bridge.dtype

    def __enter__(self) -> "AttributionRun":
        """Eval mode and no parameter gradients until the block ends (both restored; blocks may nest)."""
        mode = contextlib.ExitStack()
        mode.enter_context(attribution_mode(self.model))
        self._modes.append(mode)
        return self

    def __exit__(self, *exc: object) -> None:
        self._modes.pop().close()

    def batches(self, batches: Iterable[Batch], desc: str) -> Iterator[tuple[int, Batch]]:
        """``(index, batch)`` pairs, each batch checked and moved to :attr:`device`.

        Refuses objects that are not :class:`Batch`, token ids outside the model's
        vocabulary and sequences longer than its context (all name the batch); shows a
        progress bar over batches unless the run was made with ``progress=False``.
        """
        n_batches = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        for index, batch in enumerate(tqdm(batches, total=n_batches, disable=not self.progress, desc=desc,
                                           unit="batch")):
            if not isinstance(batch, Batch):
                raise DataError(f"batch {index} is a {type(batch).__name__}; expected circuitdiff.Batch objects "
                                "(see circuitdiff.make_batches).")
            _check_tokens(self, batch, index)
            yield index, batch.to(self.device)

    def progress_bar(self, total: int, desc: str, unit: str = "it") -> tqdm:
        """A transient progress bar for work inside one batch (the caller closes it)."""
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not self.progress)

    # ------------------------------------------------------------------ buffers
    def delta_dtype(self, window: Window = Window()) -> torch.dtype:
        """The dtype ``delta`` is stored in for ``window``."""
        return self.sources.delta_dtype(window)

    def new_delta(self, batch: Batch, window: Window = Window()) -> Float[Tensor, "batch n_sources window d_model"]:
        """An uninitialised ``delta`` buffer for ``batch``'s window."""
        return self.sources.new_delta(batch.input_ids, window)

    def new_scores(self, batch: Batch) -> Float[Tensor, "batch n_sources n_receivers"]:
        """A zero per-sample score buffer for ``batch``, in the accumulation dtype."""
        return torch.zeros(scores_shape(self.graph, batch.size), dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ passes
    def hooked(self, hooks: HookList) -> contextlib.AbstractContextManager[Any]:
        """The model with ``hooks`` attached for the block; they are removed after, also on errors."""
        return self.model.hooks(fwd_hooks=hooks)

    def backward_pass(self, batch: Batch, batch_index: int, hooks: HookList, *, checkpoint_blocks: bool = False,
                      clean_logits: Tensor | None = None) -> Float[Tensor, "batch"]:
        """One forward and backward of ``batch`` with ``hooks`` attached; returns the (detached) losses.

        The receivers' gradient hooks run in the backward. ``checkpoint_blocks``: keep only
        each block's input and rerun the blocks one at a time in the backward
        (:meth:`~circuitdiff.engine.bridge.Bridge.checkpointed_blocks`).
        """
        blocks = self.bridge.checkpointed_blocks() if checkpoint_blocks else contextlib.nullcontext()
        with torch.enable_grad(), self.hooked(hooks), blocks:
            logits = self.model(batch.input_ids, attention_mask=batch.attention_mask)
            losses = self.loss(logits, batch, batch_index, clean_logits=clean_logits)
            losses.sum().backward()
        return losses.detach()

    def loss(self, logits: Tensor, batch: Batch, batch_index: int,
             clean_logits: Tensor | None = None) -> Float[Tensor, "batch"]:
        """The objective's per-sample losses, checked (see :func:`circuitdiff.objectives.evaluate`)."""
        return objectives.evaluate(self.objective, logits, batch, batch_index, clean_logits=clean_logits)

    def record_sources(self, input_ids: Tensor, attention_mask: Tensor,
                       window: Window = Window()) -> Float[Tensor, "batch n_sources window d_model"]:
        """Every source's output on ``input_ids`` (one forward without gradients, stopped after the last MLP)."""
        delta = self.sources.new_delta(input_ids, window)
        self.sources.record(input_ids, attention_mask, delta, window)
        return delta

    def replacement(self, batch: Batch, window: Window = Window()) -> Tensor | None:
        """The intervention's replacement outputs for ``window`` (None: zero), checked."""
        replaced = self.intervention.replacement(self, batch, window)
        if replaced is None:
            return None
        expected = (batch.size, self.graph.n_sources, len(window.of(batch)), self.spec.d_model)
        if tuple(replaced.shape) != expected or replaced.dtype != self.delta_dtype(window):
            raise DataError(
                f"intervention {self.intervention.name!r} returned a {tuple(replaced.shape)} {replaced.dtype} "
                f"tensor; expected {expected} {self.delta_dtype(window)}: the positions window.of(batch) only, "
                "allocated with run.new_delta(batch, window) (see circuitdiff.engine.interventions.Intervention); "
                "or run without positions_per_pass."
            )
        return replaced

    def clean_pass(self, batch: Batch, record: bool, window: Window = Window()) -> tuple[Tensor | None, Tensor]:
        """The intervention's replacements, then the clean batch once without gradients.

        Returns ``(buffer, clean_logits)``. With ``record`` the clean outputs are
        subtracted as the pass goes, so ``buffer`` is the fixed ``delta = replacement -
        clean`` (``-clean`` for a zero replacement). Without, ``buffer`` holds the
        replacements, or is None when they are zero.
        """
        buffer = self.replacement(batch, window)
        hooks: HookList = []
        if record:
            mode = "negate" if buffer is None else "subtract"
            buffer = self.new_delta(batch, window) if buffer is None else buffer
            hooks = self.sources.hooks(buffer, batch.attention_mask, mode, window)
        with torch.no_grad(), self.hooked(hooks):
            logits = self.model(batch.input_ids, attention_mask=batch.attention_mask)
        return buffer, logits


def scores_shape(graph: "AttributionGraph", batch_size: int) -> tuple[int, ...]:
    """``[batch, n_sources, n_receivers]``: the per-sample score buffer (allocated here, counted by the planner)."""
    return (batch_size, graph.n_sources, graph.n_receivers)


def as_run(model_or_run: Any, graph: "AttributionGraph", caller: str, *,
           objective: str | Callable[..., Tensor] | None, intervention: str | interventions.Intervention | None,
           reference_batches: Iterable[Batch] | None, progress: bool) -> AttributionRun:
    """The run a function works through: ``model_or_run`` itself when it is a run of ``graph``, else a new one.

    A run already holds its objective and intervention, so they must then be left unset;
    a model needs an objective (the intervention defaults to ``"zero"``).
    """
    if isinstance(model_or_run, AttributionRun):
        if objective is not None or intervention is not None or reference_batches is not None:
            raise ArgumentError(f"{caller}: a run already has its objective and intervention; set them in "
                                "graph.bind(...) and leave objective, intervention and reference_batches unset here.")
        if model_or_run.graph != graph:
            raise DataError(f"{caller}: the run was bound to another graph ({model_or_run.graph!r}) than {graph!r}.")
        return model_or_run
    if objective is None:
        raise ArgumentError(f"{caller}: objective is required with a model (or pass a run from graph.bind(...)).")
    return AttributionRun(model_or_run, graph, objective=objective, intervention=intervention or "zero",
                          reference_batches=reference_batches, progress=progress)


def _check_tokens(run: AttributionRun, batch: Batch, index: int) -> None:
    """Refuse token ids outside the vocabulary and sequences longer than the model's context."""
    d_vocab, n_ctx = run.spec.d_vocab, getattr(run.model.cfg, "n_ctx", None)
    for name in ("input_ids", "corrupted_input_ids"):
        ids = getattr(batch, name)
        if ids is not None and (bool((ids < 0).any()) or bool((ids >= d_vocab).any())):
            raise DataError(
                f"batch {index}: {name} holds token ids in [{int(ids.min())}, {int(ids.max())}] but the "
                f"model's vocabulary has {d_vocab} entries; was it tokenized with another tokenizer?"
            )
    if n_ctx is not None and batch.input_ids.shape[1] > n_ctx:
        longest = int(torch.argmax(batch.lengths))
        raise DataError(
            f"batch {index}: sample {longest} has {int(batch.lengths[longest])} tokens but the model's context "
            f"is {n_ctx} positions (learned position embeddings end there, rotary models were not trained "
            "beyond it); truncate the prompts and answers (e.g. a smaller T_cut) or drop that sample."
        )
