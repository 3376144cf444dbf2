"""Hand edge scores and circuits to other tools: EAP-IG / MIB graph JSON, pandas, CSV, networkx, Graphviz.

Every export reads :class:`~circuitdiff.scores.EdgeScores` (and optionally a
:class:`~circuitdiff.circuits.Circuit`) and writes the circuitdiff sign unchanged: a
score estimates ``objective(edge ablated) - objective(clean)`` with the objective
oriented as a loss, so **positive means the edge helps**. EAP-IG computes the same
difference of its metric; with a loss-oriented metric (``loss=True``, as in EAP-IG's
examples and MIB) the signs agree. See ``docs/export.md``.

- :func:`to_eap_ig_json` / :func:`read_eap_ig_json`: the graph JSON of EAP-IG's
  ``Graph.to_json`` / ``Graph.from_json``, the format MIB's circuit track reads. Head
  level only, without grouped-query attention (EAP-IG has neither layer-level nodes nor
  shared key/value inputs).
- :func:`to_pandas` / :func:`to_csv`: long format, one row per (sample, edge), columns
  :data:`COLUMNS`. pandas is optional; the CSV needs only the standard library.
- :func:`to_networkx`: a ``networkx.DiGraph`` of the drawn nodes and edges.
- :func:`to_dot` / :func:`render_dot`: Graphviz DOT text, colour by sign and width by
  ``|score|``; rendering needs Graphviz's ``dot`` program.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from circuitdiff.choices import Level, ReceiverKind
from circuitdiff.circuit_nodes import receiver_owners
from circuitdiff.circuits import Circuit
from circuitdiff.errors import (
    ArgumentError,
    ArgumentTypeError,
    FileFormatError,
    MissingDependencyError,
    MissingPathError,
    NonFiniteError,
)
from circuitdiff.graph import AttributionGraph
from circuitdiff.io import write_atomically
from circuitdiff.scores import EdgeScores

if TYPE_CHECKING:
    import networkx
    import pandas

__all__ = ["COLUMNS", "COLORS", "to_eap_ig_json", "read_eap_ig_json", "to_pandas", "to_csv", "to_networkx", "to_dot",
           "render_dot"]

#: Columns of :func:`to_pandas` and :func:`to_csv`, in order.
COLUMNS: tuple[str, ...] = ("sample_id", "edge", "source", "receiver", "source_kind", "source_layer", "receiver_kind",
                            "receiver_layer", "score")
#: DOT edge colours: score > 0 (the edge helps), score < 0 (it hurts), zero or no score.
COLORS: dict[str, str] = {"positive": "#2166ac", "negative": "#b2182b", "neutral": "#808080"}

# The cfg keys EAP-IG's Graph.from_model reads (a HookedTransformer's graph writes exactly these).
_EAP_IG_CFG = ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")
_EAP_IG_SIGN = ("as in the file: EAP-IG writes metric(ablated) - metric(clean); "
                "positive = helps when the metric is a loss")


def _check_scores(scores: object, caller: str) -> EdgeScores:
    if not isinstance(scores, EdgeScores):
        raise ArgumentTypeError(f"{caller} needs an EdgeScores, got {type(scores).__name__}.")
    return scores


# ---------------------------------------------------------------------- EAP-IG / MIB graph JSON
def _check_eap_ig_graph(graph: AttributionGraph) -> None:
    """Refuse graphs that EAP-IG's Graph cannot hold: layer level, grouped-query attention."""
    if graph.level != Level.HEAD:
        raise ArgumentError(
            "EAP-IG graphs have one node per attention head and no layer-level nodes, so a layer-level graph "
            "cannot be exported; attribute with level='head' and export those scores.")
    if graph.n_kv_heads != graph.n_heads:
        raise ArgumentError(
            f"EAP-IG graphs have key and value inputs per query head (TransformerLens' ungrouped attention); this "
            f"graph has {graph.n_kv_heads} key/value heads for {graph.n_heads} query heads, whose shared key/value "
            "scores cannot be split per query head. Only models without grouped-query attention can be exported.")


