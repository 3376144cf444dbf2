#!/usr/bin/env bash
# Run benchmarks/gpu_7b.py on a GPU machine that has no network and no transformer-lens.
#
# From the repository root, with the wheels in .whl/ (made by --make-wheels below):
#
#     OUT=/some/dir bash benchmarks/run_gpu_7b.sh            # issue 24's GPU figures (at most 8 minutes)
#     OUT=/tmp/outsim bash benchmarks/run_gpu_7b.sh --tiny   # one run of gpu_7b.py on CPU, tiny shapes
#
# Without arguments it runs gpu_7b.py three times, each under a time limit, so the whole
# run ends within 8 minutes (a run cut short keeps the models it finished in its JSON):
#   1. gpu_7b.json (4 min): EAP / plain at 512 and 2048 tokens, both 7B shapes, both levels;
#   2. gpu_7b_long_head.json (2 min): head level at 8192 and 16384 tokens, batch 1, with
#      fused_attention, checkpoint_blocks, positions_per_chunk 1024, a bfloat16 source buffer
#      and position windows of 4096 (a 16k head-level buffer alone is 129 GB in bfloat16);
#      no plain pass;
#   3. gpu_7b_long_layer.json (2 min): layer level at 16384 and 32768 tokens, fused_attention,
#      checkpoint_blocks, positions_per_chunk 2048; no plain pass.
# Each cell has the measured peak and the planner's estimate (estimate_error). With
# arguments, one run of gpu_7b.py with them. It installs into $SITE (default /tmp/site), with
# `pip install --no-index --no-deps --target`, each wheel of .whl/ whose distribution the
# machine lacks (or has older than transformer-lens needs), so nothing shadows the
# machine's own torch stack; sets PYTHONPATH=$SITE:src; prints nvidia-smi and the versions;
# then runs gpu_7b.py, writing $OUT/<run>.json and $OUT/<run>.log.
#
# The expected machine: Python 3.12, torch, transformers >= 5.9, numpy, scipy, einops,
# jaxtyping, safetensors, tqdm, accelerate. transformer-lens 4.3 imports `datasets` at
# import time (type annotations and dataset helpers circuitdiff never calls); datasets
# needs pyarrow (~45 MB), so .whl/ carries a stand-in package `datasets` (distribution
# datasets-stub) that is installed only where `import datasets` fails. wandb is imported
# lazily (training only) and is not needed.
#
#     bash benchmarks/run_gpu_7b.sh --make-wheels   # on a machine with PyPI: fill .whl/ (~17 MB)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}

make_wheels() {
    # Wheels for CPython 3.12 on x86_64 Linux: transformer-lens 4.3.0 and those of its
    # requirements that a torch + transformers machine may lack (the last groups are only
    # installed where missing), and pytest for the GPU tests (tests/test_hook_products.py).
    # Not torch, transformers, numpy, datasets, wandb.
    local platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: "${platform[@]}" -d "$WHEELS" \
        transformer-lens==4.3.0 beartype==0.23.1 typeguard==4.6.1 fancy-einsum==0.0.3 \
        typing-extensions==4.16.0 \
        pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6 \
        rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 \
        pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4
    # Published as a source distribution only; pure Python.
    "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" transformers-stream-generator==0.0.5
    local src
    src=$(mktemp -d)
    mkdir -p "$src/datasets"
    cat > "$src/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "datasets-stub"
version = "0.0.1"
description = "Stand-in for the `datasets` package so that transformer_lens imports without pyarrow."

[tool.setuptools]
packages = ["datasets"]
TOML
    cat > "$src/datasets/__init__.py" <<'PY'
"""Stand-in for Hugging Face ``datasets`` (distribution ``datasets-stub``).

transformer_lens 4.3 imports ``datasets`` when it is imported, for type annotations and
dataset helpers; this package lets it import on a machine without datasets and pyarrow.
Loading or building any dataset raises ImportError. Remove it and install datasets to
use those helpers.
"""

from datasets.arrow_dataset import Dataset
from datasets.iterable_dataset import IterableDataset
from datasets.load import load_dataset

__version__ = "0.0.1+stub"
__all__ = ["Dataset", "IterableDataset", "load_dataset"]
PY
    cat > "$src/datasets/_stub.py" <<'PY'
MESSAGE = ("this is the datasets-stub package, a stand-in so that transformer_lens imports; "
           "install the real `datasets` to load data.")


class Unavailable:
    def __init__(self, *args, **kwargs):
        raise ImportError(MESSAGE)
PY
    printf 'from datasets._stub import Unavailable\n\n\nclass Dataset(Unavailable):\n    pass\n' \
        > "$src/datasets/arrow_dataset.py"
    printf 'from datasets._stub import Unavailable\n\n\nclass IterableDataset(Unavailable):\n    pass\n' \
        > "$src/datasets/iterable_dataset.py"
    printf 'from datasets._stub import MESSAGE\n\n\ndef load_dataset(*args, **kwargs):\n    raise ImportError(MESSAGE)\n' \
        > "$src/datasets/load.py"
    "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" "$src"
    rm -rf "$src"
    ls -la "$WHEELS"
    du -sh "$WHEELS"
}

