"""``edge_tests``: which edges changed between two models, one test per real edge.

For every real edge (``graph.edge_mask``) the per-sample scores of base and tuned are
compared across samples:

- paired (the same prompts on both models, matched by sample id): a one-sample t-test
  on the per-sample differences ``d = tuned - base`` (the same as
  ``scipy.stats.ttest_rel``), ``n - 1`` degrees of freedom; effect size Cohen's
  ``d_z = mean(d) / sd(d)`` (``ddof=1``);
- unpaired: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) with the
  Welch-Satterthwaite degrees of freedom; effect size Hedges' ``g``, the mean
  difference over the pooled SD times the exact small-sample correction
  ``J = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2))``, ``m = n_base + n_tuned - 2``.

The Benjamini-Hochberg q-values (``scipy.stats.false_discovery_control``) control the
false discovery rate over all edges: an edge is significant when ``q <= fdr``.

Sign convention: every difference is tuned - base. Scores estimate ``loss(edge ablated)
- loss(clean)``, so a positive difference (a *strengthened* edge) means the edge helps
the tuned model more, or hurts it less, than the base model; a negative one (*weakened*)
the opposite.

Why a t-test: it needs only each edge's count, mean and sum of squared deviations, which
stream in one pass over the samples with ``O(n_edges)`` memory: each chunk of samples is
reduced in float64 (deviations from the chunk mean) and merged into the running values
with the parallel update of Chan, Golub and LeVeque (1979). A 7B head-level graph has
1.6M edges; with 500 samples per model that is 6.6 GB of scores per model, read from
memory-mapped ``.cdiff`` files chunk by chunk. A rank test (Wilcoxon, Mann-Whitney) would
need every sample of an edge at once. The t-test is exact when the differences (paired)
or the scores (unpaired) are normal; otherwise, by the central limit theorem, its
p-values are approximately right for about 30 samples or more, at moderate p-values.
Far in the tail, where Benjamini-Hochberg draws its line over millions of edges (p of
1e-7 and below), skewed or heavy-tailed scores can make them too small: check the edges
you report with more samples or a permutation test. Results with fewer than 30 samples
say so in ``EdgeTests.warnings``.

Constant edges: where the differences of an edge (paired), or the scores on both sides
(unpaired), are all exactly equal, the standard deviation is 0. If the mean difference
is also 0, the statistic and effect size are 0 and p is 1; otherwise they are +-inf and
p is 0 (a deterministic change). Welch's degrees of freedom are undefined (NaN) there.

Memory: a chunk of ``chunk_size`` samples of the real-edge scores per side (float64)
plus a few ``[n_edges]`` float64 arrays; the score files are never loaded whole.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy import special, stats
from torch import Tensor

from circuitdiff import metrics, report
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, NonFiniteError
from circuitdiff.graph import AttributionGraph
from circuitdiff.io import write_atomically
from circuitdiff.pairing import check_same_settings, common_graph, pair
from circuitdiff.scores import EdgeScores
from circuitdiff.significance import SMALL_SAMPLE
from circuitdiff.typecheck import shape_checked

__all__ = ["EdgeTests", "edge_tests", "check_fdr", "CHUNK_VALUES"]

#: Float64 values (samples x edges) read per side and chunk when ``chunk_size`` is None (128 MiB).
CHUNK_VALUES = 1 << 24
_DIRECTIONS = ("strengthened", "weakened")


@shape_checked
@dataclass
class EdgeTests:
    """What :func:`edge_tests` found: one test per real edge, in ``graph.edge_names()`` order.

    Attributes:
        graph: the graph tested (the layer-level coarsening with ``coarsen=True``).
        paired: whether the samples were paired by sample id.
        test: ``"paired t-test (differences tuned - base)"`` or ``"Welch t-test"``.
        fdr: the false discovery rate of :meth:`significant` (Benjamini-Hochberg).
        n_base, n_tuned: samples used per side (paired: the pairs, equal).
        base_mean, tuned_mean: ``[n_edges]`` each edge's mean score per model.
        difference: ``[n_edges]`` tuned_mean - base_mean (paired: the mean per-sample difference).
        statistic: ``[n_edges]`` t statistic of tuned - base (+-inf for constant nonzero differences).
        df: degrees of freedom: ``n - 1`` (paired) or ``[n_edges]`` Welch-Satterthwaite
            (NaN where both sides are constant).
        p_value: ``[n_edges]`` two-sided p-values.
        q_value: ``[n_edges]`` Benjamini-Hochberg adjusted p-values.
        effect_size: ``[n_edges]`` Cohen's d_z (paired) or Hedges' g (unpaired), sign of the difference.
        sources, receivers: ``[n_edges]`` each edge's row and column in the score matrices.
        dropped: samples left out by the pairing: ``{"side", "id", "reason"}``.
        warnings: caveats on the p-values (few samples), as sentences.
    """

    graph: AttributionGraph
    paired: bool
    test: str
    fdr: float
    n_base: int
    n_tuned: int
    base_mean: Float[np.ndarray, "n_edges"]
    tuned_mean: Float[np.ndarray, "n_edges"]
    difference: Float[np.ndarray, "n_edges"]
    statistic: Float[np.ndarray, "n_edges"]
    df: float | Float[np.ndarray, "n_edges"]
    p_value: Float[np.ndarray, "n_edges"]
    q_value: Float[np.ndarray, "n_edges"]
    effect_size: Float[np.ndarray, "n_edges"]
    sources: Int[np.ndarray, "n_edges"]
    receivers: Int[np.ndarray, "n_edges"]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def effect_size_name(self) -> str:
        """``"Cohen's d_z"`` (paired) or ``"Hedges' g"`` (unpaired)."""
        return "Cohen's d_z" if self.paired else "Hedges' g"

    @shape_checked
    def significant(self) -> Bool[np.ndarray, "n_edges"]:
        """``[n_edges]`` True where the edge changed at the false discovery rate ``fdr`` (``q <= fdr``)."""
        return self.q_value <= self.fdr

    def edge_names(self, indices: Int[np.ndarray, "k"] | Sequence[int]) -> list[str]:
        """Names (``"a0.h1->a3.h2<k>"``, as ``graph.edge_names()``) of the edges at ``indices`` only."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.sources.size
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise ArgumentError(f"edge indices must be in [0, {n}) (this graph has {n} edges); got "
                                f"{int(indices.min())}..{int(indices.max())}.")
        graph = self.graph
        return [f"{graph.sources[s]}->{graph.receivers[r]}"
                for s, r in zip(self.sources[indices].tolist(), self.receivers[indices].tolist(), strict=True)]

    def top(self, k: int = 10, direction: str = "strengthened") -> list[dict[str, Any]]:
        """The at most ``k`` significant edges that changed in ``direction``, largest ``|effect size|`` first.

        ``direction``: ``"strengthened"`` (difference > 0: tuned's score is higher, the
        edge helps more or hurts less) or ``"weakened"`` (difference < 0). Each edge is
        ``{"edge", "base_mean", "tuned_mean", "difference", "effect_size", "p_value", "q_value"}``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ArgumentError(f"k must be an integer >= 0; got {k!r}.")
        if direction not in _DIRECTIONS:
            raise ArgumentError(f"direction must be 'strengthened' or 'weakened'; got {direction!r}.")
        changed = self.difference > 0 if direction == "strengthened" else self.difference < 0
        candidates = np.flatnonzero(self.significant() & changed)
        chosen = candidates[np.argsort(-np.abs(self.effect_size[candidates]), kind="stable")[:k]]
        return [{"edge": name, "base_mean": float(self.base_mean[i]), "tuned_mean": float(self.tuned_mean[i]),
                 "difference": float(self.difference[i]), "effect_size": float(self.effect_size[i]),
                 "p_value": float(self.p_value[i]), "q_value": float(self.q_value[i])}
                for name, i in zip(self.edge_names(chosen), chosen.tolist(), strict=True)]

    def per_layer(self) -> list[dict[str, Any]]:
        """Per receiver layer (``"0"`` .. ``"L-1"``, then ``"logits"``): ``{"layer", "edges", "strengthened", "weakened"}``.

        ``strengthened`` and ``weakened`` count the significant edges into that layer's receivers.
        """
        layers = np.asarray(self.graph.receiver_layers)[self.receivers]
        significant = self.significant()
        n = self.graph.n_layers + 1

        def count(selected: np.ndarray) -> list[int]:
            return np.bincount(layers[selected], minlength=n).tolist()

        edges = np.bincount(layers, minlength=n).tolist()
        up, down = count(significant & (self.difference > 0)), count(significant & (self.difference < 0))
        return [{"layer": str(layer) if layer < self.graph.n_layers else "logits", "edges": edges[layer],
                 "strengthened": up[layer], "weakened": down[layer]} for layer in range(n)]

    def counts(self) -> dict[str, int]:
        """``{"edges", "significant", "strengthened", "weakened"}`` over all edges."""
        significant = self.significant()
        return {"edges": int(significant.size), "significant": int(significant.sum()),
                "strengthened": int((significant & (self.difference > 0)).sum()),
                "weakened": int((significant & (self.difference < 0)).sum())}

    def to_markdown(self, k: int = 10) -> str:
        """A summary line, the top-``k`` strengthened and weakened edges, and the per-layer counts."""
        c = self.counts()
        samples = f"n = {self.n_base} pairs" if self.paired else f"n = {self.n_base} base, {self.n_tuned} tuned"
        lines = [f"Per-edge {self.test}, {samples}, Benjamini-Hochberg FDR {self.fdr:g}: {c['significant']:,} of "
                 f"{c['edges']:,} edges changed ({c['strengthened']:,} strengthened, {c['weakened']:,} weakened; "
                 "strengthened: tuned's score is higher)."]
        lines += [f"> Warning: {warning}" for warning in self.warnings]
        headers = ["edge", "base mean", "tuned mean", "difference", self.effect_size_name, "p", "q"]
        for direction in _DIRECTIONS:
            rows = [[e["edge"], f"{e['base_mean']:.4g}", f"{e['tuned_mean']:.4g}", f"{e['difference']:+.3g}",
                     f"{e['effect_size']:+.3g}", f"{e['p_value']:.3g}", f"{e['q_value']:.3g}"]
                    for e in self.top(k, direction)]
            lines += ["", f"**Top {k} {direction}** (by |{self.effect_size_name}|)", ""]
            lines.append(report.markdown_table(headers, rows, "lrrrrrr") if rows else "none")
        layers = [[row["layer"], f"{row['edges']:,}", f"{row['strengthened']:,}", f"{row['weakened']:,}"]
                  for row in self.per_layer()]
        lines += ["", "**Significant edges by receiver layer**", "",
                  report.markdown_table(["layer", "edges", "strengthened", "weakened"], layers, "lrrr")]
        return "\n".join(lines)

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        """A JSON-ready summary (settings, counts, top-``k`` tables, per-layer counts), not the per-edge arrays."""
        if np.ndim(self.df) == 0:
            df: Any = float(self.df)
        else:
            defined = self.df[np.isfinite(self.df)]
            df = ({"min": float(defined.min()), "median": float(np.median(defined)), "max": float(defined.max())}
                  if defined.size else None)
        return report.json_ready({
            "test": self.test, "paired": self.paired, "effect_size": self.effect_size_name,
            "correction": "Benjamini-Hochberg", "fdr": self.fdr, "level": self.graph.level,
            "n_base": self.n_base, "n_tuned": self.n_tuned, "df": df, **self.counts(),
            "top": {direction: self.top(k, direction) for direction in _DIRECTIONS},
            "per_layer": self.per_layer(), "dropped": self.dropped, "warnings": self.warnings,
        })

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every edge's result to a compressed ``.npz`` file (numpy arrays only, no pickles); returns its path.

        Arrays, one entry per real edge: ``edge`` (names), ``source``, ``receiver``
        (matrix indices), ``base_mean``, ``tuned_mean``, ``difference``, ``statistic``,
        ``df``, ``p_value``, ``q_value``, ``effect_size``, ``significant``; and
        ``settings``, the JSON text of :meth:`to_dict` without the top tables. Read it with
        ``numpy.load(path)`` (e.g. ``pandas.DataFrame({k: f[k] for k in f.files if k != "settings"})``).
        Written atomically.
        """
        path = Path(path)
        names = np.array(self.edge_names(np.arange(self.sources.size)), dtype=str)
        settings = {key: value for key, value in self.to_dict(k=0).items() if key != "top"}
        arrays = {"edge": names, "source": self.sources, "receiver": self.receivers, "base_mean": self.base_mean,
                  "tuned_mean": self.tuned_mean, "difference": self.difference, "statistic": self.statistic,
                  "df": np.broadcast_to(np.asarray(self.df, dtype=float), self.sources.shape),
                  "p_value": self.p_value, "q_value": self.q_value, "effect_size": self.effect_size,
                  "significant": self.significant(), "settings": np.array(json.dumps(settings))}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: numpy appends no ".npz" to the name
                np.savez_compressed(handle, **arrays)

        write_atomically(path, write)
        return path

    def to_json(self, path: str | None = None, k: int = 10) -> str:
        """:meth:`to_dict` as JSON text; also written to ``path`` if given."""
        return report.write_json(self.to_dict(k), path)


