"""Figures of a :class:`~circuitdiff.comparison.Comparison` (the paper's Fig. 2 and 3).

Needs matplotlib: ``pip install "circuitdiff[plot]"``. Figures are drawn on a
``matplotlib.figure.Figure`` with its own Agg canvas, so pyplot, its figure registry and
the backend you use elsewhere are left untouched.

Usage::

    from circuitdiff.plots import plot_comparison

    paths = plot_comparison(cd.compare(base, tuned), "figures", prefix="gsm8k_", names=("Qwen", "Qwen-GRPO"))

``names`` are the two models' display names, used in legends, axis labels and titles
(default ``("base", "tuned")``). Titles are wrapped to the width of their axes.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from circuitdiff.comparison import Comparison
from circuitdiff.differential import EdgeTests
from circuitdiff.errors import ArgumentError, MissingDependencyError, UnknownNameError
from circuitdiff.io import write_atomically

if TYPE_CHECKING:
    from circuitdiff.meta import Pooled
    from circuitdiff.trajectory import Trajectory

__all__ = ["plot_comparison", "plot_relative_change", "plot_node_entropy", "plot_diversity", "plot_per_sample",
           "plot_histograms", "plot_volcano", "plot_trajectory", "plot_changing_edges", "plot_forest"]

#: Axes with more nodes than this are labelled by node index instead of node name.
MAX_TICK_LABELS = 60
#: The heatmap's colours saturate at this percentile of the finite ``|log2 ratio|``.
CLIP_PERCENTILE = 99
COLORS = {"base": "tab:blue", "tuned": "tab:orange"}
#: Display names of the two models unless a plot function is given ``names``.
DEFAULT_NAMES = ("base", "tuned")
#: Average character width of label text, in ems, for wrapping titles and colour-bar labels to their axes.
CHAR_EM = 0.55


def plot_comparison(
    comparison: Comparison, directory: str | os.PathLike[str], *, prefix: str = "",
    names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120
) -> dict[str, Path]:
    """Write the figures of ``comparison`` as PNG files into ``directory`` (created if missing).

    Returns ``{"relative_change", "node_entropy", "diversity", "histograms"}`` -> path of
    ``{directory}/{prefix}{name}.png``, and ``"volcano"`` (:func:`plot_volcano`) when the
    comparison holds per-edge tests; see the ``plot_*`` functions for what each shows.
    ``names``: the display names of the base and the tuned model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = {
        "relative_change": plot_relative_change,
        "node_entropy": plot_node_entropy,
        "diversity": plot_diversity,
        "histograms": plot_histograms,
    }
    paths = {name: plot(comparison, directory / f"{prefix}{name}.png", names=names, dpi=dpi)
             for name, plot in plots.items()}
    if comparison.edge_tests is not None:
        paths["volcano"] = plot_volcano(comparison.edge_tests, directory / f"{prefix}volcano.png", names=names,
                                        dpi=dpi)
    return paths


