"""Plugins: in-process registration, entry-point discovery, and the errors around them."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
from circuitdiff import DuplicateNameError, PluginLoadError
from circuitdiff.registry import Registry
from plugin_helpers import install

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_example"
PLUGIN = "circuitdiff_example_plugin"
EXAMPLE_ENTRY_POINTS = {
    "circuitdiff.scorers": {"eap-abs": f"{PLUGIN}:AbsEAP"},
    "circuitdiff.objectives": {"answer_prob": f"{PLUGIN}:AnswerProb"},
}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty directory on sys.path, as if packages were installed there after import."""
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for module in [m for m in sys.modules if m.split(".")[0] in {PLUGIN, "broken_plugin"}]:
        del sys.modules[module]
    importlib.invalidate_caches()


@pytest.fixture
def example_plugin(site):
    """The example plugin from examples/plugin_example, installed into ``site``."""
    shutil.copytree(EXAMPLE / PLUGIN, site / PLUGIN)
    install(site, "circuitdiff-example-plugin", EXAMPLE_ENTRY_POINTS)
    importlib.invalidate_caches()
    return site


@pytest.fixture
def scratch():
    """Names registered during a test, forgotten afterwards: ``scratch.append((registry, name))``."""
    names: list[tuple[Registry, str]] = []
    yield names
    for registry, name in names:
        registry.unregister(name)


@pytest.fixture(scope="module")
def setup(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5, 6, 7], [8, 9]], [[10, 11], [12], [13, 14]],
                              batch_size=2)
    eap = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    assert (eap.per_sample < 0).any() and (eap.per_sample > 0).any()  # relations below are not trivial
    return model, graph, batches, eap


# ---------------------------------------------------------------------------- in-process
def test_decorated_scorer_runs_through_attribute(setup, scratch):
    model, graph, batches, eap = setup

    @cd.scorers.register("test-eap-scaled")
    class ScaledEAP:
        name = "test-eap-scaled"

        def __init__(self, factor: float = 2.0) -> None:
            self.factor = factor

        def score_batch(self, run, batch, batch_index):
            scores, losses = cd.scorers.EAP().score_batch(run, batch, batch_index)
            return self.factor * scores, losses

    scratch.append((cd.scorers.registry, "test-eap-scaled"))
    assert isinstance(ScaledEAP, type)  # the decorator returns the class unchanged
    assert "test-eap-scaled" in cd.scorers.available()
    scaled = cd.attribute(model, graph, batches, objective="answer_nll", method="test-eap-scaled", progress=False)
    assert scaled.metadata["method"] == "test-eap-scaled"
    torch.testing.assert_close(scaled.per_sample, 2.0 * eap.per_sample)
    torch.testing.assert_close(scaled.objective_values, eap.objective_values)
    options = cd.scorers.get("test-eap-scaled", factor=-3.0)  # options go to the constructor
    flipped = cd.attribute(model, graph, batches, objective="answer_nll", method=options, progress=False)
    torch.testing.assert_close(flipped.mean, -3.0 * eap.mean)


def test_decorated_objective_runs_through_attribute(setup, scratch):
    model, graph, batches, eap = setup

    @cd.objectives.register("test-double-nll")
    def double_nll():
        return lambda logits, batch: 2.0 * cd.objectives.answer_nll()(logits, batch)

    scratch.append((cd.objectives.registry, "test-double-nll"))
    assert "test-double-nll" in cd.objectives.available()
    doubled = cd.attribute(model, graph, batches, objective="test-double-nll", progress=False)
    torch.testing.assert_close(doubled.objective_values, 2.0 * eap.objective_values)
    torch.testing.assert_close(doubled.mean, 2.0 * eap.mean)


def test_duplicate_names(scratch):
    class First:
        name = "test-dup"

    class Second:
        name = "test-dup"

    scratch.append((cd.scorers.registry, "test-dup"))
    cd.scorers.register("test-dup", First)
    cd.scorers.register("test-dup", First)  # the same factory again is harmless
    with pytest.raises(DuplicateNameError, match=r"'test-dup' is already registered .*First.*replace=True"):
        cd.scorers.register("test-dup", Second)
    with pytest.raises(DuplicateNameError, match="'eap' is already registered"):
        cd.scorers.register("eap", Second)
    assert isinstance(cd.scorers.get("eap"), cd.scorers.EAP)
    cd.scorers.register("test-dup", Second, replace=True)
    assert isinstance(cd.scorers.get("test-dup"), Second)
    assert issubclass(DuplicateNameError, cd.CircuitDiffError)