def edge_tests(
    base: EdgeScores,
    tuned: EdgeScores,
    *,
    paired: bool | None = None,
    fdr: float = 0.05,
    coarsen: bool = False,
    chunk_size: int | None = None,
) -> EdgeTests:
    """Test every real edge for a change between two models (tuned - base), with FDR control.

    Args:
        base: per-sample :class:`EdgeScores` of the base model (memory-mapped is fine).
        tuned: per-sample :class:`EdgeScores` of the tuned model, on the same graph.
        paired: pair the samples by sample id (paired t-test on the differences). Default
            (None): paired, leaving out ids found on one side only (``dropped``). False:
            Welch's t-test on all samples of both sides.
        fdr: false discovery rate, in (0, 1), at which :meth:`EdgeTests.significant` calls an edge changed.
        coarsen: when the graphs differ, test the common layer-level coarsening instead of refusing.
        chunk_size: samples read per side at a time; default ``CHUNK_VALUES // n_edges`` (at least 1).

    Returns:
        :class:`EdgeTests`; ``print(result.to_markdown())``.

    Raises:
        ArgumentError: an option out of range (the message names it and the valid values).
        DataError: no per-sample scores, fewer than 2 samples on a side, no common sample id
            (pass ``paired=False`` for different prompts), different scoring settings or graphs.
        NonFiniteError: a NaN or infinite score on a real edge (side, sample id and row named).
    """
    for side, scores in (("base", base), ("tuned", tuned)):
        if not isinstance(scores, EdgeScores):
            raise ArgumentTypeError(f"{side} must be EdgeScores, got {type(scores).__name__}.")
        if scores.per_sample is not None and scores.n_samples < 2:
            raise DataError(f"edge_tests ({side}): a t-test needs at least 2 samples per side; got "
                            f"{scores.n_samples}.")
        metrics.require_per_sample(scores, f"edge_tests ({side})")
    _check_options(paired, fdr, coarsen, chunk_size)
    check_same_settings(base, tuned)
    base, tuned = common_graph(base, tuned, coarsen)
    pairing = pair(base, tuned, paired is not False)
    graph = base.graph
    sources, receivers = (index.numpy() for index in torch.nonzero(graph.edge_mask, as_tuple=True))
    flat = torch.from_numpy(sources * graph.n_receivers + receivers)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_VALUES // max(flat.numel(), 1))
    readers = {side: _Reader(side, scores, pairing.rows[side], flat, chunk_size)
               for side, scores in (("base", base), ("tuned", tuned))}
    n_base, n_tuned = pairing.n["base"], pairing.n["tuned"]
    if pairing.paired:
        base_mean, difference, deviations = _stream_differences(readers["base"], readers["tuned"], n_base)
        tuned_mean = base_mean + difference
        statistic, df, p, effect = _paired_test(difference, deviations, n_base)
        test = "paired t-test (differences tuned - base)"
    else:
        base_mean, base_deviations = _stream_side(readers["base"], n_base)
        tuned_mean, tuned_deviations = _stream_side(readers["tuned"], n_tuned)
        difference = tuned_mean - base_mean
        statistic, df, p, effect = _welch_test(difference, base_deviations, tuned_deviations, n_base, n_tuned)
        test = "Welch t-test"
    q = stats.false_discovery_control(p, method="bh")
    return EdgeTests(graph=graph, paired=pairing.paired, test=test, fdr=float(fdr), n_base=n_base, n_tuned=n_tuned,
                     base_mean=base_mean, tuned_mean=tuned_mean, difference=difference, statistic=statistic, df=df,
                     p_value=p, q_value=q, effect_size=effect, sources=sources, receivers=receivers,
                     dropped=pairing.dropped, warnings=_warnings(pairing.paired, n_base, n_tuned))