def plot_relative_change(comparison: Comparison, path: str | os.PathLike[str], *,
                         names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120) -> Path:
    """Heatmap of each edge's log ratio ``log2(|tuned mean| / |base mean|)`` (Fig. 2, on a symmetric scale).

    Sources are rows (y), receivers columns (x). The diverging colours are centred at 0
    (red: the edge got stronger, blue: weaker; +1 is twice as strong, -1 half) on
    ``[-L, L]``, ``L`` the 99th percentile of the finite ``|log2 ratio|``, so a few huge
    ratios do not wash out the rest and doubling and halving get equal colours; larger
    and infinite ratios (a tuned mean of 0 gives -inf) saturate. Edges without a ratio
    (a base mean of 0) are black, cells that are not edges grey; the title counts the
    edges without a ratio and those with an infinite one. The ratio is of ``|mean|``
    (``comparison.relative_change``), so an edge whose mean changes sign shows only its
    change of magnitude. Axes show node names when there are at most ``MAX_TICK_LABELS``.
    """
    display = _names(names)
    graph = comparison.graph
    edges = graph.edge_mask.cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # a change of -1 (tuned mean 0) is a log ratio of -inf
        values = np.log1p(comparison.relative_change.cpu().double().numpy()) / np.log(2.0)
    values[~edges] = np.nan
    no_ratio, infinite = edges & np.isnan(values), np.isinf(values)
    finite = np.abs(values[np.isfinite(values)])
    limit = float(np.percentile(finite, CLIP_PERCENTILE)) if finite.size else 0.0
    limit = limit if limit > 0 else 1.0
    n_rows, n_cols = values.shape
    figure = _figure((min(max(6.0, 0.2 * n_cols + 3), 20.0), min(max(4.5, 0.2 * n_rows + 2), 20.0)))
    from matplotlib.colors import ListedColormap  # after _figure, which explains a missing matplotlib

    ax = figure.add_subplot()
    ax.set_facecolor("0.8")  # NaN cells are drawn transparent: this grey shows through
    ax.imshow(np.where(no_ratio, 1.0, np.nan), cmap=ListedColormap(["black"]), vmin=0.0, vmax=1.0,
              aspect="auto", interpolation="nearest")
    image = ax.imshow(np.clip(values, -limit, limit), cmap="RdBu_r", vmin=-limit, vmax=limit,
                      aspect="auto", interpolation="nearest")
    label = f"log2(|{display['tuned']} mean| / |{display['base']} mean|), clipped to ±{limit:.3g}"
    # the axes keep about half the figure's height once the title and the receiver names are laid out
    figure.colorbar(image, ax=ax, label=_wrap(label, 0.5 * figure.get_figheight() * 72, _font_size("axes.labelsize")))
    if n_cols <= MAX_TICK_LABELS:
        ax.set_xticks(range(n_cols), graph.receivers, rotation=90, fontsize=7)
    if n_rows <= MAX_TICK_LABELS:
        ax.set_yticks(range(n_rows), graph.sources, fontsize=7)
    ax.set_xlabel("receiver")
    ax.set_ylabel("source")
    notes = [f"{_edges(no_ratio)} with a base mean of 0: no ratio (black)"] if no_ratio.any() else []
    if infinite.any():
        notes.append(f"{_edges(infinite)} with an infinite ratio (e.g. a tuned mean of 0): saturated")
    title = _title(comparison, f"Per-edge change of |mean score|, {graph.level} level", display)
    _set_title(ax, "\n".join([title, *notes]))
    return _save(figure, path, dpi)


def plot_node_entropy(comparison: Comparison, path: str | os.PathLike[str], *,
                      names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120) -> Path:
    """Each source node's output-edge entropy, base and tuned, in node order (Fig. 3b).

    One point per model and node (base left, tuned right), joined by a grey line so the
    change of every node reads directly; higher entropy means the node spreads its
    influence over more of its outgoing edges. Sources without a value (no edge, or all
    scores 0) are not drawn. Node names label the x axis up to ``MAX_TICK_LABELS`` nodes.
    """
    display = _names(names)
    sources = comparison.graph.sources
    base, tuned = comparison.node_entropy["base"], comparison.node_entropy["tuned"]
    x = np.arange(len(sources))
    figure = _figure((min(max(6.0, 0.15 * len(sources) + 2), 20.0), 4.5))
    ax = figure.add_subplot()
    few = len(sources) <= MAX_TICK_LABELS
    ax.plot(np.stack([x - 0.2, x + 0.2]), np.stack([base, tuned]), color="0.7", linewidth=1)
    for side, offset, values in (("base", -0.2, base), ("tuned", 0.2, tuned)):
        ax.plot(x + offset, values, "o", markersize=4 if few else 1.5, color=COLORS[side],
                label=f"{display[side]} (mean {_mean(values):.3g})")
    if few:
        ax.set_xticks(x, sources, rotation=90, fontsize=7)
    ax.set_xlabel("source node")
    ax.set_ylabel("output-edge entropy (nats)")
    ax.legend()
    _set_title(ax, _title(comparison, "Node entropy", display))
    return _save(figure, path, dpi)


def plot_diversity(comparison: Comparison, path: str | os.PathLike[str], *,
                   names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120) -> Path:
    """Histograms of the per-sample diversity of both models, on shared bins, means dashed (Fig. 3a).

    A sample's diversity is 1 - its mean Pearson correlation with the other samples'
    score matrices: how different the edges it uses are from the rest. Samples where it
    is undefined (constant scores) are left out; the legend gives the count and mean.
    """
    return plot_per_sample(comparison, "diversity", path, names=names, dpi=dpi)


