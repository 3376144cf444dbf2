"""Packaging: the license is an SPDX expression (the table form stops building after 2027-02-18),
and the helpers that build the wheel and install it into a fresh environment.

The wheel itself is tested end to end in ``tests/test_demo.py``: it is installed (not editable)
and ``circuitdiff demo`` runs from it in an empty folder. That replaces the in-process run of the
demo the suite had before, so the suite pays only for the build and the install (about 10 s).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
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


def build_wheel(out: Path) -> Path:
    """The wheel pip builds from a copy of the source tree (so nothing is written into the repository).

    ``--no-build-isolation`` builds with this environment's setuptools instead of downloading one.
    """
    source = out / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "--isolated", "wheel", "--no-deps", "--no-index",
                           "--no-build-isolation", "--wheel-dir", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("circuitdiff-*.whl")
    return wheel


def install_in_fresh_environment(wheel: Path, env_dir: Path) -> Path:
    """A new virtual environment with ``wheel`` installed by pip (not editable); returns its ``bin`` folder.

    The dependencies (torch, transformers, ...) are not installed again: a ``.pth`` file puts this
    interpreter's site-packages on the new environment's ``sys.path``, after its own site-packages.
    Python reads ``.pth`` files only in the site directories themselves, not in folders that a
    ``.pth`` file adds, so this environment's editable install of circuitdiff (its
    ``__editable__*.pth`` points at ``src/``) is invisible there and ``import circuitdiff`` finds
    the wheel's copy. pip runs from the same site-packages, with the new environment as its target.
    """
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    own_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(own_site, "test-dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    done = subprocess.run([python, "-m", "pip", "--isolated", "install", "--no-deps", "--no-index",
                           "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return python.parent
