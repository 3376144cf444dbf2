"""Checkpoint trajectories: trend found on a planted series, none on null series, shared bins, discovery, logs.

The synthetic series draw normal per-sample scores on a small graph: each checkpoint
is fresh noise, paired with the initial model by sample id; the planted series adds a
strengthening step by step to one edge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import circuitdiff as cd
from circuitdiff.trends import trend

GRAPH = cd.AttributionGraph(2, 4, 2)  # 82 edges
N = 30
STEPS = (10, 20, 30, 40, 50, 60)
QUICK = dict(n_resamples=200, breakdown=False)  # compare options: enough for the tests, fast


def scores(rng: np.random.Generator, planted: dict[int, float] | None = None) -> cd.EdgeScores:
    """``N`` samples of N(0, 1) scores on GRAPH's real edges, plus ``planted[edge index]`` on those edges."""
    values = rng.standard_normal((N, GRAPH.n_sources, GRAPH.n_receivers))
    cells = np.argwhere(GRAPH.edge_mask.numpy())
    for edge, shift in (planted or {}).items():
        r, c = cells[edge]
        values[:, r, c] += shift
    per_sample = torch.from_numpy(values.astype(np.float32)) * GRAPH.edge_mask
    return cd.EdgeScores(graph=GRAPH, mean=per_sample.mean(0), per_sample=per_sample, objective_values=torch.zeros(N),
                         sample_ids=tuple(f"q{i}" for i in range(N)))


def series(seed: int, strengthen: float = 0.0, edge: int = 7, steps=STEPS) -> tuple[cd.EdgeScores, dict]:
    """An initial model and checkpoints whose ``edge`` grows by ``strengthen`` per checkpoint."""
    rng = np.random.default_rng(seed)
    initial = scores(rng)
    return initial, {step: scores(rng, {edge: strengthen * (k + 1)}) for k, step in enumerate(steps)}


def by_metric(trends) -> dict:
    return {t.metric: t for t in trends}


def test_a_planted_strengthening_is_found_as_a_trend():
    initial, checkpoints = series(seed=1, strengthen=3.0)
    accuracy = {step: 0.2 + 0.1 * k for k, step in enumerate(STEPS)}
    result = cd.trajectory_from_scores(initial, checkpoints, logs={"accuracy": accuracy}, **QUICK)
    assert result.steps == STEPS and len(result.comparisons) == len(STEPS)
    intensity = by_metric(result.trends())["intensity"]  # mean |score|: one edge growing raises it
    assert intensity.direction == "up" and intensity.p_value < 0.01 and intensity.tau > 0.8
    assert intensity.first_significant_step == STEPS[0]  # +3 on one edge of 82 at the first checkpoint already
    assert intensity.with_accuracy > 0.8  # both rise with the step
    names, changes = result.changing_edges(3)
    assert names[0] == GRAPH.edge_names()[7]
    assert np.all(np.diff(changes[0]) > 0)  # the planted edge grows at every step
    assert changes.shape == (3, len(STEPS))


def test_the_trend_starts_at_the_initial_model_so_an_early_kept_change_counts():
    from scipy import stats

    initial, checkpoints = series(seed=3)
    # every checkpoint is the initial model plus one shift made before the first checkpoint and kept
    shifted = {step: initial.select_samples(initial.sample_ids) for step in STEPS}
    for k, step in enumerate(STEPS):
        shifted[step].per_sample.mul_(2.0 + 0.01 * (-1) ** k)  # a doubling, wobbling a little
        shifted[step].mean.copy_(shifted[step].per_sample.mean(0))
    result = cd.trajectory_from_scores(initial, shifted, initial_step=5, **QUICK)
    intensity = by_metric(result.trends())["intensity"]
    assert intensity.steps == (5, *STEPS) and intensity.values[0] == 0.0
    differences = [row.difference for _, row in result.rows() if row.metric == "intensity"]
    assert intensity.tau == pytest.approx(stats.kendalltau((5, *STEPS), (0.0, *differences))[0])
    assert stats.kendalltau(STEPS, differences)[1] > 0.5  # the checkpoints alone: no trend (a wobble)
    assert intensity.first_significant_step == STEPS[0]  # never the initial step, which has no interval


