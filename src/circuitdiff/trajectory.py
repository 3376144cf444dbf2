"""Checkpoint trajectories: how the metrics move along a training run.

A training run keeps checkpoints every few steps (Hugging Face and TRL trainers write
``checkpoint-N`` folders with a ``config.json``; for other layouts, pass the folders that
hold each checkpoint's ``config.json``). Each checkpoint's
edge scores are compared with the initial model's (:func:`circuitdiff.compare`), on one
histogram range shared by the whole series, and every metric's differences are tested
for a monotone trend against the step (:mod:`circuitdiff.trends`), next to accuracy and
reward logs.

- :func:`find_checkpoints`: checkpoint folders sorted by step (from ``checkpoint-N`` names
  or ``trainer_state.json``), from a list, a glob or a run folder.
- :func:`read_training_log`: per-step values from TRL's ``trainer_state.json``
  (``log_history``) or a CSV with a ``step`` column.
- :func:`trajectory_from_scores`: the :class:`Trajectory` of per-checkpoint scores.
- :func:`run_trajectory`: from checkpoint folders: generate, select, score and compare,
  one model in memory at a time, resumable (``circuitdiff trajectory``).

Usage::

    initial = cd.EdgeScores.load("run/step-0.cdiff")
    series = {step: cd.EdgeScores.load(f"run/step-{step}.cdiff") for step in (10, 20, 30, 40)}
    result = cd.trajectory_from_scores(initial, series, logs=cd.read_training_log("run/trainer_state.json"))
    print(result.to_markdown())
"""

from __future__ import annotations

import csv
import gc
import glob
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from circuitdiff import metrics
from circuitdiff.comparison import Comparison, MetricComparison, compare
from circuitdiff.devices import check_devices, map_on_devices
from circuitdiff.errors import ArgumentError, DataError, MissingPathError
from circuitdiff.io import write_atomically
from circuitdiff.report import json_ready, markdown_table, number_cell
from circuitdiff.scores import EdgeScores
from circuitdiff.trends import Trend, trend

__all__ = ["Checkpoint", "Trajectory", "find_checkpoints", "read_training_log", "shared_bin_tops",
           "trajectory_from_scores", "run_trajectory"]