def test_unknown_names_list_the_available_ones(setup):
    model, graph, batches, _ = setup
    with pytest.raises(cd.UnknownNameError, match=r"unknown scorer 'nope'; available: eap\b.*scorer object"):
        cd.scorers.get("nope")
    with pytest.raises(cd.UnknownNameError, match=r"unknown objective 'nope'; available: answer_nll, "):
        cd.attribute(model, graph, batches, objective="nope", progress=False)


# ---------------------------------------------------------------------------- entry points
def test_example_plugin_is_discovered_through_its_entry_points(setup, example_plugin):
    model, graph, batches, eap = setup
    assert PLUGIN not in sys.modules
    assert "eap-abs" in cd.scorers.available() and "answer_prob" in cd.objectives.available()
    assert PLUGIN not in sys.modules  # listing does not import plugins

    scores = cd.attribute(model, graph, batches, objective="answer_nll", method="eap-abs", progress=False)
    assert scores.metadata["method"] == "eap-abs"
    torch.testing.assert_close(scores.per_sample, eap.per_sample.abs())
    torch.testing.assert_close(scores.objective_values, eap.objective_values)
    assert (scores.mean > eap.mean.abs() + 1e-6).any()  # magnitudes do not cancel across samples
    assert not scores.per_sample[:, ~graph.edge_mask].any()


def test_example_objective_plugin_runs_through_attribute(setup, example_plugin):
    model, graph, batches, _ = setup
    scores = cd.attribute(model, graph, batches, objective="answer_prob", progress=False)
    assert scores.metadata["objective"] == "answer_prob"
    expected = []
    with torch.no_grad():
        for batch in batches:
            probs = model(batch.input_ids, attention_mask=batch.attention_mask).softmax(-1)
            for b in range(batch.size):
                span = batch.labels[b] != cd.IGNORE
                expected.append(-probs[b, span].gather(-1, batch.labels[b, span, None]).mean())
    torch.testing.assert_close(scores.objective_values, torch.stack(expected))


def test_example_plugin_matches_its_pyproject_and_the_docs():
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    for group, points in EXAMPLE_ENTRY_POINTS.items():
        assert f'[project.entry-points."{group}"]' in pyproject
        for key, value in points.items():
            assert f'{key} = "{value}"' in pyproject
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert (EXAMPLE / PLUGIN / "__init__.py").read_text() in docs
    assert pyproject in docs


def test_broken_plugin_names_its_entry_point_and_distribution(site):
    (site / "broken_plugin.py").write_text("raise RuntimeError('missing CUDA kernels')\n")
    install(site, "broken-dist", {"circuitdiff.scorers": {"broken-scorer": "broken_plugin:Scorer"}})
    importlib.invalidate_caches()
    assert "broken-scorer" in cd.scorers.available()  # listed without importing it
    with pytest.raises(PluginLoadError) as caught:
        cd.scorers.get("broken-scorer")
    message = str(caught.value)
    assert "'broken-scorer = broken_plugin:Scorer'" in message and "'circuitdiff.scorers'" in message
    assert "distribution broken-dist 0.1" in message and "RuntimeError: missing CUDA kernels" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert isinstance(caught.value, cd.CircuitDiffError)


def test_builtin_names_win_over_entry_points(site):
    (site / "broken_plugin.py").write_text("class Scorer:\n    name = 'eap'\n")
    install(site, "shadowing-dist", {"circuitdiff.scorers": {"eap": "broken_plugin:Scorer"}})
    importlib.invalidate_caches()
    registry = Registry("method", "circuitdiff.scorers")  # fresh: each registry warns once per name
    registry.register("eap", cd.scorers.EAP)
    with pytest.warns(UserWarning, match=r"'eap = broken_plugin:Scorer'.*shadowing-dist.*is ignored"):
        assert registry.available() == ["eap"]
    assert isinstance(registry.get("eap"), cd.scorers.EAP)
    assert "broken_plugin" not in sys.modules
