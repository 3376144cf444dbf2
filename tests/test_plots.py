"""circuitdiff.plots: the comparison figures render headless into valid, non-blank PNGs; the relative-change
scale is a symmetric log ratio; the models' display names label the figures; long titles wrap."""

from __future__ import annotations

import builtins
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from matplotlib.text import Text

import circuitdiff as cd
from circuitdiff import plots
from circuitdiff.comparison import Comparison, compare

NAMES = ("relative_change", "node_entropy", "diversity", "histograms")
PLOT_FUNCTIONS = (plots.plot_relative_change, plots.plot_node_entropy, plots.plot_diversity, plots.plot_histograms)


def make_comparison(graph: cd.AttributionGraph, n_samples: int = 20) -> Comparison:
    """Random base scores; the tuned model doubles them and adds noise."""
    base = torch.randn(n_samples, graph.n_sources, graph.n_receivers) * graph.edge_mask
    tuned = (2 * base + torch.randn_like(base)) * graph.edge_mask

    def scores(per_sample: torch.Tensor, model_id: str) -> cd.EdgeScores:
        return cd.EdgeScores(graph=graph, mean=per_sample.mean(0), per_sample=per_sample,
                             objective_values=torch.zeros(n_samples), metadata={"model_id": model_id})

    return compare(scores(base, "tiny-base"), scores(tuned, "tiny-rl"), breakdown=False, n_resamples=100)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    assert imread(path).std() > 0  # not one flat colour


@pytest.mark.parametrize("graph", [
    cd.AttributionGraph(2, 4, level="head"),
    cd.AttributionGraph(3, 4, level="layer"),
    cd.AttributionGraph(4, 16, 4, level="head"),  # too many nodes for name labels
], ids=["head", "layer", "head-large"])
def test_plot_comparison_writes_its_pngs(tmp_path, graph):
    directory = tmp_path / "figures" / "run"  # does not exist yet
    comparison = make_comparison(graph)
    paths = plots.plot_comparison(comparison, directory, prefix="gsm8k_", dpi=80)
    assert list(paths) == [*NAMES, "volcano"]  # the volcano plot of the per-edge tests comes last
    for name, path in paths.items():
        assert path == directory / f"gsm8k_{name}.png"
        assert_png(path)
    without_tests = dataclasses.replace(comparison, edge_tests=None)
    assert list(plots.plot_comparison(without_tests, tmp_path / "other", dpi=80)) == list(NAMES)


@pytest.mark.parametrize("plot", PLOT_FUNCTIONS, ids=NAMES)
def test_each_figure_function_returns_its_path(tmp_path, plot):
    path = plot(make_comparison(cd.AttributionGraph(2, 4, level="head")), str(tmp_path / "figure.png"))
    assert path == tmp_path / "figure.png"
    assert_png(path)


@pytest.mark.parametrize("level", ["head", "layer"])
def test_non_finite_relative_changes(tmp_path, level):
    comparison = make_comparison(cd.AttributionGraph(2, 4, level=level))
    rows, cols = torch.nonzero(comparison.graph.edge_mask, as_tuple=True)
    for i, value in enumerate([math.inf, -math.inf, math.nan, 1e12]):
        comparison.relative_change[rows[i], cols[i]] = value
    for path in plots.plot_comparison(comparison, tmp_path / "some").values():
        assert_png(path)
    undefined = dataclasses.replace(comparison, relative_change=torch.full_like(comparison.relative_change, math.nan))
    assert_png(plots.plot_relative_change(undefined, tmp_path / "all_nan.png"))


