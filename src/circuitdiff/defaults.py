"""Default numbers the library and the command line share, in a module that imports nothing
heavy, so that ``circuitdiff --help`` can show them without loading torch."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DEFAULT_SAMPLES", "EXACT_EDGE_LIMIT"]

#: Paired samples re-scored with the reference scorer by the robustness check, by default.
DEFAULT_SAMPLES = 16
#: At head level, exact ablation is the robustness reference up to this many edges (one
#: forward pass per edge and sample); above it EAP-IG is, for an EAP comparison.
EXACT_EDGE_LIMIT = 20_000
#: Generation length limit of a pipeline run, unless a model pair (``--pair``) or the caller sets one.
DEFAULT_MAX_NEW_TOKENS = 512
