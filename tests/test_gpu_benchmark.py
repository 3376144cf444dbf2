"""benchmarks/gpu_7b.py: its --tiny mode runs the GPU benchmark's code path on CPU.

The 7B run has one chance on a borrowed GPU, so every cell, the JSON and the
out-of-memory path are exercised here on tiny shapes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_7b.py"
MODELS = ("tiny-llama", "tiny-qwen2")
LEVELS = ("layer", "head")
TOKENS = (16, 32)


def run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu_7b.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def cells_by_key(report: dict) -> dict[tuple[str, str, int], dict]:
    """The float32-contraction cells (the default) by (model, level, tokens)."""
    return {(c["model"], c["level"], c["tokens"]): c for c in report["cells"] if c["contraction_dtype"] == "float32"}


@pytest.mark.slow
def test_tiny_run_reports_every_cell_with_positive_numbers(tmp_path):
    report, stdout = run(tmp_path)
    cells = cells_by_key(report)
    assert set(cells) == {(m, level, t) for m in MODELS for level in LEVELS for t in TOKENS}
    assert len(report["cells"]) == len(cells)
    for key, cell in cells.items():
        for kind, fields in (("eap", ("seconds", "tokens_per_s", "peak_bytes")),
                             ("plain", ("seconds", "peak_bytes")),
                             ("tl_flags", ("seconds", "peak_bytes"))):
            assert isinstance(cell[kind], dict), (key, kind, cell[kind])
            for field in fields:
                assert positive(cell[kind][field]), (key, kind, field, cell[kind][field])
        assert positive(cell["ratio"]), (key, cell["ratio"])
        assert math.isclose(cell["eap"]["tokens_per_s"], cell["tokens"] / cell["eap"]["seconds"])
        # The peak includes the weights, so every pass peaks above them.
        weights = report["models"][cell["model"]]["weight_bytes"]
        assert min(cell[kind]["peak_bytes"] for kind in ("eap", "plain", "tl_flags")) > weights
        # the planner's estimate sits near the measured peak (within 30% on these tiny models)
        assert abs(cell["estimate_bytes"] / cell["eap"]["peak_bytes"] - 1) < 0.3, key
        # TransformerLens's flag path computes the same zero-ablation EAP scores (float32).
        assert 0 <= cell["rel_diff"] < 1e-4, (key, cell["rel_diff"])
    assert report["models"]["tiny-qwen2"]["architecture"] == "Qwen2ForCausalLM"
    assert report["environment"]["dtype"] == "float32"
    table = [line for line in stdout.splitlines() if line.startswith("| tiny-")]
    assert len(table) == len(cells)


@pytest.mark.slow
def test_position_windows_agree_with_transformerlens(tmp_path):
    """--positions-per-pass 5: three windows of 16 tokens, still TL's scores; the buffer shrinks to 5 positions."""
    report, _ = run(tmp_path, "--models", "tiny-qwen2", "--seq", "16", "--repeats", "1", "--positions-per-pass", "5")
    assert report["environment"]["positions_per_pass"] == 5
    for cell in report["cells"]:
        assert 0 <= cell["rel_diff"] < 1e-4, (cell["level"], cell["rel_diff"])
        assert cell["eap_buffer_bytes"] == cell["n_sources"] * 5 * 64 * 4  # d_model 64, float32


@pytest.mark.slow
def test_long_sequence_options_as_run_gpu_7b_sh_passes_them(tmp_path):
    """The long-sequence runs' options (run_gpu_7b.sh): recorded per cell, no plain pass, planner beside the peak."""
    report, stdout = run(tmp_path, "--models", "tiny-llama", "--seq", "32", "--repeats", "1", "--skip-plain",
                         "--skip-tl", "--fused-attention", "--checkpoint-blocks", "--positions-per-chunk", "8",
                         "--positions-per-pass", "16", "--contraction-dtype", "bfloat16")
    assert {c["level"] for c in report["cells"]} == set(LEVELS)
    for cell in report["cells"]:
        assert cell["options"] == {"positions_per_pass": 16, "contraction_dtype": "bfloat16",
                                   "checkpoint_blocks": True, "positions_per_chunk": 8, "fused_attention": True}
        assert cell["plain"] == "skipped" and cell["ratio"] is None and positive(cell["eap"]["peak_bytes"])
        assert math.isclose(cell["estimate_error"], cell["estimate_bytes"] / cell["eap"]["peak_bytes"] - 1)
        assert abs(cell["estimate_error"]) < 0.3, cell["estimate_error"]
    assert "| skipped |" in stdout