def plot_per_sample(comparison: Comparison, metric: str, path: str | os.PathLike[str], *,
                    names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120) -> Path:
    """Histograms of any compared metric's per-sample values, both models on shared bins, means dashed.

    The x axis is labelled with the metric's description and units (its definition in
    the metric registry, :mod:`circuitdiff.metrics`). Samples where the metric is undefined are left out; the
    legend gives the count and mean.

    Raises:
        UnknownNameError: ``metric`` was not compared (the message lists those that were).
    """
    display = _names(names)
    if metric not in comparison.per_sample["base"]:
        raise UnknownNameError(f"no per-sample values of metric {metric!r}; compared: "
                               f"{', '.join(comparison.per_sample['base'])}.")
    values = {side: comparison.per_sample[side][metric] for side in COLORS}
    values = {side: v[np.isfinite(v)] for side, v in values.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins="auto")
    figure = _figure((6.5, 4.5))
    ax = figure.add_subplot()
    for side, v in values.items():
        mean = _mean(v)
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.4, color=COLORS[side],
                label=f"{display[side]} (n={v.size}, mean {mean:.3g})")
        if v.size:
            ax.axvline(mean, color=COLORS[side], linestyle="--")
    ax.set_xlabel(_metric_label(comparison, metric))
    ax.set_ylabel("samples")
    ax.legend()
    _set_title(ax, _title(comparison, f"Per-sample {metric}", display))
    return _save(figure, path, dpi)


def plot_histograms(comparison: Comparison, path: str | os.PathLike[str], *,
                    names: Sequence[str] = DEFAULT_NAMES, dpi: int = 120) -> Path:
    """Histograms of ``|score|`` pooled over samples and edges, both models on the shared bins.

    These are the distributions whose entropies are the information complexity; the
    y axis is logarithmic so the sparse tail of large scores shows next to the mass
    near 0. Units are those of the objective.
    """
    display = _names(names)
    figure = _figure((6.5, 4.5))
    ax = figure.add_subplot()
    for side, color in COLORS.items():
        counts = comparison.histograms[side]
        ax.stairs(counts, comparison.bin_edges, color=color, linewidth=1.5,
                  label=f"{display[side]} ({counts.sum():.0f} scores)")
    ax.set_yscale("log")
    ax.set_xlabel("|edge score|")
    ax.set_ylabel("count")
    ax.legend()
    _set_title(ax, _title(comparison, "Edge-score magnitudes", display))
    return _save(figure, path, dpi)