def _check_options(paired: object, fdr: object, coarsen: object, chunk_size: object) -> None:
    """Refuse option values :func:`edge_tests` cannot use (ArgumentError naming the option)."""
    if paired not in (None, True, False):
        raise ArgumentError(f"paired must be None, True or False; got {paired!r}.")
    check_fdr(fdr)
    if not isinstance(coarsen, bool):
        raise ArgumentError(f"coarsen must be True or False; got {coarsen!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")


def check_fdr(fdr: object) -> None:
    """Refuse a false discovery rate outside (0, 1) (ArgumentError)."""
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0 < fdr < 1:
        raise ArgumentError(f"fdr must be a number in (0, 1), e.g. 0.05; got {fdr!r}.")


def _warnings(paired: bool, n_base: int, n_tuned: int) -> list[str]:
    """The caveat on the p-values when a side has fewer than ``SMALL_SAMPLE`` samples."""
    n = min(n_base, n_tuned)
    if n >= SMALL_SAMPLE:
        return []
    what = f"only {n} pairs" if paired else f"only {n_base} base and {n_tuned} tuned samples"
    shape = "the per-sample differences are" if paired else "each edge's scores are"
    return [f"{what} (fewer than {SMALL_SAMPLE}): the t-test's p-values, and so the FDR control, are exact only "
            f"if {shape} normally distributed; with {SMALL_SAMPLE} or more samples they are approximately right "
            "whatever the distribution. Score more samples or check the distribution."]


