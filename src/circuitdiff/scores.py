"""EdgeScores: the result of an attribution run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data.batches import check_sample_ids
from circuitdiff.errors import ArgumentError
from circuitdiff.graph import AttributionGraph
from circuitdiff.io import check_metadata, read_scores_file, write_scores_file
from circuitdiff.typecheck import shape_checked

if TYPE_CHECKING:
    import networkx
    import pandas

    from circuitdiff.circuits import Circuit

__all__ = ["EdgeScores", "save_scores", "load_scores"]


@shape_checked
@dataclass
class EdgeScores:
    """Edge scores of one model on one dataset.

    Every score estimates ``objective(edge ablated) - objective(clean)`` for its sample,
    with the objective oriented as a loss: **positive means the edge helps** the model
    do what the objective measures. Units are those of the objective (nats for
    ``answer_nll``).

    Attributes:
        graph: the graph whose sources and receivers index the matrices.
        mean: ``[n_sources, n_receivers]`` float32 mean over samples; structural zeros
            where ``graph.edge_mask`` is False.
        per_sample: ``[n_samples, n_sources, n_receivers]`` float32, or None when
            attribution ran with ``per_sample=False``. ``mean`` is its mean over samples.
        objective_values: ``[n_samples]`` the clean objective of each sample.
        metadata: model id, scorer, intervention, objective, versions, and the run's
            ``identity`` (see :mod:`circuitdiff.identity`) (JSON-ready).
        sample_ids: one unique name per sample, in row order (e.g. question ids);
            :func:`circuitdiff.compare` pairs two models' samples by them. Default: the
            row positions ``("0", "1", ...)``; ``metadata["sample_ids"]`` says
            ``"position"`` then, ``"given"`` otherwise (unless the metadata says already).
    """

    graph: AttributionGraph
    mean: Float[Tensor, "n_sources n_receivers"]
    per_sample: Float[Tensor, "n_samples n_sources n_receivers"] | None
    objective_values: Float[Tensor, "n_samples"]
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_metadata(self.metadata)
        self.metadata = dict(self.metadata)
        if self.sample_ids is None:
            self.sample_ids = tuple(str(i) for i in range(self.n_samples))
            self.metadata.setdefault("sample_ids", "position")
        else:
            self.sample_ids = check_sample_ids(self.sample_ids, self.n_samples, "EdgeScores.sample_ids")
            self.metadata.setdefault("sample_ids", "given")
        shape = (self.graph.n_sources, self.graph.n_receivers)
        if tuple(self.mean.shape) != shape:
            raise ArgumentError(f"mean has shape {tuple(self.mean.shape)}; the graph needs {shape}.")
        if self.per_sample is not None and tuple(self.per_sample.shape) != (self.n_samples, *shape):
            raise ArgumentError(
                f"per_sample has shape {tuple(self.per_sample.shape)}; expected "
                f"{(self.n_samples, *shape)} for {self.n_samples} samples."
            )

    @property
    def n_samples(self) -> int:
        """Number of samples scored."""
        return int(self.objective_values.shape[0])

    def edge_names(self) -> list[str]:
        """Names of the real edges, e.g. ``"a0.h1->a3.h2<k>"``, in :meth:`edge_values` order."""
        return self.graph.edge_names()

    @shape_checked
    def edge_values(self, per_sample: bool = False) -> Float[Tensor, "... n_edges"]:
        """Scores of the real edges only: ``[n_edges]`` (mean) or ``[n_samples, n_edges]``."""
        mask = self.graph.edge_mask
        if not per_sample:
            return self.mean[mask]
        if self.per_sample is None:
            raise ArgumentError("these scores were computed with per_sample=False; rerun with per_sample=True.")
        return self.per_sample[:, mask]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest ``|mean score|``, as (name, mean score)."""
        values = self.edge_values()
        order = torch.argsort(values.abs(), descending=True)[:k]
        names = self.edge_names()
        return [(names[i], float(values[i])) for i in order.tolist()]

    def select_samples(self, sample_ids: "list[str] | tuple[str, ...]") -> "EdgeScores":
        """The scores of the samples named ``sample_ids``, in that order (``mean`` recomputed over them).

        Raises:
            ArgumentError: an id is not among :attr:`sample_ids`, or repeats; or these
                scores hold no per-sample values.
        """
        if self.per_sample is None:
            raise ArgumentError("select_samples needs per-sample scores; rerun with per_sample=True.")
        position = {sample: row for row, sample in enumerate(self.sample_ids)}  # type: ignore[arg-type]
        missing = [sample for sample in sample_ids if sample not in position]
        if missing:
            raise ArgumentError(f"select_samples: {len(missing)} sample id(s) not in these scores, e.g. "
                                f"{missing[:3]}; known ids e.g. {list(self.sample_ids[:3])}.")  # type: ignore[index]
        if len(set(sample_ids)) != len(sample_ids):
            raise ArgumentError("select_samples: sample ids repeat; name each sample once.")
        rows = torch.tensor([position[sample] for sample in sample_ids], dtype=torch.long)
        per_sample = self.per_sample[rows]
        return EdgeScores(graph=self.graph, mean=per_sample.double().mean(0).to(self.mean.dtype), per_sample=per_sample,
                          objective_values=self.objective_values[rows],
                          metadata={**self.metadata, "n_samples": len(sample_ids)}, sample_ids=tuple(sample_ids))

    def to_layer_level(self) -> "EdgeScores":
        """Sum head-level scores into the layer-level graph (exact coarsening)."""
        if self.graph.level == "layer":
            return self
        coarse = self.graph.layer_level()
        src, recv = self.graph.coarsening_index()

        def coarsen(matrix: Tensor) -> Tensor:
            rows = torch.zeros(*matrix.shape[:-2], coarse.n_sources, matrix.shape[-1], dtype=matrix.dtype)
            rows.index_add_(-2, src, matrix)
            out = torch.zeros(*matrix.shape[:-2], coarse.n_sources, coarse.n_receivers, dtype=matrix.dtype)
            return out.index_add_(-1, recv, rows)

        return EdgeScores(
            graph=coarse,
            mean=coarsen(self.mean),
            per_sample=None if self.per_sample is None else coarsen(self.per_sample),
            objective_values=self.objective_values.clone(),
            metadata={**self.metadata, "level": "layer", "coarsened_from": "head"},
            sample_ids=self.sample_ids,
        )

    @classmethod
    def concatenate(cls, parts: "list[EdgeScores]") -> "EdgeScores":
        """The scores of several runs on the same graph as one, samples in order.

        ``mean`` is the sample-weighted mean; ``per_sample`` is kept only if every part
        has it. Sample ids must not repeat across parts; parts whose ids are row positions
        are numbered again (all parts must be of that kind, or none). The metadata is the
        first part's, with ``n_samples``, every part's ``dropped`` samples and, as
        ``identity``, the parts' identity fingerprints (``{"parts": [...]}``).
        """
        if not parts:
            raise ArgumentError("concatenate needs at least one EdgeScores.")
        graph = parts[0].graph
        if any(p.graph != graph for p in parts):
            raise ArgumentError("concatenate needs scores on the same graph.")
        positional = [p.metadata.get("sample_ids") == "position" for p in parts]
        if any(positional) and not all(positional):
            raise ArgumentError("concatenate got parts with sample ids and parts named by row position; give every "
                                "part sample ids (make_batches(sample_ids=...)) so the samples stay distinct.")
        n = sum(p.n_samples for p in parts)
        mean = sum(p.mean.double() * p.n_samples for p in parts) / n
        per_sample = None if any(p.per_sample is None for p in parts) else torch.cat([p.per_sample for p in parts])
        metadata = {**parts[0].metadata, "n_samples": n, "dropped": [d for p in parts for d in p.metadata.get("dropped", [])],
                    "identity": {"parts": [p.metadata.get("identity", {}).get("fingerprint") for p in parts]}}
        return cls(graph=graph, mean=mean.to(parts[0].mean.dtype), per_sample=per_sample,
                   objective_values=torch.cat([p.objective_values for p in parts]), metadata=metadata,
                   sample_ids=None if all(positional) else tuple(i for p in parts for i in p.sample_ids))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write safetensors + JSON metadata (see :mod:`circuitdiff.io`); atomic."""
        write_scores_file(path, graph=self.graph, mean=self.mean, per_sample=self.per_sample,
                          objective_values=self.objective_values, metadata=self.metadata, sample_ids=self.sample_ids)

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> "EdgeScores":
        """Read a file written by :meth:`save`; verifies format version and checksum.

        ``mmap=True`` memory-maps the per-sample scores instead of reading them (for
        files larger than RAM; see :func:`circuitdiff.io.read_scores_file`). Files of
        format version 1 hold no sample ids; they load with positional ones.
        """
        return cls(**read_scores_file(path, mmap=mmap))

    # ------------------------------------------------------------ exports (circuitdiff.export)
    def to_pandas(self, per_sample: bool | None = None) -> pandas.DataFrame:
        """Long format, one row per (sample, edge): :func:`circuitdiff.export.to_pandas` (needs pandas)."""
        from circuitdiff.export import to_pandas

        return to_pandas(self, per_sample)

    def to_csv(self, path: str | os.PathLike[str], per_sample: bool | None = None) -> Path:
        """The rows of :meth:`to_pandas` as CSV, without pandas: :func:`circuitdiff.export.to_csv`."""
        from circuitdiff.export import to_csv

        return to_csv(self, path, per_sample)

    def to_networkx(self, circuit: Circuit | None = None) -> networkx.DiGraph:
        """A networkx DiGraph of the edges (all, or ``circuit``'s), mean scores as attributes:
        :func:`circuitdiff.export.to_networkx`."""
        from circuitdiff.export import to_networkx

        return to_networkx(self, circuit=circuit)

    def to_dot(self, circuit: Circuit | None = None, **style: Any) -> str:
        """Graphviz DOT text of the edges (all, or ``circuit``'s): :func:`circuitdiff.export.to_dot`."""
        from circuitdiff.export import to_dot

        return to_dot(self, circuit=circuit, **style)

    def to_eap_ig_json(self, path: str | os.PathLike[str], *, circuit: Circuit | None = None,
                       d_model: int | None = None) -> Path:
        """Write the mean scores as an EAP-IG / MIB graph JSON file: :func:`circuitdiff.export.to_eap_ig_json`."""
        from circuitdiff.export import to_eap_ig_json

        return to_eap_ig_json(self, path, circuit=circuit, d_model=d_model)

    @classmethod
    def from_eap_ig_json(cls, path: str | os.PathLike[str]) -> "EdgeScores":
        """The edge scores of an EAP-IG / MIB graph JSON file: :func:`circuitdiff.export.read_eap_ig_json`."""
        from circuitdiff.export import read_eap_ig_json

        return read_eap_ig_json(path)[0]

    def __repr__(self) -> str:
        kind = "per-sample" if self.per_sample is not None else "mean only"
        return (
            f"EdgeScores({self.metadata.get('method', '?')}, {self.metadata.get('intervention', '?')}, "
            f"{self.graph.level} level, {self.graph.n_edges} edges, {self.n_samples} samples, {kind})"
        )


def save_scores(scores: EdgeScores, path: str | os.PathLike[str]) -> None:
    """``scores.save(path)``: write the scores to a ``.cdiff`` file, atomically."""
    scores.save(path)


def load_scores(path: str | os.PathLike[str], mmap: bool = False) -> EdgeScores:
    """``EdgeScores.load(path, mmap)``: read a ``.cdiff`` file (see :meth:`EdgeScores.load`)."""
    return EdgeScores.load(path, mmap=mmap)