def test_titles_name_the_models():
    comparison = make_comparison(cd.AttributionGraph(1, 2, level="layer"))
    roles, names = {"base": "base", "tuned": "tuned"}, {"base": "Qwen", "tuned": "tiny-rl"}
    assert "base: tiny-base  vs  tuned: tiny-rl" in plots._title(comparison, "Node entropy", roles)
    # a display name equal to the model id is shown once
    assert "Qwen: tiny-base  vs  tiny-rl" in plots._title(comparison, "Node entropy", names)
    comparison.settings["tuned"] = {}
    assert "tuned: unnamed" in plots._title(comparison, "Node entropy", roles)
    comparison.settings["base"] = {}
    assert plots._title(comparison, "Node entropy", roles) == "Node entropy"
    assert plots._title(comparison, "Node entropy", names) == "Node entropy\nQwen  vs  tiny-rl"


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions would save, in order (nothing is written)."""
    figures = []

    def keep(figure, path, dpi):
        figures.append(figure)
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def texts(figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]


def test_relative_change_is_a_symmetric_log_ratio(drawn):
    graph = cd.AttributionGraph(2, 4, level="head")
    comparison = make_comparison(graph)
    rows, cols = torch.nonzero(graph.edge_mask, as_tuple=True)
    # |tuned| / |base| = 2 ** k on the edges, so the log2 ratio is k; a few edges without a finite ratio
    k = torch.linspace(-3, 5, len(rows), dtype=torch.float64)
    change = torch.full_like(comparison.relative_change, math.nan, dtype=torch.float64)
    change[rows, cols] = 2.0 ** k - 1
    change[rows[:2], cols[:2]] = math.nan  # base mean 0: no ratio
    change[rows[2], cols[2]] = -1.0  # tuned mean 0: log ratio -inf
    plots.plot_relative_change(dataclasses.replace(comparison, relative_change=change), "x.png",
                               names=("Qwen-base", "Qwen-GRPO"))
    (figure,) = drawn
    image = figure.axes[0].images[-1]
    limit = np.percentile(np.abs(k[3:].numpy()), 99)  # the finite ratios
    assert image.norm.vmin == pytest.approx(-limit) and image.norm.vmax == pytest.approx(limit)
    assert image.norm.vmin == -image.norm.vmax and limit < 5  # symmetric, and the largest ratio saturates
    shown = np.ma.filled(image.get_array(), np.nan)
    assert shown[rows[3], cols[3]] == pytest.approx(k[3].item())  # the log2 ratio, not the relative change
    assert shown[rows[2], cols[2]] == pytest.approx(-limit)  # -inf saturates at the blue end
    assert np.isnan(shown[~graph.edge_mask.numpy()]).all() and np.isnan(shown[rows[0], cols[0]])
    no_ratio = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)  # the black layer
    assert np.nansum(no_ratio) == 2 and no_ratio[rows[0], cols[0]] == 1
    title = figure.axes[0].get_title()
    assert "2 edges with a base mean of 0: no ratio (black)" in title.replace("\n", " ")
    assert "1 edge with an infinite ratio" in title.replace("\n", " ")
    label = figure.axes[1].get_ylabel().replace("\n", " ")  # the colour bar
    assert label.startswith("log2(|Qwen-GRPO mean| / |Qwen-base mean|)")


def test_the_models_display_names_label_the_figures(drawn):
    from circuitdiff.meta import Pooled, dersimonian_laird

    comparison = make_comparison(cd.AttributionGraph(2, 4, level="head"))
    names = ("Qwen-base", "Qwen-GRPO")
    plots.plot_comparison(comparison, "figures", names=names)
    pooled = Pooled("intensity", "all", ("a", "b"), (0.1, 0.2), ((0.0, 0.2), (0.1, 0.3)), 5.0, 1.0, 2,
                    dersimonian_laird([0.1, 0.2], [0.01, 0.01]))
    plots.plot_forest(pooled, "forest.png", names=names)
    relative, entropy, diversity, histograms, volcano, forest = drawn
    for figure in (entropy, diversity, histograms):
        legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
        assert legend[0].startswith("Qwen-base (") and legend[1].startswith("Qwen-GRPO ("), legend
    assert "log2(|Qwen-GRPO mean|" in relative.axes[1].get_ylabel()
    assert volcano.axes[0].get_xlabel().startswith("effect size of Qwen-GRPO - Qwen-base")
    assert forest.axes[0].get_xlabel() == "intensity: Qwen-GRPO - Qwen-base"
    for figure in drawn:
        assert "Qwen-base" in " ".join(texts(figure))
    for bad in (("same", "same"), ("only one",), "ab", ("base", "")):
        with pytest.raises(cd.ArgumentError, match="names must be two different non-empty display names"):
            plots.plot_node_entropy(comparison, "x.png", names=bad)


def test_long_titles_wrap_inside_the_figure(drawn):
    comparison = make_comparison(cd.AttributionGraph(2, 4, level="head"))
    long_id = "/scratch/checkpoints/qwen2.5-math-1.5b-instruct/grpo-run-17/checkpoint-600-with-a-long-name"
    comparison.settings["tuned"] = {"model_id": long_id}
    for plot in PLOT_FUNCTIONS:
        plot(comparison, "x.png", names=("Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-1.5B-Instruct-GRPO"))
    for figure in drawn:
        title = figure.axes[0].get_title()
        assert max(len(line) for line in title.split("\n")) <= 70, title  # 6 to 9 inches wide at 12 points
        assert long_id not in title and long_id in title.replace("\n", "").replace(" ", "")  # wrapped, all kept
        figure.canvas.draw()
        box = figure.bbox
        labels = [text for ax in figure.axes for text in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        legend = figure.axes[0].get_legend()
        for text in labels + (legend.get_texts() if legend else []):
            extent = text.get_window_extent()
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
            assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    comparison = make_comparison(cd.AttributionGraph(1, 2, level="layer"))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for plot in (plots.plot_comparison, *PLOT_FUNCTIONS):
        with pytest.raises(ImportError) as error:
            plot(comparison, tmp_path / "figure.png")
        assert str(error.value) == 'plots need matplotlib: pip install "circuitdiff[plot]"'
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_per_sample_figure_of_any_compared_metric(tmp_path):
    comparison = make_comparison(cd.AttributionGraph(2, 4, level="head"))
    for metric in comparison.metrics:
        assert_png(plots.plot_per_sample(comparison, metric, tmp_path / f"{metric}.png"))
    assert plots._metric_label(comparison, "intensity") == ("per-sample intensity: Mean |score| over the cells "
                                                           "(the paper's activation intensity) [score units]")
    assert plots._metric_label(comparison, "gini").startswith("per-sample gini: Gini coefficient of |score|")
    assert not plots._metric_label(comparison, "gini").endswith("]")  # dimensionless: no units
    with pytest.raises(cd.UnknownNameError, match="no per-sample values of metric 'nope'; compared: intensity"):
        plots.plot_per_sample(comparison, "nope", tmp_path / "nope.png")


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "welch"])
def test_volcano_plot_of_edge_tests(tmp_path, paired):
    import numpy as np

    from circuitdiff.differential import edge_tests

    graph = cd.AttributionGraph(4, 16, 4, level="head")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, graph.n_sources, graph.n_receivers, generator=g)
    tuned = base + torch.randn(base.shape, generator=g)
    tuned[:, 0, :20] += 3.0  # some strengthened edges
    tuned[:, 0, 20:40] -= 3.0  # some weakened ones
    base[:, 0, 0], tuned[:, 0, 0] = 1.0, 1.5  # a constant difference: infinite effect size, p = 0

    def scores(per_sample: torch.Tensor) -> cd.EdgeScores:
        per_sample = per_sample * graph.edge_mask
        return cd.EdgeScores(graph=graph, mean=per_sample.mean(0), per_sample=per_sample,
                             objective_values=torch.zeros(12))

    tests = edge_tests(scores(base), scores(tuned), paired=paired)
    counts = tests.counts()
    assert counts["strengthened"] > 0 and counts["weakened"] > 0
    path = plots.plot_volcano(tests, str(tmp_path / "volcano.png"), dpi=80)
    assert path == tmp_path / "volcano.png"
    assert_png(path)
    nothing = dataclasses.replace(tests, q_value=np.ones_like(tests.q_value))  # no significant edge
    assert_png(plots.plot_volcano(nothing, tmp_path / "none.png"))