class _Reader:
    """One side's real-edge scores, read chunk by chunk into reused buffers (``[k, n_edges]`` float64)."""

    def __init__(self, side: str, scores: EdgeScores, rows: Tensor | None, flat: Tensor, chunk_size: int) -> None:
        per_sample = scores.per_sample
        assert per_sample is not None  # checked by edge_tests
        self.side, self.scores, self.rows, self.flat = side, scores, rows, flat
        self.cells = per_sample.reshape(per_sample.shape[0], -1)  # a view: memory-mapped files stay mapped
        self.n = per_sample.shape[0] if rows is None else int(rows.numel())
        size = min(chunk_size, self.n)
        self.values = torch.empty(size, flat.numel(), dtype=torch.float64)
        self.staging = self.values if per_sample.dtype == torch.float64 else torch.empty(size, flat.numel(),
                                                                                        dtype=per_sample.dtype)

    def chunks(self) -> range:
        """Start of every chunk."""
        return range(0, self.n, self.values.shape[0])

    def read(self, start: int) -> Tensor:
        """The chunk starting at ``start``: ``[k, n_edges]`` float64, valid until the next call."""
        stop = min(start + self.values.shape[0], self.n)
        staging = self.staging[:stop - start]
        if self.rows is None:
            torch.index_select(self.cells[start:stop], 1, self.flat, out=staging)
        else:
            for i, row in enumerate(self.rows[start:stop].tolist()):
                torch.index_select(self.cells[row], 0, self.flat, out=staging[i])
        values = self.values[:stop - start]
        if staging is not values:
            values.copy_(staging)
        return values

    def refuse(self, start: int, values: Tensor) -> None:
        """Raise the NonFiniteError naming the first sample of the chunk at ``start`` with a NaN or infinite value.

        ``values``: the chunk, or any transform of it that keeps exactly its non-finite entries.
        """
        bad = torch.nonzero(~torch.isfinite(values).all(1))
        if not bad.numel():  # only float64 scores near 1e308 can get here
            raise NonFiniteError(f"{self.side} scores: sums of scores overflow float64; rescale the scores.")
        row = int(bad[0])
        index = start + row if self.rows is None else int(self.rows[start + row])
        count = int((~torch.isfinite(values[row])).sum())
        raise NonFiniteError(
            f"{self.side} scores: sample {self.scores.sample_ids[index]!r} (row {index}) holds {count} NaN or "  # type: ignore[index]
            "infinite scores on real edges; the t-tests need finite scores. Rescore it, or leave such samples "
            "out with cd.attribute(..., nonfinite='drop')."
        )