@pytest.mark.slow
def test_both_contraction_dtypes_side_by_side_and_profile(tmp_path):
    """--contraction-dtype float32 bfloat16: each EAP cell twice, against one plain pass.

    Against TL's float32 flags path: float32 to 1e-4, bfloat16 within 1% (measured
    0.2-0.5%). --profile: EAP's labelled work shows up in the EAP passes, none of it in the
    plain pass.
    """
    report, stdout = run(tmp_path, "--models", "tiny-llama", "--seq", "16", "--repeats", "1",
                         "--contraction-dtype", "float32", "bfloat16", "--profile")
    assert report["environment"]["contraction_dtypes"] == ["float32", "bfloat16"]
    cells = {(c["level"], c["contraction_dtype"]): c for c in report["cells"]}
    assert set(cells) == {(level, dtype) for level in LEVELS for dtype in ("float32", "bfloat16")}
    rows = [line for line in stdout.splitlines() if line.startswith("| tiny-llama | head | 16 |")]
    assert len(rows) == 2 and "| float32 |" in rows[0] and "| bfloat16 |" in rows[1]
    for (level, dtype), cell in cells.items():
        assert cell["plain"] == cells[level, "float32"]["plain"]  # one plain pass for both
        if dtype == "bfloat16":
            assert 1e-5 < cell["rel_diff"] < 1e-2, (level, cell["rel_diff"])
            assert cell["eap_buffer_bytes"] == cell["n_sources"] * 16 * 64 * 2  # d_model 64, bfloat16
        else:
            assert 0 <= cell["rel_diff"] < 1e-4, (level, cell["rel_diff"])
        eap, plain = cell["profile"]["eap"], cell["profile"]["plain"]
        assert set(eap["labels"]) == {"circuitdiff.head_outputs", "circuitdiff.receiver_gradients",
                                      "circuitdiff.contract"}
        # layer level records the attention output the model computed: no head outputs to form
        labelled = [label for label in eap["labels"] if level == "head" or label != "circuitdiff.head_outputs"]
        assert all(eap["labels"][label] > 0 for label in labelled) and not any(plain["labels"].values())
        assert level == "head" or eap["labels"]["circuitdiff.head_outputs"] == 0
        assert 0 < sum(eap["labels"].values()) < eap["seconds"]
        assert eap["top"] and all(op["seconds"] >= 0 and op["calls"] > 0 for op in eap["top"])
        assert eap["top_kernels"] == []  # CUDA kernels only
        # tiny-llama: 2 layers, 4 heads and 4 kv heads, d_model 64, 16 tokens. Receivers x the sources
        # before them: attention 0 (12 q/k/v heads, or 3) and MLP 0, attention 1, MLP 1, logits.
        real_edges = {"head": 12 * 1 + 1 * 5 + 12 * 6 + 1 * 10 + 1 * 11,
                      "layer": 3 * 1 + 1 * 2 + 3 * 3 + 1 * 4 + 1 * 5}[level]
        assert cell["n_edges"] == real_edges and cell["contraction_flop"] == 2 * real_edges * 16 * 64
    assert stdout.count("profile:") == 5  # the plain pass once, EAP at each level and contraction
    assert stdout.count("TFLOP/s over") == 4  # each EAP profile gives the contractions' rate


@pytest.mark.slow
def test_bf16_accuracy_benchmark_prints_its_table():
    # A subprocess: tests never import benchmark modules (the script puts benchmarks/ on sys.path).
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("bf16_accuracy.py")),
                           "--layers", "2", "--d-model", "64", "--tokens", "16"],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[3:-1] for line in done.stdout.splitlines() if line.startswith("| llama")
            or line.startswith("| qwen2")]
    assert len(rows) == 4
    for row in rows:  # bf16 runs differ from float32 by ~1e-2; TL in float32 matches circuitdiff to ~1e-6
        bf16_model, with_contraction, contraction_only, tl_bf16, tl_f32 = (float(x) for x in row)
        assert 1e-4 < contraction_only < 2e-2 and tl_f32 < 1e-4
        assert max(bf16_model, with_contraction, tl_bf16) < 0.1


# Runs the script in a child process with its plain and profiled passes replaced by failing ones
# (tests never import benchmark modules; the first test covers the plain command line).
FAILING_PASSES = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gpu_7b", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["gpu_7b"] = module  # dataclasses look their module up there
spec.loader.exec_module(module)


def broken(*args, **kwargs):
    raise ValueError("boom")


def no_profile(*args, **kwargs):
    raise ValueError("no profile")


module.plain_pass, module.profile_pass = broken, no_profile
sys.exit(module.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_out_of_memory_and_failing_passes_are_reported_and_the_run_goes_on(tmp_path):
    out = tmp_path / "oom.json"
    done = subprocess.run([sys.executable, "-c", FAILING_PASSES, str(SCRIPT),
                           "--tiny", "--json", str(out), "--models", "tiny-qwen2", "--seq", "16",
                           "--repeats", "1", "--fake-oom", "*/tl/head/*", "--profile"],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    status, captured = done.returncode, SimpleNamespace(out=done.stdout, err=done.stderr)
    assert status == 1  # a failed pass fails the run, after every other cell was measured
    assert "ValueError: boom" in captured.err
    report = json.loads(out.read_text())
    assert report["environment"]["complete"] is True
    cells = cells_by_key(report)
    assert set(cells) == {("tiny-qwen2", level, 16) for level in LEVELS}
    head, layer = cells["tiny-qwen2", "head", 16], cells["tiny-qwen2", "layer", 16]
    assert head["tl_flags"] == "OOM" and head["rel_diff"] is None
    assert list(report["oom_details"]) == ["tiny-qwen2/tl/head/16"]
    assert positive(layer["tl_flags"]["peak_bytes"]) and layer["rel_diff"] < 1e-4
    for cell in (head, layer):
        assert cell["plain"] == "ERROR ValueError: boom" and cell["ratio"] is None
        assert positive(cell["eap"]["seconds"]) and positive(cell["eap"]["peak_bytes"])
        # a failed profile is reported in its cell, not the end of the run (no plain profile: plain failed)
        assert cell["profile"] == {"eap": "ERROR ValueError: no profile", "plain": None}
    assert "eap profile: ERROR ValueError: no profile" in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("| tiny-qwen2 | head | 16 |")]
    assert len(rows) == 1 and "OOM" in rows[0] and "ERROR" in rows[0]
