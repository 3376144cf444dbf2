"""Packaging: the license is an SPDX expression (the table form stops building after 2027-02-18)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_metadata_carries_an_spdx_license_and_builds_without_deprecation_warnings(tmp_path):
    code = ("import warnings, sys\n"
            "warnings.simplefilter('error')\n"  # setuptools' deprecations become failures
            "from setuptools import build_meta\n"
            f"print(build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = (tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
