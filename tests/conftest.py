"""Shared fixtures: tiny random checkpoints of every validated architecture.

Models are built from Hugging Face configs (no downloads) once per test session.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CIRCUITDIFF_TYPECHECK", "1")  # shape-check annotated calls (circuitdiff.typecheck)
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402
from pipeline_helpers import write_run_files  # noqa: E402

import circuitdiff as cd  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: tiny_models.write_checkpoint(arch, root / arch) for arch in tiny_models.ARCHITECTURES}


@pytest.fixture(scope="session")
def get_model(checkpoints):
    """``get_model(arch, dtype="float32")``: a cached bridge; float64 computes in float64 throughout."""
    cache: dict[tuple[str, str], object] = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            model = cd.load_model(checkpoints[arch], dtype=getattr(torch, dtype), device="cpu")
            if dtype == "float64":
                tiny_models.float64_throughout(model)
            cache[arch, dtype] = model
        return cache[arch, dtype]

    return get


@pytest.fixture(scope="session")
def get_reference(checkpoints):
    """``get_reference(arch)``: a cached float64 bridge with TransformerLens's per-receiver flags on."""
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            bridge = tiny_models.reference_bridge(checkpoints[arch])
            tiny_models.float64_throughout(bridge)
            cache[arch] = bridge
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def run_files(checkpoints, tmp_path_factory):
    """The pipeline tests' base and tuned checkpoints and questions (see pipeline_helpers.py)."""
    return write_run_files(checkpoints, tmp_path_factory.mktemp("pipeline"))