#: Folder names a step is read from: ``checkpoint-120``, ``checkpoint_120``, ``step-120``, ``global_step120``.
STEP_PATTERN = re.compile(r"(?:checkpoint|global_step|step)[-_]?(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder and its training step."""

    step: int
    path: Path


def find_checkpoints(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Checkpoint]:
    """Checkpoint folders sorted by step.

    Args:
        source: a run folder (its sub-folders with a ``config.json`` and a step, from
            their name or a ``trainer_state.json``); a glob pattern (``"run/checkpoint-*"``);
            or a list of checkpoint folders.

    Each folder must hold a ``config.json``. Its step is read from its name
    (``checkpoint-N``, ``step-N``, ``global_stepN``) or, failing that, from the
    ``global_step`` of its ``trainer_state.json``.

    Raises:
        MissingPathError: a path that is not a checkpoint folder, or nothing found.
        DataError: a folder without a readable step; two folders with one step.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if any(c in text for c in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(text))]
        elif Path(text).is_dir() and not (Path(text) / "config.json").is_file():
            paths = sorted(p for p in Path(text).iterdir() if p.is_dir() and (p / "config.json").is_file()
                           and (STEP_PATTERN.search(p.name) or (p / "trainer_state.json").is_file()))
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in source]
    if not paths:
        raise MissingPathError(f"no checkpoint folders found in {source!r}: pass a run folder with checkpoint-N "
                               "folders, a glob such as 'run/checkpoint-*', or a list of folders.")
    found: dict[int, Path] = {}
    for path in paths:
        if not (path / "config.json").is_file():
            raise MissingPathError(f"{str(path)!r} is not a checkpoint folder (no config.json, written by "
                                   "save_pretrained).")
        step = _step_of(path)
        if step in found:
            raise DataError(f"two checkpoints have step {step}: {str(found[step])!r} and {str(path)!r}.")
        found[step] = path
    return [Checkpoint(step, found[step]) for step in sorted(found)]


def _step_of(path: Path) -> int:
    """The training step of a checkpoint folder, from its name or its trainer_state.json."""
    match = STEP_PATTERN.search(path.name)
    if match:
        return int(match.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        step = json.loads(state.read_text()).get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    raise DataError(f"cannot tell the training step of {str(path)!r}: name it checkpoint-N (as Hugging Face "
                    "trainers do) or give it a trainer_state.json with global_step.")


def read_training_log(path: str | os.PathLike[str]) -> dict[str, dict[int, float]]:
    """Per-step values of a training log: ``{name: {step: value}}``.

    Reads TRL / Hugging Face ``trainer_state.json`` (every numeric entry of
    ``log_history`` beside ``step``; e.g. ``reward``, ``loss``) or a CSV file with a
    ``step`` (or ``global_step``) column and one column per quantity. A step logged twice
    keeps its last value; empty and non-numeric cells are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"training log {str(path)!r} does not exist.")
    if path.suffix == ".json":
        history = json.loads(path.read_text()).get("log_history")
        if not isinstance(history, list):
            raise DataError(f"{str(path)!r} has no log_history list; is it a trainer_state.json?")
        records = [entry for entry in history if isinstance(entry, dict)]
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise DataError(f"cannot read training log {str(path)!r}: expected trainer_state.json or a .csv file.")
    log: dict[str, dict[int, float]] = {}
    for record in records:
        step = _number(record.get("step", record.get("global_step")))
        if step is None:
            continue
        for name, raw in record.items():
            value = _number(raw)
            if name not in ("step", "global_step", "epoch") and value is not None:
                log.setdefault(name, {})[int(step)] = value
    if not log:
        raise DataError(f"{str(path)!r} has no numeric values logged by step (a 'step' column or entry).")
    return log


