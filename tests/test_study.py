"""Studies: the random-effects pool on hand-computed cases, the paper's summary, study files, failures, and a
2 x 2 study of the bundled demo models run from a TOML file."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

import circuitdiff as cd
from circuitdiff import study as study_module
from circuitdiff.demo import DEMO_DATA
from circuitdiff.meta import dersimonian_laird
from test_trajectory import QUICK, scores


def test_random_effects_pool_of_two_far_apart_settings():
    """y = (0, 4), v = (1, 1): fixed mean 2, Q = 8, C = 1, tau^2 = Q - df = 7, weights 1/8, SE = 2, I^2 = 7/8."""
    pooled = dersimonian_laird([0.0, 4.0], [1.0, 1.0])
    assert (pooled.estimate, pooled.standard_error, pooled.tau2, pooled.q) == pytest.approx((2.0, 2.0, 7.0, 8.0))
    assert pooled.i2 == pytest.approx(0.875)
    z = stats.norm.ppf(0.975)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx((2 - 2 * z, 2 + 2 * z))
    assert pooled.p_value == pytest.approx(2 * stats.norm.sf(1.0))
    assert pooled.q_p_value == pytest.approx(stats.chi2.sf(8.0, 1))


def test_random_effects_pool_without_heterogeneity_is_the_fixed_effect():
    """y = (1, 2, 3), v = (1, 1, 1): Q = 2 = df, so tau^2 = 0, I^2 = 0 and the pool is the inverse-variance mean."""
    pooled = dersimonian_laird([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert (pooled.estimate, pooled.tau2, pooled.i2) == pytest.approx((2.0, 0.0, 0.0))
    assert pooled.standard_error == pytest.approx(math.sqrt(1 / 3))
    weighted = dersimonian_laird([1.0, 5.0], [0.01, 100.0])  # precise settings dominate
    assert abs(weighted.estimate - 1.0) < 0.05
    assert math.isnan(dersimonian_laird([1.0], [1.0]).estimate)  # one setting: nothing to pool
    assert math.isnan(dersimonian_laird([1.0, 2.0], [0.0, 1.0]).estimate)  # a zero-width interval


def comparisons(shifts: dict[str, float]) -> dict[str, cd.Comparison]:
    """One comparison per setting: tuned = fresh noise + ``shift`` on every edge (intensity up when shift > 0)."""
    result = {}
    for index, (name, shift) in enumerate(shifts.items()):
        rng = np.random.default_rng(index)
        base = scores(rng)
        tuned = scores(rng, {edge: shift for edge in range(82)})
        result[name] = cd.compare(base, tuned, edge_tests=False, **QUICK)
    return result


def test_meta_analysis_gives_the_papers_summary_and_the_pool():
    settings = comparisons({"a": 1.0, "b": 1.5, "c": -0.2})
    pooled = {p.metric: p for p in cd.meta_analysis(settings)}
    assert set(pooled) == set(cd.metrics.available())
    intensity = pooled["intensity"]
    rows = [next(r for r in c.rows if r.metric == "intensity" and r.group == "all") for c in settings.values()]
    assert intensity.settings == ("a", "b", "c")
    assert intensity.differences == pytest.approx([r.difference for r in rows])
    assert intensity.fraction_up == pytest.approx(np.mean([r.difference > 0 for r in rows]))
    assert intensity.mean_percent_change == pytest.approx(np.mean([r.percent_change for r in rows]))
    z = stats.norm.ppf(0.975)
    expected = dersimonian_laird([r.difference for r in rows], [((r.ci_high - r.ci_low) / 2 / z) ** 2 for r in rows])
    assert intensity.pooled.estimate == pytest.approx(expected.estimate)
    with pytest.raises(cd.ArgumentError, match="no rows on group"):
        cd.meta_analysis(settings, group="layer:7")


# ---------------------------------------------------------------------------- study files
def write_study(tmp_path, body: str):
    path = tmp_path / "study.toml"
    path.write_text(body)
    return path


DEMO_STUDY = f"""
[defaults]
alpha = 0.5
n = 12
max_questions = 30
level = "layer"
batch_size = 32
max_new_tokens = 48
device = "cpu"
dtype = "float32"
robustness = false
progress = false