def plot_volcano(tests: EdgeTests, path: str | os.PathLike[str], *, names: Sequence[str] = DEFAULT_NAMES,
                 dpi: int = 120) -> Path:
    """Volcano plot of :func:`~circuitdiff.differential.edge_tests`: effect size (x) against -log10 p (y), one dot per edge.

    x is the effect size of tuned - base (Cohen's d_z paired, Hedges' g unpaired);
    infinite ones (constant nonzero differences) are drawn at the largest finite
    ``|effect size|``. p-values of 0 (underflowed, or constant nonzero differences) are
    drawn one unit above the largest finite ``-log10 p``, so they do not squash the rest. Edges significant at the tests' FDR are coloured (red: strengthened,
    tuned's score higher; blue: weakened), the rest grey; the dashed line is the largest
    significant p-value (the Benjamini-Hochberg cut-off). Dots are rasterized, so millions
    of edges draw in about a second. ``names``: the display names of the base and the tuned model.
    """
    display = _names(names)
    effect = tests.effect_size
    finite = np.abs(effect[np.isfinite(effect)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    x = np.clip(effect, -bound, bound)
    positive = tests.p_value[tests.p_value > 0]
    top = float(-np.log10(positive.min())) + 1 if positive.size else 1.0
    with np.errstate(divide="ignore"):
        y = np.minimum(-np.log10(tests.p_value), top)
    significant = tests.significant()
    counts = tests.counts()
    groups = (("not significant", ~significant, "0.6"),
              (f"strengthened ({counts['strengthened']:,})", significant & (tests.difference > 0), "tab:red"),
              (f"weakened ({counts['weakened']:,})", significant & (tests.difference < 0), "tab:blue"))
    figure = _figure((6.5, 4.5))
    ax = figure.add_subplot()
    for label, selected, color in groups:
        ax.scatter(x[selected], y[selected], s=2, c=color, linewidths=0, rasterized=True, label=label)
    if counts["significant"]:
        ax.axhline(min(-np.log10(max(float(tests.p_value[significant].max()), np.finfo(np.float64).tiny)), top),
                   color="0.3", linestyle="--", linewidth=1, label=f"FDR {tests.fdr:g} cut-off")
    ax.set_xlabel(f"effect size of {display['tuned']} - {display['base']} ({tests.effect_size_name})")
    ax.set_ylabel("-log10 p")
    ax.legend(loc="upper center", markerscale=4)  # "best" would search millions of points; a volcano's top centre is empty
    samples = (f"{tests.n_base} pairs" if tests.paired
               else f"{tests.n_base} {display['base']}, {tests.n_tuned} {display['tuned']} samples")
    _set_title(ax, f"Per-edge {tests.test}, {samples}\n"
                   f"{counts['significant']:,} of {counts['edges']:,} edges changed at FDR {tests.fdr:g}")
    return _save(figure, path, dpi)


def plot_trajectory(trajectory: "Trajectory", path: str | os.PathLike[str], *, metrics: Sequence[str] | None = None,
                    group: str = "all", accuracy: str = "accuracy", dpi: int = 120) -> Path:
    """Each metric's difference from the initial model against the step, with its confidence band.

    One panel per metric (default: every one), the paper's Figure 5 style: the line is
    checkpoint - initial at each step, starting at 0 at the initial step (the series the
    trend is tested on), the band its confidence interval, the dashed line zero. Where
    the trajectory's logs have ``accuracy``, it is drawn on a twin axis (grey). The title
    says the Mann-Kendall trend and its p-value.
    """
    trends = {t.metric: t for t in trajectory.trends(group)}
    names = list(metrics) if metrics is not None else list(trends)
    unknown = sorted(set(names) - set(trends))
    if unknown:
        raise UnknownNameError(f"no metric {unknown} in the trajectory; known: {sorted(trends)}.")
    rows = {name: [row for _, row in trajectory.rows(group) if row.metric == name] for name in names}
    columns = min(2, len(names))
    height = (len(names) + columns - 1) // columns
    figure = _figure((5.5 * columns, 3.2 * height))
    steps = np.asarray(trajectory.steps)
    log = trajectory.logs.get(accuracy, {})
    for index, name in enumerate(names):
        ax = figure.add_subplot(height, columns, index + 1)
        values = np.array([r.difference for r in rows[name]])
        ax.fill_between(steps, [r.ci_low for r in rows[name]], [r.ci_high for r in rows[name]], color=COLORS["tuned"],
                        alpha=0.25, linewidth=0)
        ax.plot([trajectory.initial_step, *steps], [0.0, *values], marker="o", color=COLORS["tuned"])
        ax.axhline(0.0, color="0.3", linestyle="--", linewidth=1)
        t = trends[name]
        _set_title(ax, f"{name}: trend {t.direction} (tau {t.tau:.2f}, p {t.p_value:.2g})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name}, checkpoint - step {trajectory.initial_step}")
        shown = [s for s in (trajectory.initial_step, *trajectory.steps) if s in log]
        if shown:
            twin = ax.twinx()
            twin.plot(shown, [log[s] for s in shown], color="0.5", marker=".", linewidth=1)
            twin.set_ylabel(accuracy, color="0.4")
    return _save(figure, path, dpi)


def plot_changing_edges(trajectory: "Trajectory", path: str | os.PathLike[str], *, k: int = 20,
                        dpi: int = 120) -> Path:
    """Heatmap of the ``k`` edges whose mean score changed most: one row per edge, one column per step.

    The colour is the edge's mean score at that checkpoint minus the initial model's
    (red: higher, blue: lower), on a scale symmetric around zero.
    """
    names, changes = trajectory.changing_edges(k)
    bound = float(np.abs(changes).max()) or 1.0
    figure = _figure((max(4.0, 0.5 * len(trajectory.steps) + 3), max(2.5, 0.25 * len(names) + 1.5)))
    ax = figure.add_subplot()
    image = ax.imshow(changes, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_xticks(range(len(trajectory.steps)), [str(s) for s in trajectory.steps])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("step")
    _set_title(ax, f"The {len(names)} most-changing edges: mean score - step {trajectory.initial_step}", fontsize=10)
    figure.colorbar(image, ax=ax, label="change of the mean score")
    return _save(figure, path, dpi)


def plot_forest(pooled: "Pooled", path: str | os.PathLike[str], *, names: Sequence[str] = DEFAULT_NAMES,
                dpi: int = 120) -> Path:
    """Forest plot of one metric over a study's settings: each setting's difference (tuned - base) with its
    interval, and the random-effects pooled difference (diamond) with its interval; the dashed line is zero.
    ``names``: the display names of the base and the tuned model."""
    display = _names(names)
    k = len(pooled.settings)
    figure = _figure((7.0, 0.4 * k + 1.8))
    ax = figure.add_subplot()
    rows = np.arange(k, 0, -1, dtype=float)
    low = np.array([lo for lo, _ in pooled.intervals])
    high = np.array([hi for _, hi in pooled.intervals])
    values = np.asarray(pooled.differences)
    ax.hlines(rows, low, high, color=COLORS["tuned"])  # a BCa interval need not contain its estimate
    ax.plot(values, rows, "s", color=COLORS["tuned"])
    estimate = pooled.pooled
    labels = list(pooled.settings)
    if estimate.estimate == estimate.estimate:  # not NaN
        ax.fill([estimate.ci_low, estimate.estimate, estimate.ci_high, estimate.estimate], [0, 0.25, 0, -0.25],
                color="0.2")
        labels.append(f"pooled (I^2 {estimate.i2:.0%})")
    ax.axvline(0.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_yticks(list(rows) + ([0.0] if len(labels) > k else []), labels, fontsize=8)
    ax.set_xlabel(f"{pooled.metric}: {display['tuned']} - {display['base']}")
    _set_title(ax, f"{pooled.metric} over {k} settings: up in {pooled.fraction_up:.0%}, "
                   f"mean change {pooled.mean_percent_change:+.1f}%", fontsize=10)
    return _save(figure, path, dpi)


# ---------------------------------------------------------------------- helpers
def _figure(size: tuple[float, float]) -> Any:
    """A Figure on its own Agg canvas (no pyplot), or the ImportError that says what to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError('plots need matplotlib: pip install "circuitdiff[plot]"') from error
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _names(names: Sequence[str]) -> dict[str, str]:
    """``{"base": names[0], "tuned": names[1]}``, or the error that says what ``names`` must be."""
    if isinstance(names, str) or len(names) != 2 or not all(isinstance(n, str) and n.strip() for n in names) \
            or names[0] == names[1]:
        raise ArgumentError(f"names must be two different non-empty display names (base, tuned), e.g. "
                            f"('Qwen2.5-1.5B', 'Qwen2.5-1.5B-GRPO'); got {names!r}.")
    return {"base": names[0], "tuned": names[1]}


def _title(comparison: Comparison, what: str, display: dict[str, str]) -> str:
    """``what``, then each model's display name with its id when the scores' metadata has one."""
    ids = {side: comparison.settings.get(side, {}).get("model_id") for side in display}
    if not any(ids.values()) and tuple(display.values()) == DEFAULT_NAMES:
        return what
    models = [name if not any(ids.values()) or ids[side] == name else f"{name}: {ids[side] or 'unnamed'}"
              for side, name in display.items()]
    return f"{what}\n{models[0]}  vs  {models[1]}"


def _set_title(ax: Any, text: str, fontsize: float | None = None) -> None:
    """Set ``ax``'s title, each line wrapped to the axes' width (long model ids would be cut off otherwise).

    The figure grows by the height of the title's lines beyond two, so the axes keep their height.
    """
    size = _font_size("axes.titlesize", fontsize)
    title = _wrap(text, ax.get_position().width * ax.figure.get_figwidth() * 72, size)
    extra = title.count("\n") - 1
    if extra > 0:
        ax.figure.set_figheight(ax.figure.get_figheight() + extra * 1.2 * size / 72)
    ax.set_title(title, fontsize=size)


def _wrap(text: str, length: float, size: float) -> str:
    """``text`` with each line wrapped to fit ``length`` points of ``size``-point characters (20 at least)."""
    chars = max(20, int(length / (CHAR_EM * size)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _font_size(key: str, size: float | None = None) -> float:
    """``size``, or else matplotlib's setting ``key`` (e.g. ``"axes.titlesize"``: ``"large"``), in points."""
    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties

    return FontProperties(size=size or rcParams[key]).get_size_in_points()


def _edges(cells: np.ndarray) -> str:
    """``"1 edge"``, ``"1,234 edges"``: the number of True cells."""
    n = int(cells.sum())
    return f"{n:,} edge{'' if n == 1 else 's'}"


def _metric_label(comparison: Comparison, metric: str) -> str:
    """``per-sample {metric}: {description} [{units}]`` from the metric's definition (units left out if "1")."""
    definition = comparison.definitions.get(metric, {})
    label = f"per-sample {metric}" + (f": {definition['description']}" if definition.get("description") else "")
    units = definition.get("units", "1")
    return label if units in ("", "1") else f"{label} [{units}]"


def _mean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN (without a warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _save(figure: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    """Save atomically, in the format of the file name's suffix (png when it has none)."""
    path = Path(path)
    kind = path.suffix.lstrip(".") or "png"
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=kind))
    return path