def _number(raw: Any) -> float | None:
    """``raw`` as a finite float, or None."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def shared_bin_tops(series: Sequence[EdgeScores], *, structural_zeros: bool = False,
                    breakdown: bool = True) -> dict[str, float]:
    """The top of each edge group's ``|score|`` histogram range over every model of a series.

    Pass it as ``compare(..., bin_tops=...)`` so every comparison of the series puts
    information complexity on the same bins (with the same ``structural_zeros`` and
    ``breakdown``).
    """
    if not series:
        raise ArgumentError("shared_bin_tops needs at least one EdgeScores.")
    groups = metrics.edge_groups(series[0].graph, structural_zeros, breakdown)
    tops = {g: 0.0 for g in groups}
    for scores in series:
        for g, top in metrics.largest_magnitude(scores, groups).items():
            tops[g] = max(tops[g], top)
    return tops


@dataclass(frozen=True)
class Trajectory:
    """Every checkpoint of a run compared with the initial model.

    Attributes:
        initial_step: the initial model's step.
        steps: the checkpoints' steps, increasing.
        comparisons: ``compare(initial, checkpoint)`` per step, on shared bins.
        edge_names: the graph's real edges (``graph.edge_names()`` order).
        edge_changes: ``[steps, edges]`` mean score of the checkpoint - of the initial model
            (over the same samples).
        logs: ``{name: {step: value}}`` (accuracy, reward, ...), as given.
    """

    initial_step: int
    steps: tuple[int, ...]
    comparisons: tuple[Comparison, ...]
    edge_names: tuple[str, ...]
    edge_changes: np.ndarray
    logs: dict[str, dict[int, float]] = field(default_factory=dict)

    def rows(self, group: str = "all") -> list[tuple[int, MetricComparison]]:
        """``(step, row)`` for every metric on ``group``, step by step."""
        return [(step, row) for step, c in zip(self.steps, self.comparisons, strict=True) for row in c.rows
                if row.group == group]

    def trends(self, group: str = "all", *, alpha: float = 0.05, accuracy: str = "accuracy",
               reward: str = "reward") -> list[Trend]:
        """The :class:`~circuitdiff.trends.Trend` of every metric's differences on ``group``.

        The series starts at the initial step, whose difference is 0 by definition (no
        interval), so the trend is that of the metric's own values from the initial model
        on: a change made in the first steps and kept counts. ``accuracy`` and ``reward``
        name the logs to correlate with (absent: NaN).
        """
        by_metric: dict[str, list[MetricComparison]] = {}
        for _, row in self.rows(group):
            by_metric.setdefault(row.metric, []).append(row)
        if not by_metric:
            raise ArgumentError(f"no metric rows on group {group!r}; groups: {self.comparisons[0].groups}.")
        steps = (self.initial_step, *self.steps)
        return [trend(metric, group, steps, [0.0, *(r.difference for r in rs)], [math.nan, *(r.ci_low for r in rs)],
                      [math.nan, *(r.ci_high for r in rs)], accuracy=self.logs.get(accuracy),
                      reward=self.logs.get(reward), alpha=alpha)
                for metric, rs in by_metric.items()]

    def changing_edges(self, k: int = 20) -> tuple[list[str], np.ndarray]:
        """The ``k`` edges whose mean score changed most at any step, and their ``[k, steps]`` changes."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be a positive integer; got {k!r}.")
        order = np.argsort(-np.abs(self.edge_changes).max(0), kind="stable")[:k]
        return [self.edge_names[i] for i in order], self.edge_changes[:, order].T

    def to_dict(self, group: str = "all") -> dict[str, Any]:
        """A JSON-ready dict: per-step rows of ``group``, its trends, the logs."""
        return json_ready({
            "initial_step": self.initial_step, "steps": list(self.steps),
            "rows": [{"step": step, **asdict(row)} for step, row in self.rows(group)],
            "trends": [t.to_dict() for t in self.trends(group)],
            "logs": {name: {str(s): v for s, v in values.items()} for name, values in self.logs.items()},
        })

    def to_markdown(self, group: str = "all") -> str:
        """The trend of every metric on ``group``: direction, Kendall's tau and p, first significant step."""
        cells = [[t.metric, t.direction, number_cell(t.tau), number_cell(t.p_value),
                  "-" if t.first_significant_step is None else str(t.first_significant_step),
                  number_cell(t.with_accuracy), number_cell(t.with_reward)] for t in self.trends(group)]
        head = (f"Trajectory: {len(self.steps)} checkpoints (steps {self.steps[0]}-{self.steps[-1]}) against the "
                f"initial model (step {self.initial_step}), edge group '{group}'; Mann-Kendall trend of each "
                "metric's difference from the initial step (0 there) on, two-sided.\n\n")
        return head + markdown_table(["metric", "trend", "tau", "p", "first step CI excludes 0", "tau accuracy",
                                      "tau reward"], cells)

    def save(self, path: str | os.PathLike[str], group: str = "all") -> Path:
        """Write :meth:`to_dict` as JSON (atomically: a temporary file, then a rename)."""
        path = Path(path)
        text = json.dumps(self.to_dict(group), indent=2)
        write_atomically(path, lambda tmp: tmp.write_text(text))
        return path


