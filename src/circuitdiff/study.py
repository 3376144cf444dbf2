"""Studies: a grid of settings run (or resumed) into one folder and summarised as the paper does.

A study file (TOML) names model pairs, question files and pipeline settings; every
combination is one :func:`circuitdiff.pipeline.run_compare` in its own sub-folder. A
failed setting is reported, not fatal. The comparisons are then pooled per metric
(:func:`circuitdiff.meta.meta_analysis`: mean relative change, fraction of settings up,
DerSimonian-Laird random effects with I^2)::

    # study.toml (paths relative to this file)
    [defaults]                    # PipelineConfig settings shared by every run
    level = "layer"
    n = 100

    [[pairs]]
    name = "grpo"
    base = "models/base"
    tuned = "models/grpo"

    [[datasets]]
    name = "gsm8k"
    questions = "data/gsm8k.jsonl"

    [grid]                        # optional: PipelineConfig settings to cross, each a list
    rule = ["paper", "code"]

``circuitdiff study study.toml --out DIR`` or ``cd.run_study("study.toml", "DIR")`` writes
``DIR/<setting>/`` per setting, ``DIR/study.json``, ``DIR/study.md`` and, with
matplotlib, ``DIR/figures/forest-<metric>.png``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from circuitdiff.comparison import Comparison
from circuitdiff.devices import check_devices, map_on_devices
from circuitdiff.data.datasets import DATASETS
from circuitdiff.errors import ArgumentError, DataError, MissingPathError
from circuitdiff.hub import is_hub_id
from circuitdiff.meta import Pooled, meta_analysis
from circuitdiff.pipeline import PipelineConfig, run_compare, write_text
from circuitdiff.report import json_ready, markdown_table, number_cell

__all__ = ["Setting", "Study", "read_study", "run_study"]

#: The sections a study file may have.
SECTIONS = ("defaults", "pairs", "datasets", "grid")


@dataclass(frozen=True)
class Setting:
    """One run of a study: a model pair on a question file with pipeline settings."""

    name: str
    base: Path
    tuned: Path
    questions: Path
    config: PipelineConfig


@dataclass
class Study:
    """The settings run, their comparisons, the failures and the pooled metrics."""

    settings: list[Setting]
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    pooled: list[Pooled] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Settings run and failed, then per metric: mean relative change, fraction up, random-effects pool."""
        lines = [f"# circuitdiff study\n\n{len(self.comparisons)} of {len(self.settings)} settings ran."]
        if self.failures:
            lines.append("Failed (left out of the summary):\n\n" + "\n".join(
                f"- `{name}`: {reason}" for name, reason in self.failures.items()))
        if self.pooled:
            cells = [[p.metric, _pct(p.mean_percent_change), f"{p.fraction_up:.0%}", number_cell(p.pooled.estimate),
                      f"[{number_cell(p.pooled.ci_low)}, {number_cell(p.pooled.ci_high)}]", number_cell(p.pooled.p_value),
                      number_cell(p.pooled.tau2), _share(p.pooled.i2)] for p in self.pooled]
            lines.append("Per metric over the settings (edge group 'all'): the mean relative change and the share of "
                         "settings where the metric went up (the paper's summary), and the DerSimonian-Laird "
                         "random-effects pooled difference (tuned - base) with its interval (at the comparisons' "
                         "confidence), p-value, "
                         "between-setting variance tau^2 and I^2.\n\n" + markdown_table(
                             ["metric", "mean change", "settings up", "pooled difference", "interval", "p", "tau^2",
                              "I^2"], cells))
            left_out = sorted({name for p in self.pooled for name in p.left_out})
            if left_out:
                lines.append(f"Left out of some pools (a non-finite difference or a zero-width interval): "
                             f"{', '.join(left_out)}.")
        return "\n\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: settings, failures, pooled metrics."""
        return json_ready({
            "settings": [{"name": s.name, "base": str(s.base), "tuned": str(s.tuned), "questions": str(s.questions),
                          "config": asdict(s.config), "ran": s.name in self.comparisons} for s in self.settings],
            "failures": self.failures,
            "pooled": [p.to_dict() for p in self.pooled],
        })


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:+.1f}%"


def _share(value: float) -> str:
    return "-" if value != value else f"{value:.0%}"


