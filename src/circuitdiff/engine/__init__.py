"""The attribution engine: everything that runs the model.

- :mod:`~circuitdiff.engine.architectures`: the validated families and their shapes
  (the only place shape facts live), :func:`describe_model`.
- :mod:`~circuitdiff.engine.bridge`: what the engine reads from a TransformerBridge
  (hook names from its hook points, per-layer weights, norms, attribution mode).
- :mod:`~circuitdiff.engine.products`: accumulation dtypes, exact low-precision products.
- :mod:`~circuitdiff.engine.sources`: source outputs into ``delta`` (forward hooks).
- :mod:`~circuitdiff.engine.receivers`: receiver gradients contracted with ``delta`` (backward).
- :mod:`~circuitdiff.engine.interventions`: what an ablated source is replaced with.
- :mod:`~circuitdiff.engine.ablation`: exact edge ablation in batched forward passes.
- :mod:`~circuitdiff.engine.run`: :class:`AttributionRun`, a model bound to a graph,
  objective and intervention (``graph.bind(model, ...)``), which scorers receive.
"""

from circuitdiff.engine.run import AttributionRun
from circuitdiff.engine.sources import Window

__all__ = ["AttributionRun", "Window"]