def trajectory_from_scores(
    initial: EdgeScores,
    series: Mapping[int, EdgeScores] | Sequence[tuple[int, EdgeScores]],
    *,
    initial_step: int = 0,
    logs: Mapping[str, Mapping[int, float]] | None = None,
    **compare_options: Any,
) -> Trajectory:
    """Compare every checkpoint's scores with the initial model's, on one shared histogram range.

    Args:
        initial: per-sample scores of the initial model.
        series: ``{step: scores}`` (or ``(step, scores)`` pairs) of the checkpoints, on
            the same graph and the same samples as ``initial`` (identical ``sample_ids``).
        initial_step: the initial model's step (below every checkpoint's).
        logs: ``{name: {step: value}}``, e.g. ``{"accuracy": {...}, "reward": {...}}``
            (:func:`read_training_log`); ``Trajectory.trends`` correlates with
            ``accuracy`` and ``reward``.
        compare_options: passed to :func:`circuitdiff.compare` for every step
            (``edge_tests`` defaults to False here; ``bin_tops`` to
            :func:`shared_bin_tops` of the whole series).
    """
    pairs = sorted(series.items() if isinstance(series, Mapping) else [tuple(p) for p in series],
                   key=lambda p: p[0])
    steps = [int(step) for step, _ in pairs]
    if not pairs:
        raise ArgumentError("trajectory_from_scores needs at least one checkpoint.")
    if len(set(steps)) != len(steps) or steps[0] <= initial_step:
        raise ArgumentError(f"checkpoint steps must be distinct and above the initial step {initial_step}; "
                            f"got {steps}.")
    if "reference_scores" in compare_options:
        raise ArgumentError("reference_scores is per comparison; run circuitdiff.compare on one step for it.")
    scores = [initial] + [s for _, s in pairs]
    for step, s in pairs:
        if not isinstance(s, EdgeScores):
            raise ArgumentError(f"step {step}: expected EdgeScores, got {type(s).__name__}.")
        if s.graph != initial.graph:
            raise DataError(f"step {step} was scored on {s.graph!r}, the initial model on {initial.graph!r}; "
                            "score every checkpoint on the same graph (level) as the initial model.")
        if s.sample_ids != initial.sample_ids:
            raise DataError(f"step {step} was scored on other samples than the initial model (its sample_ids "
                            "differ): a trajectory compares every checkpoint with the same initial samples, so "
                            "score every checkpoint on the same texts (select them with EdgeScores.select_samples).")
    options = {"edge_tests": False, **compare_options}
    if options.get("bin_tops") is None:
        options["bin_tops"] = shared_bin_tops(scores, structural_zeros=options.get("structural_zeros", False),
                                              breakdown=options.get("breakdown", True))
    comparisons = tuple(compare(initial, s, **options) for _, s in pairs)
    mask = initial.graph.edge_mask.numpy()
    base_mean = initial.mean.double().numpy()[mask]
    changes = np.stack([s.mean.double().numpy()[mask] - base_mean for _, s in pairs])
    return Trajectory(initial_step, tuple(steps), comparisons, tuple(initial.graph.edge_names()), changes,
                      {name: {int(k): float(v) for k, v in values.items()} for name, values in (logs or {}).items()})