install_wheels() {
    # Prints what it installs and why; installs nothing the machine already has.
    "$PYTHON" - "$WHEELS" "$SITE" <<'PY'
import importlib.metadata as metadata
import importlib.util
import pathlib
import re
import subprocess
import sys
import zipfile

wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# Floors that transformer-lens 4.3 and its typeguard need; an older copy is shadowed.
MINIMUM = {"typing-extensions": (4, 14), "typeguard": (4, 2), "beartype": (0, 14, 1), "transformer-lens": (4, 3)}


def release(version):
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


chosen = []
for wheel in sorted(wheels.glob("*.whl")):
    dist = wheel.name.split("-")[0].lower().replace("_", "-")
    if dist == "datasets-stub":
        have = importlib.util.find_spec("datasets") is not None
        reason = "datasets is importable" if have else "no datasets here"
    else:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have, reason = False, "missing"
        else:
            have = release(version) >= MINIMUM.get(dist, ())
            reason = f"have {version}" if have else f"have {version}, need >= {'.'.join(map(str, MINIMUM[dist]))}"
    print(f"  {'skip   ' if have else 'install'} {wheel.name} ({reason})")
    if not have:
        chosen.append(str(wheel))
if not chosen:
    sys.exit(0)
site.mkdir(parents=True, exist_ok=True)
pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
if pip.returncode == 0:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade",
                    "--target", str(site), *chosen], check=True)
else:  # no pip: a wheel without scripts or data is a zip of the files to import
    print("  (no pip here: unpacking the wheels)")
    for wheel in chosen:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
PY
}

if [[ "${1:-}" == "--make-wheels" ]]; then
    make_wheels
    exit 0
fi

OUT=${OUT:?set OUT to the folder for gpu_7b.json and gpu_7b.log}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== wheels from $WHEELS into $SITE"
install_wheels
export PYTHONPATH="$SITE:src${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine"
if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "(no nvidia-smi)"; fi
"$PYTHON" - <<'PY'
import importlib.metadata as metadata
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, "
      f"cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
for dist in ("transformers", "transformer-lens", "tokenizers", "numpy", "jaxtyping", "typeguard", "beartype",
             "datasets", "datasets-stub", "pandas", "accelerate"):
    try:
        print(f"  {dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"  {dist} -")
import circuitdiff
import transformer_lens
from transformer_lens import TransformerBridge  # noqa: F401  (the lazy, import-heavy part)

print(f"circuitdiff from {circuitdiff.__file__}; transformer_lens from {transformer_lens.__file__}")
PY

set -o pipefail
run() {  # run NAME SECONDS ARGS...: gpu_7b.py ARGS, stopped after SECONDS, into $OUT/NAME.json and .log
    local name=$1 limit=$2 status=0
    shift 2
    echo "== benchmarks/gpu_7b.py $* (at most $limit s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$PYTHON" benchmarks/gpu_7b.py --json "$OUT/$name.json" "$@" 2>&1 \
        | tee "$OUT/$name.log" || status=$?
    [[ $status -eq 124 ]] && echo "== $name: stopped after $limit s; $OUT/$name.json has the models it finished"
    return $(( status == 124 ? 0 : status ))
}
if [[ $# -gt 0 ]]; then
    run gpu_7b 600 "$@"
else
    failed=0
    run gpu_7b 240 --skip-tl --seq 512 2048 || failed=1
    run gpu_7b_long_head 120 --skip-tl --skip-plain --repeats 1 --levels head --seq 8192 16384 \
        --fused-attention --checkpoint-blocks --positions-per-chunk 1024 --contraction-dtype bfloat16 \
        --positions-per-pass 4096 || failed=1
    run gpu_7b_long_layer 120 --skip-tl --skip-plain --repeats 1 --levels layer --seq 16384 32768 \
        --fused-attention --checkpoint-blocks --positions-per-chunk 2048 || failed=1
    exit $failed
fi