def _d_model(scores: EdgeScores, d_model: int | None) -> int:
    """``d_model``, else ``scores.metadata["d_model"]`` (set by :func:`read_eap_ig_json`), checked."""
    d_model = scores.metadata.get("d_model") if d_model is None else d_model
    if d_model is None:
        raise ArgumentError("EAP-IG's graph cfg needs the model's hidden size: pass d_model=model.cfg.d_model.")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ArgumentError(f"d_model must be a positive int (the model's hidden size), got {d_model!r}.")
    return d_model


def _eap_ig_nodes(graph: AttributionGraph, edges: torch.Tensor | None) -> dict[str, dict[str, bool]]:
    """EAP-IG's ``nodes``: a source is in the graph if it has an outgoing edge and is ``input`` or has an
    incoming edge (EAP-IG's rule after ``apply_topn``); ``logits`` always is. No circuit: only ``logits``."""
    in_graph = [False] * graph.n_sources
    if edges is not None:
        fed = torch.zeros(graph.n_sources, dtype=torch.bool)
        fed[0] = True
        for column, rows in enumerate(receiver_owners(graph)):
            if rows and edges[:, column].any():
                fed[list(rows)] = True
        in_graph = (edges.any(dim=1) & fed).tolist()
    nodes = {name: {"in_graph": bool(flag)} for name, flag in zip(graph.sources, in_graph, strict=True)}
    nodes["logits"] = {"in_graph": True}
    return nodes


def to_eap_ig_json(scores: EdgeScores, path: str | os.PathLike[str], *, circuit: Circuit | None = None,
                   d_model: int | None = None) -> Path:
    """Write ``scores.mean`` as an EAP-IG graph JSON file (what ``Graph.from_json`` and MIB read).

    The file holds ``cfg`` (``n_layers``, ``n_heads``, ``parallel_attn_mlp``, ``d_model``),
    ``nodes`` (``{name: {"in_graph"}}`` for ``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``)
    and ``edges`` (``{"a0.h1->a2.h0<k>": {"score", "in_graph"}}``, every real edge). Scores
    are the mean scores, sign unchanged (positive = the edge helps; see ``docs/export.md``),
    written as JSON numbers that read back to the same float32.

    Args:
        scores: head-level scores of a model without grouped-query attention.
        path: the ``.json`` file to write (atomically).
        circuit: marks its edges ``in_graph`` (nodes follow EAP-IG's rule: an outgoing edge
            and an incoming one, or ``input``). Without it no edge is in the graph.
        d_model: the model's hidden size (``model.cfg.d_model``), which EAP-IG's cfg needs;
            default ``scores.metadata["d_model"]`` (set on scores read from such a file).

    Raises:
        ArgumentError: a layer-level or grouped-query graph, a circuit of another graph,
            or no ``d_model``.
        NonFiniteError: a score is NaN or infinite (JSON has no such numbers).
    """
    scores = _check_scores(scores, "to_eap_ig_json")
    graph = scores.graph
    _check_eap_ig_graph(graph)
    d_model = _d_model(scores, d_model)
    if circuit is not None and circuit.graph != graph:
        raise ArgumentError(f"the circuit belongs to another graph ({circuit.graph!r}) than the scores ({graph!r}).")
    mask = graph.edge_mask
    values = scores.mean.detach().to("cpu", torch.float32)[mask]
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"{int((~torch.isfinite(values)).sum())} edge score(s) are NaN or infinite; JSON cannot "
                             "hold them. Replace them (e.g. torch.nan_to_num) before exporting.")
    members = circuit.edges[mask] if circuit is not None else torch.zeros(values.shape[0], dtype=torch.bool)
    document = {
        "cfg": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel_blocks,
                "d_model": d_model},
        "nodes": _eap_ig_nodes(graph, None if circuit is None else circuit.edges),
        "edges": {name: {"score": value, "in_graph": member} for name, value, member
                  in zip(graph.edge_names(), values.tolist(), members.tolist(), strict=True)},
    }
    path = Path(path)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(document), encoding="utf-8"))
    return path


