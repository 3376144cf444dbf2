"""circuitdiff: score every edge of a transformer's residual-stream graph, then compare models.

Typical use::

    import circuitdiff as cd
    model = cd.load_model("path/to/checkpoint", dtype=torch.bfloat16)
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = cd.make_batches(model.tokenizer, prompts, answers)
    scores = cd.attribute(model, graph, batches, objective="answer_nll", intervention="zero")
    scores.save("run.cdiff")

Scores estimate ``objective(edge ablated) - objective(clean)`` per sample, objectives
oriented as losses: positive means the edge helps.

The names below are imported on first use (PEP 562), so ``import circuitdiff`` and
``circuitdiff --help`` do not load torch or TransformerLens until something needs them.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

#: The public submodules, imported on first use.
_SUBMODULES = ("choices", "circuits", "distributed", "engine", "export", "faithfulness", "hub", "metrics", "objectives",
               "planner", "report", "scorers")
#: Each public name and the module it lives in, imported on first use.
_EXPORTS = {
    "ACDCResult": "circuitdiff.acdc",
    "acdc": "circuitdiff.acdc",
    "Agreement": "circuitdiff.agreement",
    "agreement": "circuitdiff.agreement",
    "attribute": "circuitdiff.attribution",
    "Circuit": "circuitdiff.circuits",
    "Comparison": "circuitdiff.comparison",
    "compare": "circuitdiff.comparison",
    "CrossComparison": "circuitdiff.crossscore",
    "cross_compare": "circuitdiff.crossscore",
    "EdgeTests": "circuitdiff.differential",
    "edge_tests": "circuitdiff.differential",
    "IGNORE": "circuitdiff.data",
    "Batch": "circuitdiff.data",
    "make_batches": "circuitdiff.data",
    "grading": "circuitdiff.data",
    "load_questions": "circuitdiff.data",
    "template_identity": "circuitdiff.data",
    "AttributionRun": "circuitdiff.engine",
    "interventions": "circuitdiff.engine",
    "ArgumentError": "circuitdiff.errors",
    "ArgumentTypeError": "circuitdiff.errors",
    "CircuitDiffError": "circuitdiff.errors",
    "DataError": "circuitdiff.errors",
    "DistributedError": "circuitdiff.errors",
    "DuplicateNameError": "circuitdiff.errors",
    "FileFormatError": "circuitdiff.errors",
    "IdentityMismatchError": "circuitdiff.errors",
    "MemoryPlanError": "circuitdiff.errors",
    "MissingDependencyError": "circuitdiff.errors",
    "MissingPathError": "circuitdiff.errors",
    "NonFiniteError": "circuitdiff.errors",
    "ObjectiveError": "circuitdiff.errors",
    "PluginLoadError": "circuitdiff.errors",
    "RunLockedError": "circuitdiff.errors",
    "UnknownNameError": "circuitdiff.errors",
    "ShapeError": "circuitdiff.errors",
    "UnsupportedModelError": "circuitdiff.errors",
    "evaluate_circuit": "circuitdiff.faithfulness",
    "faithfulness_curve": "circuitdiff.faithfulness",
    "AttributionGraph": "circuitdiff.graph",
    "register_metric": "circuitdiff.metrics",
    "SUPPORTED_ARCHITECTURES": "circuitdiff.models",
    "ModelSpec": "circuitdiff.models",
    "describe_model": "circuitdiff.models",
    "load_model": "circuitdiff.models",
    "supported_levels": "circuitdiff.models",
    "MemoryEstimate": "circuitdiff.planner",
    "ModelShape": "circuitdiff.planner",
    "estimate_memory": "circuitdiff.planner",
    "plan_batch_size": "circuitdiff.planner",
    "plan_scorer": "circuitdiff.planner",
    "Robustness": "circuitdiff.robustness",
    "check_scorer_robustness": "circuitdiff.robustness",
    "scorer_robustness": "circuitdiff.robustness",
    "EdgeScores": "circuitdiff.scores",
    "meta_analysis": "circuitdiff.meta",
    "Study": "circuitdiff.study",
    "run_study": "circuitdiff.study",
    "Trajectory": "circuitdiff.trajectory",
    "find_checkpoints": "circuitdiff.trajectory",
    "read_training_log": "circuitdiff.trajectory",
    "run_trajectory": "circuitdiff.trajectory",
    "trajectory_from_scores": "circuitdiff.trajectory",
    "Trend": "circuitdiff.trends",
}

if TYPE_CHECKING:  # what static tools see; tests/test_lazy_import.py keeps it equal to _EXPORTS
    from circuitdiff import (
        choices,
        circuits,
        distributed,
        engine,
        export,
        faithfulness,
        hub,
        metrics,
        objectives,
        planner,
        report,
        scorers,
    )
    from circuitdiff.acdc import ACDCResult, acdc
    from circuitdiff.agreement import Agreement, agreement
    from circuitdiff.attribution import attribute
    from circuitdiff.circuits import Circuit
    from circuitdiff.comparison import Comparison, compare
    from circuitdiff.crossscore import CrossComparison, cross_compare
    from circuitdiff.differential import EdgeTests, edge_tests
    from circuitdiff.data import IGNORE, Batch, grading, load_questions, make_batches, template_identity
    from circuitdiff.engine import AttributionRun, interventions
    from circuitdiff.errors import (
        ArgumentError,
        ArgumentTypeError,
        CircuitDiffError,
        DataError,
        DistributedError,
        DuplicateNameError,
        FileFormatError,
        IdentityMismatchError,
        MemoryPlanError,
        MissingDependencyError,
        MissingPathError,
        NonFiniteError,
        ObjectiveError,
        PluginLoadError,
        RunLockedError,
        UnknownNameError,
        ShapeError,
        UnsupportedModelError,
    )
    from circuitdiff.faithfulness import evaluate_circuit, faithfulness_curve
    from circuitdiff.graph import AttributionGraph
    from circuitdiff.metrics import register_metric
    from circuitdiff.models import SUPPORTED_ARCHITECTURES, ModelSpec, describe_model, load_model, supported_levels
    from circuitdiff.planner import MemoryEstimate, ModelShape, estimate_memory, plan_batch_size, plan_scorer
    from circuitdiff.robustness import Robustness, check_scorer_robustness, scorer_robustness
    from circuitdiff.scores import EdgeScores
    from circuitdiff.meta import meta_analysis
    from circuitdiff.study import Study, run_study
    from circuitdiff.trajectory import (Trajectory, find_checkpoints, read_training_log, run_trajectory,
                                        trajectory_from_scores)
    from circuitdiff.trends import Trend

try:
    __version__ = _metadata.version("circuitdiff")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "unknown"


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    if name in _SUBMODULES:
        return import_module(f"circuitdiff.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'circuitdiff' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's type: importing ``circuitdiff.acdc`` must not replace the function ``cd.acdc``.

    The import system sets each loaded submodule as an attribute of its package; where a
    public name shares its module's name (``acdc``, ``agreement``), the name is kept.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "ACDCResult",
    "Agreement",
    "ArgumentError",
    "ArgumentTypeError",
    "AttributionGraph",
    "AttributionRun",
    "Batch",
    "Circuit",
    "CircuitDiffError",
    "Comparison",
    "CrossComparison",
    "DataError",
    "DistributedError",
    "DuplicateNameError",
    "EdgeScores",
    "EdgeTests",
    "FileFormatError",
    "IGNORE",
    "IdentityMismatchError",
    "MemoryEstimate",
    "MemoryPlanError",
    "MissingDependencyError",
    "MissingPathError",
    "ModelShape",
    "ModelSpec",
    "NonFiniteError",
    "ObjectiveError",
    "PluginLoadError",
    "Robustness",
    "RunLockedError",
    "ShapeError",
    "SUPPORTED_ARCHITECTURES",
    "Study",
    "Trajectory",
    "Trend",
    "UnknownNameError",
    "UnsupportedModelError",
    "acdc",
    "agreement",
    "attribute",
    "check_scorer_robustness",
    "choices",
    "circuits",
    "compare",
    "cross_compare",
    "describe_model",
    "supported_levels",
    "template_identity",
    "distributed",
    "edge_tests",
    "engine",
    "estimate_memory",
    "evaluate_circuit",
    "export",
    "faithfulness",
    "faithfulness_curve",
    "find_checkpoints",
    "grading",
    "hub",
    "interventions",
    "load_model",
    "load_questions",
    "make_batches",
    "meta_analysis",
    "metrics",
    "objectives",
    "plan_batch_size",
    "plan_scorer",
    "planner",
    "read_training_log",
    "register_metric",
    "report",
    "run_study",
    "run_trajectory",
    "scorer_robustness",
    "scorers",
    "trajectory_from_scores",
]
