"""The bundled demo: a miniature of the paper's experiment that runs on a laptop CPU.

Three tiny Llama checkpoints ship inside the package (``circuitdiff/demo_data/``), made by
``examples/train_demo_models.py`` on synthetic arithmetic (``Q: 12+7*3=`` answered
`` 7*3=21 12+21=33 \\boxed{33}``):

- ``base``: supervised fine-tuning (TRL ``SFTTrainer``), deliberately under-trained;
- ``grpo``: ``base`` + online RL (TRL ``GRPOTrainer``, reward = correct final answer);
- ``dpo``: ``base`` + DPO (TRL ``DPOTrainer``) on pairs sampled once from ``base``.

``demo_data/grpo-run/`` is a second GRPO run from ``base`` with the same seed and
settings, its weights saved every 100 steps (``checkpoint-100`` ... ``checkpoint-600``)
and its ``trainer_state.json`` (the reward logged every 20 steps).
``demo_data/questions.jsonl`` holds held-out problems and ``demo_data/manifest.json``
records how everything was made (seed, budgets, accuracies, library versions) and the
SHA-256 of every file. :func:`run_demo` runs :func:`circuitdiff.pipeline.run_compare`
for base vs grpo and base vs dpo and puts the two summaries side by side;
:func:`run_demo_trajectory` follows the GRPO run checkpoint by checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from circuitdiff.comparison import Comparison
from circuitdiff.errors import DataError
from circuitdiff.pipeline import PipelineConfig, run_compare, write_text
from circuitdiff.report import change_cell, markdown_table
from circuitdiff.robustness import Robustness
from circuitdiff.trajectory import Trajectory, read_training_log, run_trajectory

__all__ = ["DEMO_DATA", "TUNED_MODELS", "GRPO_RUN", "demo_config", "check_demo_files", "file_sha256", "run_demo",
           "run_demo_trajectory", "side_by_side"]

#: Where the bundled checkpoints, questions and manifest live.
DEMO_DATA = Path(__file__).parent / "demo_data"
#: The tuned checkpoints compared with ``base``, in report order.
TUNED_MODELS = ("grpo", "dpo")
#: The GRPO run's folder (``checkpoint-N`` folders and ``trainer_state.json``) in the demo data.
GRPO_RUN = "grpo-run"


def demo_config(**overrides) -> PipelineConfig:
    """The demo's pipeline settings: the paper's length rules except ``alpha=0.5``.

    The demo's answers are about 25 tokens long, so the paper's ``alpha=0.1`` would score
    2 tokens; ``alpha=0.5`` scores about the first half (the first arithmetic step).
    """
    settings = dict(alpha=0.5, n=200, level="layer", batch_size=32, max_new_tokens=48, device="cpu",
                    dtype="float32")
    settings.update(overrides)
    return PipelineConfig(**settings)


def check_demo_files(data_dir: str | os.PathLike[str] = DEMO_DATA) -> dict:
    """Check every file against the SHA-256 in ``manifest.json``; returns the manifest.

    Raises:
        DataError: the manifest is missing, a file is missing or changed, or a file in a
            model folder is not in the manifest.
    """
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"no demo manifest at {str(path)!r}; reinstall circuitdiff, or point to a folder written by "
                        "examples/train_demo_models.py --out.")
    manifest = json.loads(path.read_text())
    expected = manifest.get("files", {})
    for name, digest in expected.items():
        file = data_dir / name
        if not file.is_file():
            raise DataError(f"the demo file {str(file)!r} is missing; reinstall circuitdiff.")
        if file_sha256(file) != digest:
            raise DataError(f"the demo file {str(file)!r} does not match its SHA-256 in {path}; it was changed or "
                            "damaged. Reinstall circuitdiff, or retrain with examples/train_demo_models.py.")
    present = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(expected) - {"manifest.json"})
    if unlisted:
        raise DataError(f"files in {str(data_dir)!r} that the manifest does not list: {unlisted}; remove them.")
    return manifest


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks (what ``manifest.json`` records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_demo(
    out: str | os.PathLike[str] = "circuitdiff-demo",
    config: PipelineConfig | None = None,
    data_dir: str | os.PathLike[str] = DEMO_DATA,
    log: Callable[[str], None] = print,
) -> dict[str, Comparison]:
    """Compare base with each tuned demo model; returns ``{"grpo": ..., "dpo": ...}``.

    Writes ``out/base-vs-grpo/`` and ``out/base-vs-dpo/`` (each a full
    :func:`~circuitdiff.pipeline.run_compare` output: report, JSON, scores, figures) and
    ``out/report.md`` with :func:`side_by_side`. Started again, it reuses finished work.
    """
    manifest = check_demo_files(data_dir)
    data_dir, out = Path(data_dir), Path(out)
    config = config or demo_config()
    accuracy = manifest.get("accuracy", {})
    log("Bundled demo models (greedy accuracy on the held-out questions, from the manifest): "
        + ", ".join(f"{name} {accuracy[name]:.1%}" for name in ("base", *TUNED_MODELS) if name in accuracy))
    results = {}
    for name in TUNED_MODELS:
        log(f"--- base vs {name} ---")
        _reuse_base_generations(out, out / f"base-vs-{name}" / "base.generations.jsonl")
        results[name] = run_compare(data_dir / "base", data_dir / name, data_dir / "questions.jsonl",
                                    out / f"base-vs-{name}", config, log=log)
    table = side_by_side(results)
    write_text(out / "report.md", (
        "# circuitdiff demo\n\nTiny Llama checkpoints trained on synthetic arithmetic (see "
        "circuitdiff/demo_data/manifest.json); each tuned model is compared with base on the questions both "
        f"answer correctly. Full reports: {', '.join(f'base-vs-{n}/report.md' for n in TUNED_MODELS)}.\n\n"
        f"{table}\n"))
    log(table)
    log(f"Reports, scores and figures are in {out}/")
    return results


def run_demo_trajectory(
    out: str | os.PathLike[str] = "circuitdiff-demo",
    config: PipelineConfig | None = None,
    data_dir: str | os.PathLike[str] = DEMO_DATA,
    log: Callable[[str], None] = print,
    devices: Sequence[str] | None = None,
) -> Trajectory:
    """``base`` (step 0) against every checkpoint of the bundled GRPO run, with its reward log.

    Writes ``out/trajectory/`` (see :func:`~circuitdiff.trajectory.run_trajectory`);
    started again, it reuses finished work, and the base answers of an earlier
    :func:`run_demo` in ``out``.
    """
    check_demo_files(data_dir)
    data_dir, out = Path(data_dir), Path(out)
    run = data_dir / GRPO_RUN
    reward = read_training_log(run / "trainer_state.json")["reward"]
    _reuse_base_generations(out, out / "trajectory" / "step-0.generations.jsonl")
    return run_trajectory(data_dir / "base", run, data_dir / "questions.jsonl", out / "trajectory",
                          config or demo_config(), logs={"reward": reward}, devices=devices, log=log)


def _reuse_base_generations(out: Path, target: Path) -> None:
    """Start ``target`` with the base answers a demo comparison in ``out`` already generated."""
    done = [out / f"base-vs-{name}" / "base.generations.jsonl" for name in TUNED_MODELS]
    source = next((path for path in done if path.is_file() and path != target), None)
    if source is not None and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # the cache checks that model and settings match


def side_by_side(results: dict[str, Comparison], group: str = "all") -> str:
    """One markdown table: per metric, each comparison's % change with its CI and p-values.

    A cell reads ``+12.3% [+8.1, +16.0] p=0.001 (Holm 0.004)``: the change of the mean
    from base to tuned in % of base, the bootstrap CI of the difference in % of base, the
    test's p-value and its Holm adjustment across the group's metrics. The last rows are
    the cross-model Spearman correlation of the mean edge scores and the sample count.
    When the comparisons carry a scorer robustness check, a second table gives each
    metric's verdict (robust, scorer-dependent, inconclusive).
    """
    names = list(results)
    metrics = [row.metric for row in results[names[0]].rows if row.group == group]
    rows = []
    for metric in metrics:
        cells = [results[name].get(metric, group) for name in names]
        rows.append([metric, *(f"{change_cell(row)} p={row.p_value:.2g} (Holm {row.p_holm:.2g})" for row in cells)])
    spearman = [next(s.spearman for s in results[n].similarity if s.group == group) for n in names]
    rows.append(["Spearman(base, tuned)", *(f"{s:.3f}" for s in spearman)])
    rows.append(["samples (paired)", *(f"{results[n].settings.get('n_base')}" for n in names)])
    table = markdown_table([f"metric ({group} edges)", *(f"base -> {n}" for n in names)], rows)
    checked = {n: results[n].robustness for n in names}
    if all(robustness is None for robustness in checked.values()):
        return table
    verdicts = [[metric, *(_verdict_cell(checked[n], metric) for n in names)] for metric in metrics]
    headers = [f"base -> {n}" + ("" if r is None else f" ({r.primary} vs {r.reference}, {len(r.sample_ids)} samples)")
               for n, r in checked.items()]
    return (f"{table}\n\nScorer robustness: does each headline hold under the reference scorer, re-run on a "
            "subsample? (see each comparison's report)\n\n" + markdown_table(["metric", *headers], verdicts))


def _verdict_cell(robustness: Robustness | None, metric: str) -> str:
    """``scorer-dependent (eap down, exact up)``: the verdict, the headline's and the reference's directions."""
    if robustness is None:
        return "not checked"
    verdict = robustness.verdict(metric)
    return (f"{verdict.verdict} ({verdict.headline.scorer} {verdict.headline.direction}, "
            f"{verdict.reference.scorer} {verdict.reference.direction})")