def _eap_ig_document(path: Path) -> dict[str, Any]:
    """The parsed file, after checking its top-level keys and cfg."""
    if not path.is_file():
        raise MissingPathError(f"no EAP-IG graph file at {path}.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path} is not a JSON file ({error}).") from None
    if not isinstance(document, dict) or not all(isinstance(document.get(k), dict) for k in ("cfg", "nodes", "edges")):
        raise FileFormatError(f"{path} is not an EAP-IG graph file: expected an object with objects 'cfg', 'nodes' "
                              "and 'edges' (as EAP-IG's Graph.to_json writes).")
    cfg = document["cfg"]
    missing = [key for key in _EAP_IG_CFG if key not in cfg]
    if missing:
        raise FileFormatError(f"{path}: cfg lacks {missing}; EAP-IG's graph cfg has {list(_EAP_IG_CFG)}.")
    unsupported = sorted({key for node in document["nodes"].values() if isinstance(node, dict)
                          for key in node if key in ("score", "neurons", "neurons_scores")})
    if unsupported:
        raise FileFormatError(f"{path} holds node or neuron data ({unsupported}): a node- or neuron-level graph. "
                              "circuitdiff reads edge-level graphs only.")
    return document


def read_eap_ig_json(path: str | os.PathLike[str]) -> tuple[EdgeScores, Circuit]:
    """Read an EAP-IG graph JSON file (EAP-IG's ``Graph.to_json``, an MIB circuit file).

    Returns ``(scores, circuit)`` on the head-level graph the file's ``cfg`` describes:
    ``scores.mean`` holds each edge's ``score`` (sign as in the file; 0 for edges the file
    leaves out or writes without a score), ``per_sample`` is None and ``objective_values``
    is one NaN (the file records neither samples nor objective values);
    ``scores.metadata`` has ``d_model`` and the file name. ``circuit`` holds the edges
    marked ``in_graph``; the file's node flags are not read (they follow from the edges).

    Raises:
        MissingPathError: no file at ``path``.
        FileFormatError: not JSON, keys or cfg missing, node or neuron data, or an edge name
            that is not an edge of the graph.
    """
    path = Path(path)
    document = _eap_ig_document(path)
    cfg = document["cfg"]
    try:
        graph = AttributionGraph(cfg["n_layers"], cfg["n_heads"], parallel_blocks=bool(cfg["parallel_attn_mlp"]))
    except (ArgumentError, TypeError) as error:
        raise FileFormatError(f"{path}: cfg {cfg} describes no graph ({error}).") from None
    position = {name: i for i, name in enumerate(graph.edge_names())}
    values = torch.zeros(len(position), dtype=torch.float32)
    members = torch.zeros(len(position), dtype=torch.bool)
    for name, info in document["edges"].items():
        score = info.get("score", 0.0) if isinstance(info, dict) else None
        if name not in position or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise FileFormatError(f"{path}: edge {name!r} with {info!r} is not an edge of {graph!r} with a numeric "
                                  "score; edge names look like 'a0.h1->a2.h0<k>'.")
        values[position[name]] = score
        members[position[name]] = bool(info.get("in_graph", False))
    mask = graph.edge_mask
    mean = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.float32)
    mean[mask] = values
    edges = torch.zeros_like(mask)
    edges[mask] = members
    metadata = {"level": "head", "d_model": cfg["d_model"], "imported_from": f"EAP-IG graph JSON {path.name}",
                "sign": _EAP_IG_SIGN}
    scores = EdgeScores(graph, mean=mean, per_sample=None, objective_values=torch.full((1,), math.nan),
                        metadata=metadata)
    return scores, Circuit(graph, edges)