[[pairs]]
name = "grpo"
base = "{DEMO_DATA / 'base'}"
tuned = "{DEMO_DATA / 'grpo'}"

[[pairs]]
name = "dpo"
base = "{DEMO_DATA / 'base'}"
tuned = "{DEMO_DATA / 'dpo'}"

[[datasets]]
name = "arithmetic"
questions = "{DEMO_DATA / 'questions.jsonl'}"

[grid]
rule = ["paper", "code"]
"""


def test_a_study_file_expands_into_its_grid(tmp_path):
    settings = study_module.read_study(write_study(tmp_path, DEMO_STUDY))
    assert [s.name for s in settings] == ["grpo__arithmetic__rule=paper", "grpo__arithmetic__rule=code",
                                          "dpo__arithmetic__rule=paper", "dpo__arithmetic__rule=code"]
    assert {s.config.rule for s in settings} == {"paper", "code"} and all(s.config.n == 12 for s in settings)


def test_a_study_names_models_by_hub_id_and_datasets_by_name(tmp_path):
    base_line, questions_line = f'base = "{DEMO_DATA / "base"}"', f'questions = "{DEMO_DATA / "questions.jsonl"}"'
    body = DEMO_STUDY.replace(base_line, 'base = "some-org/base-model"', 1).replace(questions_line, 'questions = "gsm8k"')
    settings = study_module.read_study(write_study(tmp_path, body))
    assert str(settings[0].base) == "some-org/base-model" and str(settings[0].questions) == "gsm8k"
    assert settings[0].tuned == DEMO_DATA / "grpo"
    missing = DEMO_STUDY.replace(questions_line, 'questions = "q/missing.jsonl"')
    with pytest.raises(cd.MissingPathError, match="does not exist"):
        study_module.read_study(write_study(tmp_path, missing))


@pytest.mark.parametrize("change, message", [
    ("[extra]\n", "unknown sections"),
    ('[grid]\nrule = "paper"\n', "non-empty lists"),
    ("n = -3", "setting 'grpo__arithmetic__rule=paper'"),
    ('name = "grpo"', "must be letters"),
])
def test_bad_study_files_are_refused_before_anything_runs(tmp_path, change, message):
    body = DEMO_STUDY
    if change.startswith("[extra]"):
        body += change
    elif change.startswith("[grid]"):
        body = body.replace('[grid]\nrule = ["paper", "code"]\n', change)
    elif change.startswith("n ="):
        body = body.replace("n = 12", change)
    else:
        body = body.replace('name = "grpo"', 'name = "grpo/x"')
    with pytest.raises(cd.DataError, match=message):
        study_module.read_study(write_study(tmp_path, body))
    with pytest.raises(cd.MissingPathError, match="does not exist"):
        study_module.read_study(write_study(tmp_path, DEMO_STUDY.replace("questions.jsonl", "missing.jsonl")))


def test_a_failed_setting_is_reported_and_the_others_are_pooled(tmp_path, monkeypatch):
    fake = comparisons({"one": 1.0, "two": 0.5, "three": 1.2})
    outcomes = iter([fake["one"], RuntimeError("out of memory"), fake["two"], fake["three"]])

    def run_compare(*args, **kwargs):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(study_module, "run_compare", run_compare)
    result = cd.run_study(write_study(tmp_path, DEMO_STUDY), tmp_path / "out", log=lambda line: None)
    assert result.failures == {"grpo__arithmetic__rule=code": "RuntimeError: out of memory"}
    assert len(result.comparisons) == 3 and len(result.pooled[0].settings) == 3
    text = (tmp_path / "out" / "study.md").read_text()
    assert "3 of 4 settings ran" in text and "out of memory" in text and "settings up" in text
    data = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [s["ran"] for s in data["settings"]] == [True, False, True, True]


@pytest.mark.slow  # four runs of the compare pipeline on the demo models
def test_a_two_by_two_study_of_the_demo_models_runs_from_a_toml_file(tmp_path):
    out = tmp_path / "out"  # spread over two worker processes, then resumed in this one
    result = cd.run_study(write_study(tmp_path, DEMO_STUDY), out, log=lambda line: None, devices=["cpu", "cpu"])
    assert not result.failures and len(result.comparisons) == 4
    for setting in result.settings:
        assert (out / setting.name / "comparison.json").is_file()
    pooled = {p.metric: p for p in result.pooled}
    assert set(pooled) == set(cd.metrics.available())
    assert all(len(p.settings) == 4 and 0 <= p.fraction_up <= 1 for p in pooled.values())
    assert (out / "study.md").is_file() and (out / "figures" / "forest-diversity.png").is_file()
    again = cd.run_study(write_study(tmp_path, DEMO_STUDY), out, log=lambda line: None)  # resumed: same numbers
    assert not again.failures
    assert [p.pooled.estimate for p in again.pooled] == pytest.approx([p.pooled.estimate for p in result.pooled],
                                                                       nan_ok=True)


def with_interval(comparison: cd.Comparison, metric: str, low: float, high: float) -> cd.Comparison:
    """``comparison`` with ``metric``'s interval on group 'all' replaced."""
    rows = [replace(r, ci_low=low, ci_high=high) if (r.metric, r.group) == (metric, "all") else r
            for r in comparison.rows]
    return replace(comparison, rows=rows)