def test_trend_test_rejects_no_more_than_alpha_on_exchangeable_series():
    """Kendall's test on i.i.d. series of 8 steps: its size is at most alpha (exact p-values)."""
    rng = np.random.default_rng(0)
    steps = list(range(8))
    rejections = 0
    runs = 2000
    for _ in range(runs):
        values = rng.standard_normal(8)
        rejections += trend("m", "all", steps, values, values - 1, values + 1).p_value < 0.05
    rate = rejections / runs
    assert 0.02 < rate < 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs), rate  # 3 binomial standard errors


@pytest.mark.slow  # 30 null trajectories through compare
def test_null_trajectories_show_no_trend_at_the_stated_alpha():
    found = 0
    for seed in range(30):
        initial, checkpoints = series(seed=100 + seed, strengthen=0.0, steps=(10, 20, 30, 40, 50))
        result = cd.trajectory_from_scores(initial, checkpoints, **{**QUICK, "n_resamples": 20})  # CIs unused
        found += by_metric(result.trends())["intensity"].p_value < 0.05
    assert found <= 5, found  # P(Binomial(30, 0.05) > 5) < 0.01; fixed seeds: 0-5 is a pass


def test_every_comparison_of_a_series_shares_its_bins():
    initial, checkpoints = series(seed=2, strengthen=3.0)
    result = cd.trajectory_from_scores(initial, checkpoints, **QUICK)
    edges = [c.bin_edges for c in result.comparisons]
    assert all(np.array_equal(edges[0], e) for e in edges)
    largest = max(float(s.per_sample.abs().max()) for s in [initial, *checkpoints.values()])
    assert edges[0][-1] == pytest.approx(largest)
    single = cd.compare(initial, checkpoints[10], **QUICK, edge_tests=False)
    assert single.bin_edges[-1] < edges[0][-1]  # alone, the pair would have had its own range


def test_bin_tops_below_a_models_largest_score_are_refused():
    initial, checkpoints = series(seed=3)
    with pytest.raises(cd.ArgumentError, match="below the largest"):
        cd.compare(initial, checkpoints[10], bin_tops={"all": 0.1}, **QUICK)
    with pytest.raises(cd.ArgumentError, match="no top for the edge groups"):
        cd.compare(initial, checkpoints[10], bin_tops={"other": 100.0}, **QUICK)
    for bad in (float("nan"), float("inf"), "10"):
        with pytest.raises(cd.ArgumentError, match="finite numbers"):
            cd.compare(initial, checkpoints[10], bin_tops={"all": bad}, **QUICK)


def test_the_trajectory_is_written_and_summarised(tmp_path):
    initial, checkpoints = series(seed=4, strengthen=2.0)
    result = cd.trajectory_from_scores(initial, dict(list(checkpoints.items())[:3]), initial_step=0,
                                       logs={"reward": {10: 0.1, 20: 0.5, 30: 0.9}}, **QUICK)
    data = json.loads(result.save(tmp_path / "trajectory.json").read_text())
    assert data["steps"] == [10, 20, 30] and {r["step"] for r in data["rows"]} == {10, 20, 30}
    assert {t["metric"] for t in data["trends"]} == set(cd.metrics.available())
    assert data["logs"]["reward"] == {"10": 0.1, "20": 0.5, "30": 0.9}
    text = result.to_markdown()
    assert "Mann-Kendall" in text and "intensity" in text and "tau reward" in text


