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
"""

from importlib import metadata as _metadata

from circuitdiff import (
    choices,
    circuits,
    distributed,
    engine,
    faithfulness,
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
from circuitdiff.data import IGNORE, Batch, make_batches
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
from circuitdiff.planner import MemoryEstimate, ModelShape, estimate_memory, plan_batch_size
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
    "distributed",
    "edge_tests",
    "engine",
    "estimate_memory",
    "evaluate_circuit",
    "faithfulness",
    "faithfulness_curve",
    "find_checkpoints",
    "interventions",
    "load_model",
    "make_batches",
    "meta_analysis",
    "metrics",
    "objectives",
    "plan_batch_size",
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