# ---------------------------------------------------------------------- long format: pandas, CSV
def _edge_columns(graph: AttributionGraph) -> dict[str, list[Any]]:
    """The edge-describing columns of :data:`COLUMNS`, one entry per real edge in ``graph.edge_names()`` order."""
    rows, cols = (index.tolist() for index in torch.nonzero(graph.edge_mask, as_tuple=True))
    return {
        "edge": [f"{graph.sources[r]}->{graph.receivers[c]}" for r, c in zip(rows, cols, strict=True)],
        "source": [graph.sources[r] for r in rows],
        "receiver": [graph.receivers[c] for c in cols],
        "source_kind": [graph.source_kinds[r].value for r in rows],
        "source_layer": [graph.source_layers[r] for r in rows],
        "receiver_kind": [graph.receiver_kinds[c].value for c in cols],
        "receiver_layer": [graph.receiver_layers[c] for c in cols],
    }


def _long_values(scores: EdgeScores, per_sample: bool | None) -> tuple[list[str | None], np.ndarray]:
    """(sample id of each block of rows, None for the mean; scores ``[n_blocks, n_edges]``)."""
    if per_sample is None:
        per_sample = scores.per_sample is not None
    if per_sample:
        values = scores.edge_values(per_sample=True).detach().cpu().numpy()
        return list(scores.sample_ids), values  # type: ignore[arg-type]
    return [None], scores.edge_values().detach().cpu().numpy()[None]


def to_pandas(scores: EdgeScores, per_sample: bool | None = None) -> pandas.DataFrame:
    """The scores in long format: a ``pandas.DataFrame`` with columns :data:`COLUMNS`.

    One row per (sample, real edge), samples in row order and edges in
    ``graph.edge_names()`` order; ``score`` keeps the scores' dtype and sign (positive =
    the edge helps). ``source_kind`` is input/attn/mlp, ``receiver_kind`` q/k/v/mlp/logits;
    ``source_layer`` is -1 for ``input``, ``receiver_layer`` is ``n_layers`` for ``logits``.
    With ``per_sample=False`` (the default when the scores hold no per-sample values) one
    row per edge holds the mean score and ``sample_id`` is None.

    Raises:
        MissingDependencyError: pandas is not installed (``pip install pandas``; or use
            :func:`to_csv`, which needs no pandas).
        ArgumentError: ``per_sample=True`` on scores without per-sample values.
    """
    pd = MissingDependencyError.importing("pandas", "to_pandas", 'pip install pandas (or "circuitdiff[export]")')
    scores = _check_scores(scores, "to_pandas")
    ids, values = _long_values(scores, per_sample)
    n_blocks, n_edges = values.shape
    frame: dict[str, Any] = {"sample_id": np.repeat(np.array(ids, dtype=object), n_edges)}
    frame.update({name: np.tile(np.asarray(column), n_blocks) for name, column in _edge_columns(scores.graph).items()})
    frame["score"] = values.reshape(-1)
    return pd.DataFrame(frame, columns=list(COLUMNS))


def to_csv(scores: EdgeScores, path: str | os.PathLike[str], per_sample: bool | None = None) -> Path:
    """Write the rows of :func:`to_pandas` as a CSV file (header :data:`COLUMNS`), without pandas.

    Scores are written in the shortest form that reads back to the same float32 value;
    mean rows have an empty ``sample_id``. Written atomically; returns the path.
    """
    scores = _check_scores(scores, "to_csv")
    ids, values = _long_values(scores, per_sample)
    edges = list(zip(*_edge_columns(scores.graph).values(), strict=True))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for sample, row in zip(ids, values, strict=True):
                writer.writerows((sample or "", *edge, str(value)) for edge, value in zip(edges, row, strict=True))

    path = Path(path)
    write_atomically(path, write)
    return path


# ---------------------------------------------------------------------- networkx, DOT
class _Node(NamedTuple):
    name: str
    kind: str
    layer: int


class _Edge(NamedTuple):
    source: str
    target: str
    score: float | None
    internal: bool