def test_bad_series_are_refused():
    initial, checkpoints = series(seed=5)
    with pytest.raises(cd.ArgumentError, match="above the initial step"):
        cd.trajectory_from_scores(initial, checkpoints, initial_step=10, **QUICK)
    with pytest.raises(cd.ArgumentError, match="at least one checkpoint"):
        cd.trajectory_from_scores(initial, {})
    other = cd.AttributionGraph(2, 4, 2, level="layer")
    layer = cd.EdgeScores(graph=other, mean=torch.zeros(other.n_sources, other.n_receivers),
                          per_sample=torch.zeros(N, other.n_sources, other.n_receivers), objective_values=torch.zeros(N),
                          sample_ids=initial.sample_ids)
    with pytest.raises(cd.DataError, match="same graph"):
        cd.trajectory_from_scores(initial, {10: layer})
    fewer = checkpoints[10].select_samples(list(initial.sample_ids[:-1]))
    with pytest.raises(cd.DataError, match="other samples than the initial model"):
        cd.trajectory_from_scores(initial, {10: fewer})


def test_trend_statistics_match_scipy_and_handle_short_series():
    from scipy import stats

    steps, values = [1, 2, 5, 9, 12], [0.1, 0.05, 0.3, 0.2, 0.6]
    result = trend("m", "all", steps, values, [-1, -1, 0.1, -1, 0.2], [1, 1, 1, 1, 1], reward={1: 0, 5: 1, 12: 3})
    tau, p = stats.kendalltau(steps, values)
    assert (result.tau, result.p_value) == pytest.approx((tau, p))
    assert result.first_significant_step == 5  # its interval [0.1, 1] excludes 0
    assert (result.with_reward, result.with_reward_p) == pytest.approx(stats.kendalltau([0.1, 0.3, 0.6], [0, 1, 3]))
    assert result.with_reward_p == pytest.approx(1 / 3)  # exact: 1 of the 3! orders is as concordant, two-sided
    assert math.isnan(result.with_accuracy)
    short = trend("m", "all", [1, 2], [0.0, 1.0], [0, 0], [1, 1])
    assert math.isnan(short.p_value) and short.direction == "none"
    with pytest.raises(cd.ArgumentError, match="strictly increasing"):
        trend("m", "all", [2, 1, 3], [0, 1, 2], [0, 0, 0], [1, 1, 1])


# ---------------------------------------------------------------------------- checkpoints and logs
def checkpoint(directory, state_step: int | None = None):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    if state_step is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
    return directory


def test_checkpoints_are_found_and_sorted_by_step(tmp_path):
    run = tmp_path / "run"
    for step in (100, 2, 10):
        checkpoint(run / f"checkpoint-{step}")
    (run / "logs").mkdir()  # not a checkpoint: ignored
    checkpoint(run / "final", state_step=150)  # its step from trainer_state.json
    found = cd.find_checkpoints(run)
    assert [c.step for c in found] == [2, 10, 100, 150]
    assert [c.step for c in cd.find_checkpoints(str(run / "checkpoint-*"))] == [2, 10, 100]
    final = checkpoint(tmp_path / "final", state_step=250)  # step from trainer_state.json
    assert [c.step for c in cd.find_checkpoints([run / "checkpoint-10", final])] == [10, 250]


def test_checkpoint_errors_name_the_fix(tmp_path):
    with pytest.raises(cd.MissingPathError, match="no config.json"):
        cd.find_checkpoints([tmp_path / "missing"])
    with pytest.raises(cd.MissingPathError, match="no checkpoint folders"):
        cd.find_checkpoints(str(tmp_path / "nothing-*"))
    with pytest.raises(cd.DataError, match="checkpoint-N"):
        cd.find_checkpoints([checkpoint(tmp_path / "unnamed")])
    with pytest.raises(cd.DataError, match="two checkpoints have step 5"):
        cd.find_checkpoints([checkpoint(tmp_path / "a" / "checkpoint-5"), checkpoint(tmp_path / "b" / "step-5")])