def test_settings_that_cannot_be_weighed_are_left_out_of_the_pool_and_named():
    settings = comparisons({"a": 1.0, "b": 1.5, "c": 0.5})
    settings["c"] = with_interval(settings["c"], "intensity", 0.3, 0.3)  # zero width
    intensity = next(p for p in cd.meta_analysis(settings) if p.metric == "intensity")
    assert intensity.left_out == ("c",) and intensity.n_summarised == 3
    rows = [next(r for r in settings[n].rows if (r.metric, r.group) == ("intensity", "all")) for n in ("a", "b")]
    z = stats.norm.ppf(0.975)
    expected = dersimonian_laird([r.difference for r in rows], [((r.ci_high - r.ci_low) / 2 / z) ** 2 for r in rows])
    assert intensity.pooled.estimate == pytest.approx(expected.estimate)


def test_a_forest_plot_draws_intervals_that_exclude_their_estimate(tmp_path):
    pytest.importorskip("matplotlib", reason="plots are an optional extra (circuitdiff[plot])")
    from circuitdiff.plots import plot_forest

    settings = comparisons({"a": 1.0, "b": 1.5})
    settings["a"] = with_interval(settings["a"], "intensity", 5.0, 6.0)  # BCa intervals can miss the estimate
    intensity = next(p for p in cd.meta_analysis(settings) if p.metric == "intensity")
    assert plot_forest(intensity, tmp_path / "forest.png").stat().st_size > 5_000


def test_relative_paths_are_read_from_the_study_files_folder(tmp_path):
    for folder in ("models/base", "models/grpo"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "q.jsonl").write_text("")
    body = ('[[pairs]]\nname = "grpo"\nbase = "models/base"\ntuned = "models/grpo"\n\n'
            '[[datasets]]\nname = "q"\nquestions = "q.jsonl"\n')
    (setting,) = study_module.read_study(write_study(tmp_path, body))
    assert (setting.base, setting.tuned, setting.questions) == (tmp_path / "models/base", tmp_path / "models/grpo",
                                                                tmp_path / "q.jsonl")
    with pytest.raises(cd.DataError, match="share the name"):
        study_module.read_study(write_study(tmp_path, body + '\n[grid]\nrule = ["paper", "paper"]\n'))


@pytest.mark.parametrize("fail", [False, True])
def test_the_study_command_exits_1_when_a_setting_failed(tmp_path, monkeypatch, capsys, fail):
    from circuitdiff import cli

    fake = iter(comparisons({"w": 1.0, "x": 0.5, "y": 1.2, "z": 0.8}).values())

    def run_compare(*args, **kwargs):
        assert args[4].device == "cpu"  # --devices: each setting runs on its worker's device
        if fail and "dpo__arithmetic__rule=code" in str(args[3]):
            raise cd.DataError("nothing left after filtering")
        return next(fake)

    monkeypatch.setattr(study_module, "run_compare", run_compare)
    status = cli.main(["study", str(write_study(tmp_path, DEMO_STUDY)), "--out", str(tmp_path / "out"), "--quiet",
                       "--devices", "cpu"])
    assert status == (1 if fail else 0)
    assert ("nothing left after filtering" in capsys.readouterr().out) == fail