def read_study(path: str | os.PathLike[str]) -> list[Setting]:
    """The settings of a study file, checked before anything runs (paths exist, settings valid)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"study file {str(path)!r} does not exist.")
    try:
        with path.open("rb") as handle:  # TOML is UTF-8 whatever the locale
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise DataError(f"{str(path)!r} has unknown sections {unknown}; a study has {list(SECTIONS)}.")
    root = path.parent
    pairs = _entries(data, "pairs", ("name", "base", "tuned"), path)
    datasets = _entries(data, "datasets", ("name", "questions"), path)
    grid = data.get("grid", {})
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise DataError(f"{str(path)!r}: [grid] maps settings to non-empty lists, e.g. rule = [\"paper\", \"code\"].")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise DataError(f"{str(path)!r}: [defaults] is a table of pipeline settings, e.g. level = \"layer\".")
    settings = []
    for pair, dataset, values in itertools.product(pairs, datasets, itertools.product(*grid.values())):
        chosen = dict(zip(grid, values))
        name = "__".join([pair["name"], dataset["name"], *(f"{k}={v}" for k, v in chosen.items())])
        try:
            config = PipelineConfig.from_dict({**defaults, **chosen})
            config.validate()
        except (ArgumentError, DataError, TypeError) as exc:
            raise DataError(f"{str(path)!r}, setting {name!r}: {exc}") from None
        files = {key: _resolve(root, key, value) for key, value in
                 (("base", pair["base"]), ("tuned", pair["tuned"]), ("questions", dataset["questions"]))}
        for key, file in files.items():
            if not file.exists() and not _by_name(key, str(file)):
                raise MissingPathError(f"{str(path)!r}, setting {name!r}: {key} {str(file)!r} does not exist (nor is "
                                       "it a Hub id or a named dataset).")
        settings.append(Setting(name, files["base"], files["tuned"], files["questions"], config))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise DataError(f"{str(path)!r}: two settings share the name {next(n for n in names if names.count(n) > 1)!r}; "
                        "give every pair and dataset its own name, and every grid list distinct values.")
    return settings


def _entries(data: dict[str, Any], section: str, keys: tuple[str, ...], path: Path) -> list[dict[str, str]]:
    """The ``[[section]]`` tables, each with exactly ``keys`` (strings) and a name fit for a folder."""
    entries = data.get(section)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{str(path)!r} needs at least one [[{section}]] table with {', '.join(keys)}.")
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != set(keys) or not all(isinstance(entry[k], str) for k in keys):
            raise DataError(f"{str(path)!r}: every [[{section}]] has exactly {', '.join(keys)} (strings); "
                            f"got {entry!r}.")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", entry["name"]):
            raise DataError(f"{str(path)!r}: [[{section}]] name {entry['name']!r} must be letters, digits, '.', "
                            "'_' or '-' (it names a folder).")
    return entries


def _resolve(root: Path, key: str, value: str) -> Path:
    """``value`` relative to the study file's folder; a Hub id or dataset name that is no path there stays as is."""
    path = Path(value).expanduser()
    if path.is_absolute() or (root / path).exists() or not _by_name(key, value):
        return path if path.is_absolute() else root / path
    return path


def _by_name(key: str, value: str) -> bool:
    """Whether ``value`` names a model (a Hub id, read from the cache when run) or a dataset, not a path."""
    if key != "questions":
        return is_hub_id(value)
    return value in DATASETS or (is_hub_id(value) and Path(value).suffix.lower() not in (".jsonl", ".json", ".parquet"))


def run_study(study: str | os.PathLike[str], out: str | os.PathLike[str],
              log: Callable[[str], None] = print, devices: Sequence[str] | None = None) -> Study:
    """Run (or resume) every setting of a study file into ``out``, then pool the comparisons.

    Each setting runs :func:`~circuitdiff.pipeline.run_compare` in ``out/<setting name>``
    (resumable, with its identity checks). A setting that raises is recorded in
    ``Study.failures`` with its error and left out of the summary; the others go on.
    ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) spreads the settings over one worker
    process per device (:func:`circuitdiff.devices.map_on_devices`), each setting run
    on its worker's device; by default they run here, each on its own config's device.
    """
    settings = read_study(study)
    targets: list[Any] = check_devices(devices) if devices is not None else [None]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = Study(settings)
    items = [(index, len(settings), setting, out) for index, setting in enumerate(settings, 1)]
    outcomes = map_on_devices(_run_setting, items, targets, log=log,
                              progress=all(s.config.progress for s in settings))
    for setting, (comparison, error) in zip(settings, outcomes, strict=True):
        if error is None:
            result.comparisons[setting.name] = comparison
        else:
            result.failures[setting.name] = f"{type(error).__name__}: {error}"
            log(f"setting {setting.name} failed: {result.failures[setting.name]}")
    if result.comparisons:
        try:
            result.pooled = meta_analysis(result.comparisons)
        except ArgumentError as exc:  # e.g. a resumed folder compared with other metrics: keep the runs' results
            result.failures["summary"] = f"ArgumentError: {exc}"
            log(f"the summary failed: {exc}")
    write_text(out / "study.json", json.dumps(result.to_dict(), indent=2))
    write_text(out / "study.md", result.to_markdown())
    if result.pooled:
        _forest_plots(result, out / "figures")
    log(f"study: {out / 'study.md'}")
    return result


def _run_setting(item: tuple, device: str | None, log: Callable[[str], None]) -> Comparison:
    """One setting's comparison (a :func:`~circuitdiff.devices.map_on_devices` job), on ``device`` if given."""
    index, total, setting, out = item
    log(f"--- setting {index}/{total}: {setting.name} ---")
    config = setting.config if device is None else replace(setting.config, device=device)
    return run_compare(setting.base, setting.tuned, setting.questions, out / setting.name, config, log=log)


def _forest_plots(result: Study, directory: Path) -> None:
    """One forest plot per metric, when matplotlib is installed."""
    try:
        from circuitdiff.plots import plot_forest

        directory.mkdir(parents=True, exist_ok=True)
        for pooled in result.pooled:
            plot_forest(pooled, directory / f"forest-{pooled.metric}.png")
    except ImportError:  # MissingDependencyError: matplotlib is an optional extra
        return