def test_training_logs_are_read_from_trainer_state_and_csv(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 20, "log_history": [
        {"step": 10, "reward": 0.25, "loss": 1.5, "epoch": 0.1},
        {"step": 20, "reward": 0.5, "rewards/accuracy": "n/a"},
        {"step": 20, "reward": 0.75},  # logged twice: the last wins
        {"train_runtime": 3.0},  # no step: skipped
    ]}))
    log = cd.read_training_log(state)
    assert log == {"reward": {10: 0.25, 20: 0.75}, "loss": {10: 1.5}}
    table = tmp_path / "metrics.csv"
    table.write_text("step,accuracy,reward\n10,0.3,\n20,0.4,0.9\n")
    assert cd.read_training_log(table) == {"accuracy": {10: 0.3, 20: 0.4}, "reward": {20: 0.9}}
    (tmp_path / "empty.csv").write_text("epoch,loss\n1,2\n")
    with pytest.raises(cd.DataError, match="no numeric values logged by step"):
        cd.read_training_log(tmp_path / "empty.csv")
    with pytest.raises(cd.DataError, match="trainer_state.json or a .csv"):
        cd.read_training_log(_touch(tmp_path / "log.txt"))


def _touch(path):
    path.write_text("")
    return path


def test_trajectory_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots are an optional extra (circuitdiff[plot])")
    from circuitdiff.plots import plot_changing_edges, plot_trajectory

    initial, checkpoints = series(seed=6, strengthen=2.0)
    result = cd.trajectory_from_scores(initial, checkpoints, logs={"accuracy": {10: 0.1, 30: 0.4, 60: 0.5}}, **QUICK)
    lines = plot_trajectory(result, tmp_path / "trajectory.png", metrics=["intensity", "diversity"])
    heatmap = plot_changing_edges(result, tmp_path / "edges.png", k=5)
    assert lines.stat().st_size > 10_000 and heatmap.stat().st_size > 5_000
    with pytest.raises(cd.UnknownNameError, match="no metric"):
        plot_trajectory(result, tmp_path / "x.png", metrics=["missing"])


def test_the_trajectory_plot_starts_at_the_initial_step(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots are an optional extra (circuitdiff[plot])")
    from circuitdiff import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path, dpi: drawn.append(figure) or Path(path))
    initial, checkpoints = series(seed=6, strengthen=2.0)
    result = cd.trajectory_from_scores(initial, checkpoints, logs={"accuracy": {0: 0.05, 10: 0.1, 60: 0.5}}, **QUICK)
    plots.plot_trajectory(result, tmp_path / "trajectory.png", metrics=["intensity"])
    metric_axis, accuracy_axis = drawn[0].axes
    line = metric_axis.lines[0]
    differences = [row.difference for _, row in result.rows() if row.metric == "intensity"]
    assert list(line.get_xdata()) == [0, *STEPS] and list(line.get_ydata()) == pytest.approx([0.0, *differences])
    assert list(accuracy_axis.lines[0].get_xdata()) == [0, 10, 60]


# ---------------------------------------------------------------------------- from checkpoint folders
def demo_run(tmp_path):
    """The demo's base model as step 0 and its GRPO and DPO models as checkpoint-10 and checkpoint-20 of a run."""
    from circuitdiff.demo import DEMO_DATA

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-10").symlink_to(DEMO_DATA / "grpo")
    (run / "checkpoint-20").symlink_to(DEMO_DATA / "dpo")
    return DEMO_DATA / "base", run, DEMO_DATA / "questions.jsonl"


def demo_settings():
    from circuitdiff.demo import demo_config

    return demo_config(n=12, max_questions=80, robustness=False, progress=False)