def _network(scores: EdgeScores | None, circuit: Circuit | None) -> tuple[list[_Node], list[_Edge]]:
    """Nodes and edges to draw: the real edges (of ``circuit`` if given; mean scores if ``scores``), their
    sources and receivers, and an internal edge from each attention receiver to each head that reads it."""
    if scores is None and circuit is None:
        raise ArgumentError("give edge scores, a circuit, or both.")
    if scores is not None:
        _check_scores(scores, "to_networkx / to_dot")
    if circuit is not None and not isinstance(circuit, Circuit):
        raise ArgumentTypeError(f"circuit must be a Circuit, got {type(circuit).__name__}.")
    graph = circuit.graph if scores is None else scores.graph  # type: ignore[union-attr]
    if scores is not None and circuit is not None and circuit.graph != graph:
        raise ArgumentError(f"the circuit belongs to another graph ({circuit.graph!r}) than the scores ({graph!r}).")
    mean = None if scores is None else scores.mean.detach().to("cpu", torch.float64)
    keep = graph.edge_mask if circuit is None else circuit.edges
    rows, cols = (index.tolist() for index in torch.nonzero(keep, as_tuple=True))
    edges = [_Edge(graph.sources[r], graph.receivers[c], None if mean is None else float(mean[r, c]), False)
             for r, c in zip(rows, cols, strict=True)]
    owners = receiver_owners(graph)
    attention = (ReceiverKind.Q, ReceiverKind.K, ReceiverKind.V)
    used = sorted({c for c in cols if graph.receiver_kinds[c] in attention})
    edges += [_Edge(graph.receivers[c], graph.sources[r], None, True) for c in used for r in owners[c]]
    named = {e.source for e in edges} | {e.target for e in edges}
    # computation order: input; per layer its attention receivers, heads, MLP; logits
    candidates = [(name, kind.value, layer, 1 if kind != "mlp" else 2)
                  for name, kind, layer in zip(graph.sources, graph.source_kinds, graph.source_layers, strict=True)]
    candidates += [(name, kind.value, layer, 0)
                   for name, kind, layer in zip(graph.receivers, graph.receiver_kinds, graph.receiver_layers,
                                                strict=True)
                   if kind != ReceiverKind.MLP]
    candidates.sort(key=lambda c: (c[2], c[3]))
    return [_Node(name, kind, layer) for name, kind, layer, _ in candidates if name in named], edges


def to_networkx(scores: EdgeScores | None = None, *, circuit: Circuit | None = None) -> networkx.DiGraph:
    """A ``networkx.DiGraph`` of the real edges (all, or ``circuit``'s) and their nodes.

    Nodes are named as in circuitdiff: sources (``input``, ``a{l}.h{h}``, ``m{l}``), the
    attention receivers (``a{l}.h{h}<q>``, ...; an MLP's receiver is its node ``m{l}``)
    and ``logits``; attributes ``kind`` (input, attn, mlp, q, k, v, logits) and ``layer``.
    Each real edge ``source -> receiver`` has ``internal=False`` and, when ``scores`` are
    given, ``score`` (the mean score; positive = the edge helps). Each attention receiver
    in use also gets an edge to each head that reads it (several with grouped-query
    attention) with ``internal=True`` and no score, so paths run from ``input`` to ``logits``.

    Raises:
        MissingDependencyError: networkx is not installed (``pip install networkx``).
        ArgumentError: neither scores nor circuit, or a circuit of another graph.
    """
    nx = MissingDependencyError.importing("networkx", "to_networkx", 'pip install networkx (or "circuitdiff[export]")')
    nodes, edges = _network(scores, circuit)
    network = nx.DiGraph()
    network.add_nodes_from((node.name, {"kind": node.kind, "layer": node.layer}) for node in nodes)
    for edge in edges:
        attributes: dict[str, Any] = {"internal": edge.internal}
        if edge.score is not None:
            attributes["score"] = edge.score
        network.add_edge(edge.source, edge.target, **attributes)
    return network


