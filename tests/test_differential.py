"""edge_tests: per-edge t-tests against scipy, FDR control and power on planted edges, streaming, errors.

The calibration tests draw normal scores, for which the t-test is exact, so their
tolerances are sampling error only (stated at each assert).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

import circuitdiff as cd
from circuitdiff.differential import EdgeTests, edge_tests

SMALL = cd.AttributionGraph(2, 4, 2)  # 82 edges
GRAPH = cd.AttributionGraph(n_layers=4, n_heads=4, n_kv_heads=2)  # 343 edges
FIELDS = ("base_mean", "tuned_mean", "difference", "statistic", "df", "p_value", "q_value", "effect_size")


def scores_from(graph: cd.AttributionGraph, per_sample: np.ndarray, sample_ids=None) -> cd.EdgeScores:
    """EdgeScores of ``[n, n_sources, n_receivers]`` values, structural zeros set to 0."""
    values = torch.from_numpy(np.asarray(per_sample, dtype=np.float32)) * graph.edge_mask
    return cd.EdgeScores(graph=graph, mean=values.mean(0), per_sample=values, objective_values=torch.zeros(len(values)),
                         sample_ids=sample_ids)


def edge_matrix(graph: cd.AttributionGraph, per_edge: np.ndarray) -> np.ndarray:
    """``[n, n_edges]`` values placed into ``[n, n_sources, n_receivers]`` (edge_names order)."""
    full = np.zeros((per_edge.shape[0], graph.n_sources, graph.n_receivers), dtype=per_edge.dtype)
    full[:, graph.edge_mask.numpy()] = per_edge
    return full


def planted(seed: int, n: int = 40, effect: float = 1.0, paired: bool = True):
    """Base and tuned scores on GRAPH with ``effect`` planted in 10% of the edges, half up, half down.

    Paired: base has a per-sample level shared by every edge (which pairing removes) and
    tuned = base + N(0, 1) noise + effect, so d_z = effect. Unpaired: both sides are
    per-edge levels + N(0, 1) noise, so Hedges' g is about ``effect``. Returns (base,
    tuned, planted signs per edge).
    """
    rng = np.random.default_rng(seed)
    n_edges = GRAPH.n_edges
    signs = np.zeros(n_edges)
    chosen = rng.choice(n_edges, size=n_edges // 10, replace=False)
    signs[chosen] = np.where(np.arange(chosen.size) % 2 == 0, 1.0, -1.0)
    edge_level = rng.normal(size=(1, n_edges))
    if paired:
        base = rng.normal(0.0, 3.0, size=(n, 1)) + edge_level + rng.normal(size=(n, n_edges))
        tuned = base + rng.normal(size=(n, n_edges))
    else:
        base = edge_level + rng.normal(size=(n, n_edges))
        tuned = edge_level + rng.normal(size=(n, n_edges))
    tuned += effect * signs
    return scores_from(GRAPH, edge_matrix(GRAPH, base)), scores_from(GRAPH, edge_matrix(GRAPH, tuned)), signs


def assert_same(a: EdgeTests, b: EdgeTests, rtol: float = 0.0) -> None:
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=0, err_msg=name)
    np.testing.assert_array_equal(a.significant(), b.significant())


# ---------------------------------------------------------------------- against scipy
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_statistics_match_scipy_per_edge(paired):
    rng = np.random.default_rng(1)
    n_base, n_tuned = (14, 14) if paired else (14, 23)
    base = rng.normal(0.0, 1.0, size=(n_base, SMALL.n_sources, SMALL.n_receivers))
    tuned = rng.normal(0.2, 2.0, size=(n_tuned, SMALL.n_sources, SMALL.n_receivers))
    if paired:
        tuned = tuned + base
    result = edge_tests(scores_from(SMALL, base), scores_from(SMALL, tuned), paired=paired)

    mask = SMALL.edge_mask.numpy()
    b, t = base.astype(np.float32)[:, mask].astype(np.float64), tuned.astype(np.float32)[:, mask].astype(np.float64)
    if paired:
        reference = stats.ttest_rel(t, b)
        d = t - b
        effect = d.mean(0) / d.std(0, ddof=1)
    else:
        reference = stats.ttest_ind(t, b, equal_var=False)
        m = n_base + n_tuned - 2
        pooled = np.sqrt(((n_base - 1) * b.var(0, ddof=1) + (n_tuned - 1) * t.var(0, ddof=1)) / m)
        correction = special.gamma(m / 2) / (math.sqrt(m / 2) * special.gamma((m - 1) / 2))
        effect = correction * (t.mean(0) - b.mean(0)) / pooled
    np.testing.assert_allclose(result.statistic, reference.statistic, rtol=1e-10)
    np.testing.assert_allclose(result.p_value, reference.pvalue, rtol=1e-9)
    np.testing.assert_allclose(result.df, reference.df, rtol=1e-10)
    np.testing.assert_allclose(result.effect_size, effect, rtol=1e-10)
    np.testing.assert_allclose(result.base_mean, b.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result.tuned_mean, t.mean(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.difference, t.mean(0) - b.mean(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.q_value, stats.false_discovery_control(reference.pvalue), rtol=1e-9)
    assert result.test == ("paired t-test (differences tuned - base)" if paired else "Welch t-test")
    assert (result.n_base, result.n_tuned) == (n_base, n_tuned)
    assert result.edge_names(np.arange(SMALL.n_edges)) == SMALL.edge_names()
    assert result.edge_names([5, 0]) == [SMALL.edge_names()[5], SMALL.edge_names()[0]]


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_chunk_size_does_not_change_the_result(paired):
    base, tuned, _ = planted(seed=3, n=11, effect=2.0, paired=paired)
    reference = edge_tests(base, tuned, paired=paired, chunk_size=None)
    assert reference.significant().any()
    for chunk_size in (1, 3):
        assert_same(edge_tests(base, tuned, paired=paired, chunk_size=chunk_size), reference, rtol=1e-11)


def test_pairing_by_sample_id_not_row_order():
    base, tuned, _ = planted(seed=4, n=12)
    ids = [f"q{i}" for i in range(12)]
    aligned = edge_tests(scores_from(GRAPH, base.per_sample.numpy(), ids),
                         scores_from(GRAPH, tuned.per_sample.numpy(), ids), chunk_size=5)
    order = np.random.default_rng(0).permutation(12)
    extra = np.random.default_rng(1).normal(size=(1, GRAPH.n_sources, GRAPH.n_receivers))  # a tuned-only sample
    shuffled = scores_from(GRAPH, np.concatenate([tuned.per_sample.numpy()[order], extra]),
                           [ids[i] for i in order] + ["only-tuned"])
    result = edge_tests(scores_from(GRAPH, base.per_sample.numpy(), ids), shuffled, chunk_size=5)
    assert_same(result, aligned)  # the same pairs in the same order: exactly the same numbers
    assert result.dropped == [{"side": "tuned", "id": "only-tuned", "reason": "no sample with this id in base"}]
    assert result.n_base == result.n_tuned == 12


# ---------------------------------------------------------------------- calibration
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_planted_edges_are_found_at_the_stated_fdr(paired):
    fdr, seeds = 0.05, 50
    proportions, power = [], []
    for seed in range(seeds):
        base, tuned, signs = planted(seed, n=40, effect=1.0 if paired else 1.5, paired=paired)
        result = edge_tests(base, tuned, paired=paired, fdr=fdr)
        found = result.significant()
        proportions.append((found & (signs == 0)).sum() / max(found.sum(), 1))
        power.append((found & (signs != 0)).sum() / (signs != 0).sum())
        # every planted edge found is reported in its own direction
        assert not (found & (signs > 0) & (result.difference < 0)).any()
        assert not (found & (signs < 0) & (result.difference > 0)).any()
    proportions = np.array(proportions)
    # BH keeps E[false discovery proportion] <= (null share 0.9) * fdr = 0.045 for independent
    # tests; allow 3 standard errors of the mean over seeds on top of fdr itself.
    tolerance = 3 * proportions.std(ddof=1) / math.sqrt(seeds)
    assert proportions.mean() <= fdr + tolerance, (proportions.mean(), tolerance)
    assert np.mean(power) >= 0.95  # d_z = 1 (g = 1.5) with 40 samples: |t| about 6, far past BH's cut-off


def test_null_false_positive_rate_and_any_discovery():
    """No planted edge: P(p < alpha) = alpha per edge, and BH rejects anything in at most fdr of the runs."""
    fdr, seeds = 0.05, 300
    p_values, any_discovery = [], []
    for seed in range(seeds):
        paired = seed % 2 == 0
        rng = np.random.default_rng(1000 + seed)
        n_base, n_tuned = (30, 30) if paired else (30, 45)
        scale = rng.uniform(0.5, 2.0, size=GRAPH.n_edges)  # unequal variances per edge and side (Welch)
        base = rng.normal(size=(n_base, GRAPH.n_edges))
        tuned = (base if paired else 0.0) + scale * rng.normal(size=(n_tuned, GRAPH.n_edges))
        result = edge_tests(scores_from(GRAPH, edge_matrix(GRAPH, base)), scores_from(GRAPH, edge_matrix(GRAPH, tuned)),
                            paired=paired, fdr=fdr)
        p_values.append(result.p_value)
        any_discovery.append(result.significant().any())
    p_values = np.concatenate(p_values)
    for alpha in (0.05, 0.01):
        # independent edges: the count below alpha is binomial; 4 standard errors either side
        error = 4 * math.sqrt(alpha * (1 - alpha) / p_values.size)
        assert abs((p_values < alpha).mean() - alpha) <= error, (alpha, (p_values < alpha).mean())
    # under the global null BH's chance of any rejection is fdr (independent tests): binomial over seeds, 3 SE
    assert np.mean(any_discovery) <= fdr + 3 * math.sqrt(fdr * (1 - fdr) / seeds)


# ---------------------------------------------------------------------- edge cases and errors
def test_constant_difference_edges():
    n = 6
    rng = np.random.default_rng(2)
    base = np.round(rng.normal(size=(n, SMALL.n_edges)) * 8) / 8  # eighths: exact in float32, exact differences
    tuned = base + rng.normal(size=base.shape)
    tuned[:, 0] = base[:, 0]  # no change at all
    tuned[:, 1] = base[:, 1] + 0.5  # the same change on every sample
    tuned[:, 2] = base[:, 2] - 0.25
    for chunk_size in (1, 4, None):
        result = edge_tests(scores_from(SMALL, edge_matrix(SMALL, base)), scores_from(SMALL, edge_matrix(SMALL, tuned)),
                            chunk_size=chunk_size)
        np.testing.assert_array_equal(result.statistic[:3], [0.0, math.inf, -math.inf])
        np.testing.assert_array_equal(result.effect_size[:3], [0.0, math.inf, -math.inf])
        np.testing.assert_array_equal(result.p_value[:3], [1.0, 0.0, 0.0])
        np.testing.assert_array_equal(result.difference[:3], [0.0, 0.5, -0.25])
        assert [e["edge"] for e in result.top(1, "strengthened")] == result.edge_names([1])
        assert [e["edge"] for e in result.top(1, "weakened")] == result.edge_names([2])
    both_constant = edge_tests(scores_from(SMALL, np.ones((4, SMALL.n_sources, SMALL.n_receivers))),
                               scores_from(SMALL, np.full((5, SMALL.n_sources, SMALL.n_receivers), 2.0)), paired=False)
    assert (both_constant.statistic == math.inf).all() and (both_constant.p_value == 0).all()
    assert np.isnan(both_constant.df).all()
    assert both_constant.counts()["strengthened"] == SMALL.n_edges


@pytest.mark.parametrize("side, row", [("base", 0), ("tuned", 3), ("tuned", 0)])
def test_non_finite_scores_name_side_sample_and_row(side, row):
    values = {s: np.random.default_rng(i).normal(size=(6, SMALL.n_sources, SMALL.n_receivers))
              for i, s in enumerate(("base", "tuned"))}
    structural = np.argwhere(~SMALL.edge_mask.numpy())[0]
    values["base"][(2, *structural)] = math.nan  # not an edge: ignored
    edge = np.argwhere(SMALL.edge_mask.numpy())[7]
    values[side][(row, *edge)] = math.inf if side == "base" else math.nan
    ids = [f"q{i}" for i in range(6)]
    scores = {s: cd.EdgeScores(graph=SMALL, mean=torch.zeros(SMALL.n_sources, SMALL.n_receivers),
                               per_sample=torch.from_numpy(v.astype(np.float32)), objective_values=torch.zeros(6),
                               sample_ids=ids) for s, v in values.items()}
    for paired in (True, False):
        with pytest.raises(cd.NonFiniteError, match=rf"^{side} scores: sample 'q{row}' \(row {row}\) holds 1 NaN or "
                                                    "infinite scores on real edges"):
            edge_tests(scores["base"], scores["tuned"], paired=paired, chunk_size=2)


def test_bad_options_and_inputs():
    base, tuned, _ = planted(seed=0, n=4)
    for fdr in (0, 1, -0.1, 1.5, True, "0.05", math.nan):
        with pytest.raises(cd.ArgumentError, match=r"fdr must be a number in \(0, 1\)"):
            edge_tests(base, tuned, fdr=fdr)
    for chunk_size in (0, -1, 2.5, True):
        with pytest.raises(cd.ArgumentError, match="chunk_size must be a positive integer or None"):
            edge_tests(base, tuned, chunk_size=chunk_size)
    with pytest.raises(cd.ArgumentError, match="paired must be None, True or False"):
        edge_tests(base, tuned, paired="yes")
    with pytest.raises(cd.ArgumentTypeError, match="tuned must be EdgeScores"):
        edge_tests(base, tuned.per_sample)
    mean_only = cd.EdgeScores(graph=GRAPH, mean=base.mean, per_sample=None, objective_values=torch.zeros(4))
    with pytest.raises(cd.DataError, match="no per-sample matrices"):
        edge_tests(mean_only, tuned)
    one = scores_from(GRAPH, base.per_sample.numpy()[:1])
    with pytest.raises(cd.DataError, match=r"edge_tests \(base\): a t-test needs at least 2 samples per side; got 1"):
        edge_tests(one, tuned, paired=False)
    with pytest.raises(cd.ArgumentError, match="direction must be 'strengthened' or 'weakened'"):
        edge_tests(base, tuned).top(3, "up")
    with pytest.raises(cd.ArgumentError, match=r"edge indices must be in \[0, 343\)"):
        edge_tests(base, tuned).edge_names([343])


def test_few_samples_are_flagged():
    few = edge_tests(*planted(seed=0, n=29)[:2])
    assert len(few.warnings) == 1 and "only 29 pairs (fewer than 30)" in few.warnings[0]
    assert "> Warning: only 29 pairs" in few.to_markdown()
    assert edge_tests(*planted(seed=0, n=30)[:2]).warnings == []
    welch = edge_tests(*planted(seed=0, n=20)[:2], paired=False)
    assert "only 20 base and 20 tuned samples" in welch.warnings[0]


def test_memory_mapped_files_give_the_same_result(tmp_path):
    base, tuned, _ = planted(seed=5, n=9)
    ids = [f"q{i}" for i in range(9)]
    order = np.random.default_rng(0).permutation(9)  # tuned rows shuffled: the row-by-row read path
    base = scores_from(GRAPH, base.per_sample.numpy(), ids)
    tuned = scores_from(GRAPH, tuned.per_sample.numpy()[order], [ids[i] for i in order])
    base.save(tmp_path / "base.cdiff")
    tuned.save(tmp_path / "tuned.cdiff")
    mapped = {side: cd.EdgeScores.load(tmp_path / f"{side}.cdiff", mmap=True) for side in ("base", "tuned")}
    for paired in (True, False):
        assert_same(edge_tests(mapped["base"], mapped["tuned"], paired=paired, chunk_size=4),
                    edge_tests(base, tuned, paired=paired, chunk_size=4))


def test_coarsen_tests_the_layer_level_graph():
    base, tuned, _ = planted(seed=6, n=8)
    layer = tuned.to_layer_level()
    with pytest.raises(cd.DataError, match="Pass coarsen=True"):
        edge_tests(base, layer)
    result = edge_tests(base, layer, coarsen=True)
    assert result.graph.level == "layer" and result.p_value.size == layer.graph.n_edges


# ---------------------------------------------------------------------- reports
def test_markdown_dict_and_per_layer_agree():
    base, tuned, signs = planted(seed=7, n=40)
    result = edge_tests(base, tuned)
    counts = result.counts()
    assert counts["significant"] == counts["strengthened"] + counts["weakened"] > 0
    layers = result.per_layer()
    assert [row["layer"] for row in layers] == ["0", "1", "2", "3", "logits"]
    assert sum(row["edges"] for row in layers) == GRAPH.n_edges
    assert sum(row["strengthened"] for row in layers) == counts["strengthened"]
    assert sum(row["weakened"] for row in layers) == counts["weakened"]
    top = result.top(5, "weakened")
    assert len(top) == 5 and all(e["difference"] < 0 and e["q_value"] <= 0.05 for e in top)
    assert [abs(e["effect_size"]) for e in top] == sorted((abs(e["effect_size"]) for e in top), reverse=True)
    strongest = np.flatnonzero(result.significant() & (result.difference < 0))
    strongest = strongest[np.argmax(np.abs(result.effect_size[strongest]))]
    assert top[0]["edge"] == GRAPH.edge_names()[strongest]
    assert result.top(0) == []

    text = result.to_markdown(k=3)
    assert text.startswith(f"Per-edge paired t-test (differences tuned - base), n = 40 pairs, Benjamini-Hochberg FDR "
                           f"0.05: {counts['significant']} of 343 edges changed ({counts['strengthened']} strengthened, "
                           f"{counts['weakened']} weakened;")
    assert "**Top 3 strengthened** (by |Cohen's d_z|)" in text and "**Top 3 weakened**" in text
    assert f"| {top[0]['edge']} |" in text
    assert f"| logits | {layers[-1]['edges']} |" in text

    summary = json.loads(json.dumps(result.to_dict(k=3)))
    assert summary["significant"] == counts["significant"] and summary["df"] == 39.0
    assert summary["top"]["weakened"] == json.loads(json.dumps(result.top(3, "weakened")))
    assert summary["per_layer"] == layers and summary["fdr"] == 0.05
    assert len(json.dumps(summary)) < 5_000  # a summary, not the per-edge arrays
    welch = edge_tests(base, tuned, paired=False).to_dict()
    assert welch["effect_size"] == "Hedges' g" and set(welch["df"]) == {"min", "median", "max"}
