"""Which samples of two score sets :func:`circuitdiff.compare` puts side by side.

Samples are paired by sample id, never by position (see ``tests/test_pairing.py``), and
two score sets are compared only when their edges correspond and they were scored the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitdiff.errors import DataError
from circuitdiff.scores import EdgeScores

__all__ = ["Pairing", "pair", "check_same_settings", "common_graph"]


@dataclass(frozen=True)
class Pairing:
    """Which samples of each side a comparison uses, in which order, and which it leaves out.

    Attributes:
        paired: whether the samples are paired (paired tests and bootstrap).
        rows: per side, the row indices into its scores (None: all, in order).
        ids: ``{"paired": ids}`` when paired, else ``{"base": ids, "tuned": ids}``.
        n: per side, the number of samples used.
        dropped: every sample left out: ``{"side", "id", "reason"}``.
        description: how the samples were paired, for the report.
    """

    paired: bool
    rows: dict[str, Tensor | None]
    ids: dict[str, list[str]]
    n: dict[str, int]
    dropped: list[dict[str, Any]]
    description: str


def pair(base: EdgeScores, tuned: EdgeScores, paired: bool) -> Pairing:
    """Pair the samples by id (``paired``), or take every sample of both sides.

    Raises:
        DataError: ``paired`` and the sides share fewer than 2 ids, or carry no ids and
            differ in size.
    """
    sides = {"base": base, "tuned": tuned}
    dropped = [{"side": side, "id": d.get("id"), "reason": "non-finite scores, dropped before scoring"}
               for side, scores in sides.items() for d in scores.metadata.get("dropped", [])]
    positional = [side for side, scores in sides.items() if scores.metadata.get("sample_ids", "position") == "position"]
    if not paired:
        return Pairing(False, {"base": None, "tuned": None}, {s: list(x.sample_ids) for s, x in sides.items()},
                       {s: x.n_samples for s, x in sides.items()}, dropped, "unpaired")
    if positional and base.n_samples != tuned.n_samples:
        raise DataError(
            f"the {' and '.join(positional)} scores carry no sample ids (their ids are row positions) and the sides "
            f"have {base.n_samples} and {tuned.n_samples} samples, so their samples cannot be matched. Pass "
            "paired=False (command line: --unpaired) if they score different prompts, or rescore with sample ids "
            "(make_batches(sample_ids=...))."
        )
    in_tuned = {sample: row for row, sample in enumerate(tuned.sample_ids)}
    common = [sample for sample in base.sample_ids if sample in in_tuned]
    if not common:
        raise DataError(
            f"base and tuned share no sample id (base e.g. {list(base.sample_ids[:3])}, tuned e.g. "
            f"{list(tuned.sample_ids[:3])}), so no sample can be paired. If they score different prompts, pass "
            "paired=False (command line: --unpaired); if they score the same prompts, give both runs the same "
            "sample_ids (make_batches(sample_ids=...))."
        )
    if len(common) < 2:
        raise DataError(f"base and tuned share only the sample id {common[0]!r}; a paired comparison needs at least "
                        "2 common samples (diversity compares samples).")
    in_base = {sample: row for row, sample in enumerate(base.sample_ids)}
    shared = set(common)
    for side, other, scores in (("base", "tuned", base), ("tuned", "base", tuned)):
        dropped += [{"side": side, "id": sample, "reason": f"no sample with this id in {other}"}
                    for sample in scores.sample_ids if sample not in shared]
    rows = {}
    for side, index in (("base", in_base), ("tuned", in_tuned)):
        order = torch.tensor([index[sample] for sample in common], dtype=torch.long)
        rows[side] = None if torch.equal(order, torch.arange(sides[side].n_samples)) else order
    how = f"paired by sample id: {len(common)} pairs"
    if positional:
        how += (f"; the {' and '.join(positional)} ids are sample positions (batches without sample_ids), so this "
                "pairs by position")
    return Pairing(True, rows, {"paired": common}, {"base": len(common), "tuned": len(common)}, dropped, how)


def check_same_settings(base: EdgeScores, tuned: EdgeScores) -> None:
    """Refuse scores made with different scorers, interventions or objectives (they do not compare edge by edge)."""
    for key, what in (("method", "scorer"), ("intervention", "intervention"), ("objective", "objective")):
        b, t = base.metadata.get(key), tuned.metadata.get(key)
        if b is not None and t is not None and b != t:
            raise DataError(
                f"base was scored with {what} {b!r} and tuned with {t!r}; scores of different {what}s do not "
                "compare edge by edge. Score both models the same way (cd.agreement compares two scorers on "
                "one model)."
            )


def common_graph(base: EdgeScores, tuned: EdgeScores, coarsen: bool) -> tuple[EdgeScores, EdgeScores]:
    """The two score sets on one graph: as they are, or (``coarsen``) both at layer level.

    Raises:
        DataError: the graphs differ and ``coarsen`` is False, or they differ even at layer level.
    """
    if base.graph == tuned.graph:
        return base, tuned
    b, t = base.to_layer_level(), tuned.to_layer_level()
    if coarsen and b.graph == t.graph:
        return b, t
    describe = lambda g: f"{g.level} level, {g.n_layers} layers, {g.n_heads} heads, {g.n_kv_heads} kv heads"  # noqa: E731
    if b.graph == t.graph:
        raise DataError(f"the two scores are on different graphs (base: {describe(base.graph)}; tuned: "
                        f"{describe(tuned.graph)}), so their edges do not correspond. Pass coarsen=True to compare "
                        "the common layer-level coarsening (exact sums of head-level scores).")
    raise DataError(f"the two scores are on graphs with different edge sets even at layer level (base: "
                    f"{describe(base.graph)}; tuned: {describe(tuned.graph)}): different architectures cannot "
                    "be compared edge by edge.")