def to_dot(scores: EdgeScores | None = None, *, circuit: Circuit | None = None, min_width: float = 0.5,
           max_width: float = 5.0, name: str = "circuit") -> str:
    """Graphviz DOT text of the real edges (all, or ``circuit``'s) with the nodes of :func:`to_networkx`.

    A real edge's colour is its sign (:data:`COLORS`: blue > 0, the edge helps; red < 0;
    grey for 0 or no scores) and its ``penwidth`` grows linearly with ``|mean score|`` from
    ``min_width`` (0) to ``max_width`` (the largest drawn ``|score|``); its ``tooltip``
    holds name and score. Internal edges (receiver to head) are thin, dashed and grey.
    Inputs are at the bottom, logits at the top. Needs no Graphviz; see :func:`render_dot`.

    Raises:
        ArgumentError: neither scores nor circuit, a circuit of another graph, or widths
            with ``0 < min_width <= max_width`` violated.
        NonFiniteError: a drawn score is NaN or infinite.
    """
    if not 0 < min_width <= max_width:
        raise ArgumentError(f"need 0 < min_width <= max_width, got min_width={min_width}, max_width={max_width}.")
    nodes, edges = _network(scores, circuit)
    drawn = [abs(e.score) for e in edges if e.score is not None]
    if not all(math.isfinite(s) for s in drawn):
        raise NonFiniteError("some drawn edge scores are NaN or infinite; replace them before drawing.")
    largest = max(drawn, default=0.0)
    lines = [f'digraph "{name}" {{', "  rankdir=BT;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f2f2f2", fontname="Helvetica"];']
    for node in nodes:
        receiver = node.kind in ("q", "k", "v")
        lines.append(f'  "{node.name}"' + (' [shape=ellipse, style="", fontsize=9];' if receiver else ";"))
    for edge in edges:
        if edge.internal:
            lines.append(f'  "{edge.source}" -> "{edge.target}" [style=dashed, color="{COLORS["neutral"]}", '
                         "penwidth=0.5, arrowsize=0.5];")
            continue
        score = edge.score or 0.0
        color = COLORS["positive"] if score > 0 else COLORS["negative"] if score < 0 else COLORS["neutral"]
        width = min_width + (max_width - min_width) * abs(score) / largest if largest > 0 else min_width
        tooltip = f"{edge.source}->{edge.target}" + ("" if edge.score is None else f": {edge.score:+.4g}")
        lines.append(f'  "{edge.source}" -> "{edge.target}" [color="{color}", penwidth={width:.3f}, '
                     f'tooltip="{tooltip}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, path: str | os.PathLike[str], *, format: str | None = None) -> Path:
    """Render DOT text (from :func:`to_dot`) to ``path`` with Graphviz's ``dot`` program.

    ``format`` (``png``, ``svg``, ``pdf``, ...) defaults to the file's suffix. Written
    atomically; returns the path.

    Raises:
        MissingDependencyError: no ``dot`` program on PATH (install Graphviz, e.g.
            ``apt-get install graphviz``, ``brew install graphviz`` or ``conda install graphviz``).
        ArgumentError: no format and no suffix, or ``dot`` failed (its message is included).
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".")
    if not format:
        raise ArgumentError(f"cannot tell the image format of {path}: give it a suffix (.png, .svg) or format='png'.")
    program = shutil.which("dot")
    if program is None:
        raise MissingDependencyError(
            "render_dot needs Graphviz's `dot` program, which is not on PATH: install Graphviz (apt-get install "
            "graphviz, brew install graphviz or conda install graphviz), or save to_dot(...)'s text and render it "
            "elsewhere.")

    def write(tmp: Path) -> None:
        done = subprocess.run([program, f"-T{format}", "-o", str(tmp)], input=dot, text=True, capture_output=True)
        if done.returncode != 0:
            raise ArgumentError(f"Graphviz's dot failed to render {path.name} as {format}: {done.stderr.strip()}")

    write_atomically(path, write)
    return path