class _Moments:
    """Running count, mean and sum of squared deviations (M2) per edge, in float64.

    Values are taken relative to the first sample (the shift), so an edge whose values
    are all exactly equal has mean shift + 0 and M2 exactly 0. Each chunk is reduced
    around its own mean and merged with Chan et al.'s parallel update.
    """

    def __init__(self, n_edges: int) -> None:
        self.count = 0
        self.shift = torch.zeros(n_edges, dtype=torch.float64)
        self.mean = torch.zeros(n_edges, dtype=torch.float64)  # of the shifted values
        self.m2 = torch.zeros(n_edges, dtype=torch.float64)
        self.chunk_mean = torch.empty(n_edges, dtype=torch.float64)

    def add(self, values: Tensor) -> bool:
        """Merge ``[k, n_edges]`` values (overwritten); False if one is NaN or infinite (merging nothing).

        The values are then shifted only, which keeps exactly their non-finite entries.
        """
        k = values.shape[0]
        if self.count == 0:
            self.shift.copy_(values[0])
        values.sub_(self.shift)
        torch.sum(values, 0, out=self.chunk_mean)
        if not math.isfinite(float(self.chunk_mean.sum())):  # sums of finite scores overflow only near 1e308
            return False
        self.chunk_mean.div_(k)
        chunk_m2 = values.sub_(self.chunk_mean).square_().sum(0)
        total = self.count + k
        delta = self.chunk_mean.sub_(self.mean)  # chunk mean - running mean
        self.m2 += chunk_m2.addcmul_(delta, delta, value=self.count * k / total)
        self.mean.add_(delta, alpha=k / total)
        self.count = total
        return True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, M2)`` as ``[n_edges]`` float64 numpy arrays."""
        return (self.shift + self.mean).numpy(), self.m2.numpy()


def _stream_differences(base: _Reader, tuned: _Reader, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired samples: base mean, mean difference (tuned - base) and M2 of the differences, per edge."""
    n_edges = base.flat.numel()
    base_sum = torch.zeros(n_edges, dtype=torch.float64)
    chunk_sum = torch.empty(n_edges, dtype=torch.float64)
    differences = _Moments(n_edges)
    for start in base.chunks():
        b, t = base.read(start), tuned.read(start)
        torch.sum(b, 0, out=chunk_sum)
        if not math.isfinite(float(chunk_sum.sum())):
            base.refuse(start, b)
        base_sum += chunk_sum
        d = t.sub_(b)  # b finite, so d is non-finite exactly where t is
        if not differences.add(d):
            tuned.refuse(start, d)
    mean, m2 = differences.result()
    return (base_sum / n).numpy(), mean, m2


