"""docs/support.md's support table is the proof tests the suite collects, cell by cell.

Each cell of the table names the levels at which a family x scorer x intervention is
proven by a collected test (the test's parametrize id is ``[family-intervention-level]``);
``-`` where none is. The table is rebuilt here from ``pytest --collect-only`` and must
equal the one in the docs, so a "yes" cannot point to a test that does not exist, and a
new proof test shows up in the docs or fails this test. ``python tests/test_support_table.py``
prints the current table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tiny_models as tm

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "support.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
PROOF_FILES = ("tests/test_eap_correctness.py", "tests/test_scorers.py")
#: scorer row -> the proof test (what it proves is in docs/support.md), and what a cell says when the
#: test has no level parameter (None: it has one; "finest": the family's finest level, tm.finest_level).
PROOFS = {
    "EAP": ("test_eap_equals_directional_derivative", None),
    "exact": ("test_exact_equals_one_edge_at_a_time", None),
    "EAP-IG (inputs, activations)": ("test_eap_ig_completeness_approaches_exact_block_ablation", "finest"),
    "layer = coarsened head": ("test_layer_level_is_sum_of_head_level", "yes"),
}
FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM (Llama 3 rope scaling)",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM (QK-norm)",
            "neox": "GPTNeoXForCausalLM", "phi3": "Phi3ForCausalLM (fused qkv)",
            "qwen3_moe": "Qwen3MoeForCausalLM (MoE block as one MLP node)",
            "mixtral": "MixtralForCausalLM (MoE block as one MLP node)",
            "olmo2": "Olmo2ForCausalLM (post-norm)", "olmo3": "Olmo3ForCausalLM (post-norm, sliding windows)",
            "gemma2": "Gemma2ForCausalLM (pre- and post-norm, soft-capping, sliding windows)",
            "gemma3": "Gemma3ForCausalLM (pre- and post-norm, QK-norm, sliding windows)"}
INTERVENTIONS = ("zero", "patching", "mean", "mean-positional")


def collected_ids() -> set[str]:
    """Every proof test id the suite collects, e.g. ``test_eap_equals_directional_derivative[qwen3-zero-head]``."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *PROOF_FILES], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("::")[-1] for line in out.splitlines() if "::" in line}


def cell(ids: set[str], test: str, without_level: str | None, family: str, intervention: str) -> str:
    """What one cell says: the levels proven (``head, layer``), ``without_level`` for a test with no level
    parameter, or ``-`` where no collected test proves it."""
    if without_level is not None:
        if family in tm.LAYER_LEVEL_ONLY and test == "test_layer_level_is_sum_of_head_level":
            return "no head level"
        said = tm.finest_level(family) if without_level == "finest" else without_level
        return said if f"{test}[{family}-{intervention}]" in ids else "-"
    levels = [level for level in ("head", "layer") if f"{test}[{family}-{intervention}-{level}]" in ids]
    return ", ".join(levels) or "-"


def table(ids: set[str]) -> str:
    rows = []
    for family, label in FAMILIES.items():
        for scorer, (test, without_level) in PROOFS.items():
            cells = [cell(ids, test, without_level, family, intervention) for intervention in INTERVENTIONS]
            rows.append(f"| {label} | {scorer} | " + " | ".join(cells) + f" | `{test}` |")
    header = "| family | scorer / check | " + " | ".join(INTERVENTIONS) + " | test |"
    return "\n".join([header, "|" + "---|" * (len(INTERVENTIONS) + 3), *rows])


def test_the_support_table_is_the_collected_proof_tests():
    text = PAGE.read_text()
    documented = text[text.index(START) + len(START):text.index(END)].strip()
    assert documented == table(collected_ids()), (
        "docs/support.md's support table differs from the proof tests the suite collects; print the current one "
        "with `python tests/test_support_table.py` and paste it between the markers.")


def test_every_validated_family_has_a_row_and_a_tiny_checkpoint():
    from circuitdiff.engine.architectures import FAMILIES as VALIDATED

    assert set(FAMILIES) == set(tm.ARCHITECTURES)
    assert {re.sub(r" \(.*", "", label) for label in FAMILIES.values()} == set(VALIDATED)


if __name__ == "__main__":
    print(table(collected_ids()))