@pytest.mark.slow  # three models answer and are scored, three times
def test_a_run_killed_mid_series_resumes_to_the_uninterrupted_result_with_one_model_in_memory(tmp_path, monkeypatch):
    """Killed when it reaches step 20's scores, then resumed spread over two worker processes."""
    import weakref

    from circuitdiff import pipeline

    initial, run, questions = demo_run(tmp_path)
    loaded, load = [], pipeline._load

    def load_one(*args, **kwargs):  # every earlier model must be gone (freed by the run) before the next loads
        assert all(ref() is None for ref in loaded), "two models in memory at once"
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(pipeline, "_load", load_one)
    whole = cd.run_trajectory(initial, run, questions, tmp_path / "whole", demo_settings(), log=lambda line: None)
    assert len(loaded) == 6  # each of three models loaded to answer, then to be scored
    assert whole.steps == (10, 20) and set(whole.logs["accuracy"]) == {0, 10, 20}
    assert (tmp_path / "whole" / "trajectory.json").is_file() and (tmp_path / "whole" / "report.md").is_file()

    score = pipeline._score

    def killed_at_step_20(model, questions, answers, picked, t_cut, config, out, name, **kwargs):
        if name == "step-20":
            raise KeyboardInterrupt
        return score(model, questions, answers, picked, t_cut, config, out, name, **kwargs)

    monkeypatch.setattr(pipeline, "_score", killed_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        cd.run_trajectory(initial, run, questions, tmp_path / "resumed", demo_settings(), log=lambda line: None)
    monkeypatch.setattr(pipeline, "_score", score)
    done = tmp_path / "resumed"
    kept = [*done.glob("step-*.generations.jsonl"), *done.glob("step-*.shards/shard-*")]
    cached = {p: p.stat().st_mtime_ns for p in kept}
    assert len([p for p in cached if p.suffix == ".jsonl"]) == 3 and any(p.parent.name.startswith("step-10-") for p in cached)
    # resumed with the checkpoints spread over two worker processes: step 20 is scored in a worker
    resumed = cd.run_trajectory(initial, run, questions, done, demo_settings(), devices=["cpu", "cpu"],
                                log=lambda line: None)
    assert all(p.stat().st_mtime_ns == t for p, t in cached.items())  # reused, not redone
    assert any(p.parent.name.startswith("step-20-") for p in done.glob("step-*.shards/shard-*"))
    for (step, a), (step_b, b) in zip(whole.rows(), resumed.rows(), strict=True):
        assert (step, a.metric) == (step_b, b.metric)
        # float32 sums in a worker with fewer threads: equal to rounding, relative to the metric's size
        assert [b.base, b.tuned] == pytest.approx([a.base, a.tuned], rel=1e-5, abs=1e-12)
        assert b.difference == pytest.approx(a.difference, abs=1e-5 * max(abs(a.base), abs(a.tuned)) + 1e-12)
    assert whole.logs == resumed.logs
    np.testing.assert_allclose(whole.edge_changes, resumed.edge_changes, rtol=1e-4, atol=1e-9)


def test_the_trajectory_command_passes_its_arguments(tmp_path, monkeypatch):
    from circuitdiff import cli
    from circuitdiff import trajectory as trajectory_module

    initial, run, questions = demo_run(tmp_path)
    log = tmp_path / "log.csv"
    log.write_text("step,reward\n10,0.5\n20,0.7\n")
    seen = {}

    def fake(initial_dir, checkpoints, questions_path, out, config, *, initial_step, logs, devices, log):
        seen.update(initial=initial_dir, checkpoints=checkpoints, questions=questions_path, out=out, n=config.n,
                    step=initial_step, logs=logs, devices=devices)
        base, checkpoint_scores = series(seed=7, steps=(10, 20))
        return cd.trajectory_from_scores(base, checkpoint_scores, initial_step=initial_step, **QUICK)

    monkeypatch.setattr(trajectory_module, "run_trajectory", fake)
    folders = [str(run / "checkpoint-10"), str(run / "checkpoint-20")]
    status = cli.main(["trajectory", str(initial), *folders, "--questions", str(questions), "--out",
                       str(tmp_path / "out"), "--n", "7", "--initial-step", "5", "--log", str(log), "--quiet", "--devices", "cuda:0, cuda:1"])
    assert status == 0
    assert seen == dict(initial=str(initial), checkpoints=folders, questions=str(questions), out=str(tmp_path / "out"),
                        n=7, step=5, logs={"reward": {10: 0.5, 20: 0.7}}, devices=["cuda:0", "cuda:1"])


def test_a_log_named_accuracy_is_refused_before_any_model_loads(tmp_path):
    initial, run, questions = demo_run(tmp_path)
    with pytest.raises(cd.ArgumentError, match="logs each step's own accuracy"):
        cd.run_trajectory(initial, run, questions, tmp_path / "out", logs={"accuracy": {10: 0.1}})