def run_trajectory(
    initial: str | os.PathLike[str],
    checkpoints: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    questions_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: Any = None,
    *,
    initial_step: int = 0,
    logs: Mapping[str, Mapping[int, float]] | None = None,
    devices: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Trajectory:
    """A training run's checkpoints against its initial model, from checkpoint folders.

    1. Every model (the initial one, then each checkpoint by step) answers every
       question, one model in memory at a time; its accuracy is logged as ``accuracy``.
    2. The samples: the questions that *every* model answers correctly, chosen and
       truncated by the config's length rule between the initial model and the last
       checkpoint (one ``T_cut`` for the series), less any question a middle step
       answers in fewer than ``T_cut`` tokens, so every step is scored on the same
       questions (each model on its own answer).
    3. Each model is scored (again one at a time), and :func:`trajectory_from_scores`
       compares every checkpoint with the initial model.

    Writes ``out/step-N.generations.jsonl``, ``out/step-N.cdiff`` (resumable in
    ``out/step-N-KEY.SCORER.shards/``, KEY naming the selection), ``out/trajectory.json``,
    ``out/report.md``, ``out/run.json`` and, with matplotlib, ``out/figures/``. Started
    again it reuses every finished generation and score shard (identity-checked like
    every pipeline run); with a checkpoint added, the answers of the others are reused
    and every step is scored again on the new selection.

    Args:
        initial: the initial model's checkpoint folder (``initial_step``).
        checkpoints: what :func:`find_checkpoints` accepts (a run folder, a glob, folders).
        questions_path: the questions (JSONL; see docs/pipeline.md).
        out: the output folder.
        config: a :class:`~circuitdiff.pipeline.PipelineConfig` (the pipeline's defaults;
            ``robustness`` and ``cross_score`` do not apply).
        logs: more per-step logs (e.g. ``reward`` from :func:`read_training_log`).
        devices: spread the checkpoints over these devices, one worker process each
            (:func:`circuitdiff.devices.map_on_devices`); default: the config's device,
            in this process.
    """
    from circuitdiff.data.templates import template_identity
    from circuitdiff.pipeline import _chosen, _start, cut_answers, output_lock, template_tokenizer, write_text

    found = find_checkpoints(checkpoints)
    if found[0].step <= initial_step:
        raise DataError(f"every checkpoint's step must be above the initial step {initial_step}; the first is "
                        f"{found[0].step} ({str(found[0].path)!r}).")
    if logs and "accuracy" in logs:
        raise ArgumentError("logs has an 'accuracy' entry, but the trajectory logs each step's own accuracy; "
                            "rename that log (e.g. 'train_accuracy').")
    models = [(initial_step, Path(initial))] + [(c.step, c.path) for c in found]
    outputs = ("trajectory.json", "report.md", "run.json",
               *(f"step-{step}.{kind}" for step, _ in models for kind in ("cdiff", "generations.jsonl")))
    new = not Path(out).exists()
    config, questions, out, device = _start(config, questions_path, out, outputs, initial)
    devices = check_devices(devices) if devices is not None else [device]

    def each_step(job: Callable[..., Any], items: list[tuple]) -> dict[int, Any]:
        outcomes = map_on_devices(job, items, devices, log=log, progress=config.progress, stop_on_error=True)
        return {step: value for (step, _), (value, _) in zip(models, outcomes, strict=True)}

    with output_lock(out, remove_if_left_empty=new):
        generations = each_step(_answers, [(step, path, questions, out, config) for step, path in models])
        accuracy = {step: sum(g.correct for g in answers) / len(questions) for step, answers in generations.items()}
        first, last = generations[initial_step], generations[models[-1][0]]
        for step, _ in models[1:]:
            if [g.prompt_length for g in generations[step]] != [g.prompt_length for g in first]:
                raise DataError(f"step {step}'s tokenizer encodes the prompts differently from the initial model's; "
                                "a trajectory compares checkpoints of one model family.")
        everywhere = [i for i in range(len(questions)) if all(generations[s][i].correct for s, _ in models)]
        if not everywhere:
            raise DataError("no question is answered correctly at every step (accuracy per step: "
                            f"{ {step: round(a, 3) for step, a in accuracy.items()} }); use more questions.")
        counts: dict[str, Any] = {"questions": len(questions), "correct at every step": len(everywhere)}
        for step, answers in generations.items():  # warned about by each step's job (a worker's, with devices)
            cut = cut_answers(answers, config.max_new_tokens)
            if cut:
                counts[f"cut at {config.max_new_tokens} tokens (step {step})"] = cut
        selection = config.select([len(first[i].answer_ids) for i in everywhere],
                                  [len(last[i].answer_ids) for i in everywhere],
                                  prompt_lengths=([first[i].prompt_length for i in everywhere],
                                                  [last[i].prompt_length for i in everywhere]))
        chosen = _chosen(everywhere, selection, counts)
        # the rule saw the first and last step's lengths; a middle step's answer may be shorter than T_cut
        chosen = [i for i in chosen if all(len(generations[s][i].answer_ids) >= selection.t_cut for s, _ in models)]
        counts["dropped: shorter than T_cut at a middle step"] = counts["scored"] - len(chosen)
        counts["scored"] = len(chosen)
        if not chosen:
            raise DataError(f"no question is left to score after the length rule (counts: {counts}).")
        log(f"{len(everywhere)} questions answered correctly at every step; kept {len(chosen)}; "
            f"T_cut = {selection.t_cut} tokens")
        # shards keyed by the selection (pipeline.selection_key): a series that grows (a new checkpoint, so other
        # questions) resumes its answers and scores the earlier steps again in new shard folders
        each_step(_step_scores, [(step, path, questions, generations[step], chosen, selection.t_cut, config, out)
                                 for step, path in models])
        scores = {step: EdgeScores.load(out / f"step-{step}.cdiff") for step, _ in models}
        common = [i for i in scores[initial_step].sample_ids if all(i in s.sample_ids for s in scores.values())]
        if any(s.sample_ids != tuple(common) for s in scores.values()):  # nonfinite="drop" left some out
            counts["left out: non-finite scores at some step"] = len(chosen) - len(common)
            scores = {step: s.select_samples(common) for step, s in scores.items()}
        result = trajectory_from_scores(scores[initial_step], {s: v for s, v in scores.items() if s != initial_step},
                                        initial_step=initial_step, logs={"accuracy": accuracy, **(logs or {})})
        result.save(out / "trajectory.json")
        write_text(out / "report.md", f"# circuitdiff trajectory\n\n{result.to_markdown()}\n")
        write_text(out / "run.json", json.dumps(json_ready({
            "initial": str(initial), "checkpoints": {str(step): str(path) for step, path in models[1:]},
            "questions": str(questions_path),
            "template": template_identity(config.template, template_tokenizer(config.template, initial)),
            "device": devices[0] if len(devices) == 1 else devices, "counts": counts,
            "config": {k: v for k, v in asdict(config).items() if k not in ("robustness", "robustness_samples",
                                                                              "reference_scorer", "cross_score")},
            "t_cut": selection.t_cut, "accuracy": accuracy, "figures": _trajectory_plots(result, out / "figures"),
        }), indent=2))
    log(f"report: {out / 'report.md'}")
    return result


def _answers(item: tuple, device: str, log: Callable[[str], None]) -> list[Any]:
    """One step's answers (a :func:`~circuitdiff.devices.map_on_devices` job; the model is freed after)."""
    from circuitdiff.pipeline import _generate, _load

    step, path, questions, out, config = item
    log(f"--- step {step}: {path} (answers) ---")
    model = _load(path, device, config.torch_dtype(device), config.level)
    answers = _generate(model, questions, out / f"step-{step}.generations.jsonl", config, name=f"step {step}")
    log(f"step {step}: {sum(g.correct for g in answers) / len(questions):.1%} answered correctly")
    del model
    _free_memory()
    return answers


def _step_scores(item: tuple, device: str, log: Callable[[str], None]) -> None:
    """One step's scores on its own answers to the chosen questions, saved to ``out/step-N.cdiff``.

    A job like :func:`_answers`; the scores are read back from the file (not returned,
    so a large per-sample tensor does not travel between processes).
    """
    from circuitdiff.pipeline import _load, _score

    step, path, questions, answers, chosen, t_cut, config, out = item
    log(f"--- step {step}: {path} (scores) ---")
    model = _load(path, device, config.torch_dtype(device), config.level)
    _score(model, questions, answers, chosen, t_cut, config, out, f"step-{step}")
    del model
    _free_memory()


def _free_memory() -> None:
    """Collect the model just dropped before the next one loads (one model in memory at a time)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trajectory_plots(result: Trajectory, directory: Path) -> list[str]:
    """The trajectory's figures, or none when matplotlib is not installed."""
    from circuitdiff.plots import plot_changing_edges, plot_trajectory

    try:
        directory.mkdir(parents=True, exist_ok=True)
        return [str(plot_trajectory(result, directory / "trajectory.png")),
                str(plot_changing_edges(result, directory / "changing-edges.png"))]
    except ImportError:  # MissingDependencyError: matplotlib is an optional extra
        return []