def _stream_side(reader: _Reader, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One side's mean and M2 per edge."""
    moments = _Moments(reader.flat.numel())
    for start in reader.chunks():
        values = reader.read(start)
        if not moments.add(values):
            reader.refuse(start, values)
    return moments.result()


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with 0 / 0 = 0 and x / 0 = +-inf (constant edges)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((numerator == 0) & (denominator == 0), 0.0, numerator / denominator)


def _two_sided_p(statistic: np.ndarray, df: float | np.ndarray) -> np.ndarray:
    """Two-sided p-values of t statistics (``inf`` gives 0, ``0`` gives 1)."""
    return np.minimum(2.0 * special.stdtr(df, -np.abs(statistic)), 1.0)


def _paired_test(mean: np.ndarray, m2: np.ndarray, n: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """t statistic, df, p-value and Cohen's d_z of the mean difference."""
    sd = np.sqrt(m2 / (n - 1))
    statistic = _ratio(mean, sd / math.sqrt(n))
    return statistic, float(n - 1), _two_sided_p(statistic, n - 1), _ratio(mean, sd)


def _welch_test(difference: np.ndarray, m2_base: np.ndarray, m2_tuned: np.ndarray, n_base: int,
                n_tuned: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Welch's t statistic, Welch-Satterthwaite df, p-value and Hedges' g of tuned - base."""
    a, b = m2_base / (n_base - 1) / n_base, m2_tuned / (n_tuned - 1) / n_tuned  # squared standard errors
    variance = a + b
    statistic = _ratio(difference, np.sqrt(variance))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = variance**2 / (a**2 / (n_base - 1) + b**2 / (n_tuned - 1))  # NaN where both sides are constant
    p = np.where(variance == 0, np.where(difference == 0, 1.0, 0.0), _two_sided_p(statistic, df))
    pooled_df = n_base + n_tuned - 2
    correction = math.exp(special.gammaln(pooled_df / 2) - special.gammaln((pooled_df - 1) / 2)) / math.sqrt(pooled_df / 2)
    effect = correction * _ratio(difference, np.sqrt((m2_base + m2_tuned) / pooled_df))
    return statistic, df, p, effect
