"""The examples run, so they cannot rot.

- ``examples/quickstart.ipynb`` is executed cell by cell with nbclient; it must be stored
  with its outputs stripped (no outputs, no execution counts, no widget state).
- ``examples/quickstart.py`` is run as a script.
- ``examples/train_demo_models.py`` is not run: it needs the ``train`` extra (TRL) and
  takes about 20 minutes (``--quick`` still about a minute of training). Its ``--help``
  runs (the module imports TRL only inside ``main``), and its task generator and
  tokenizer must reproduce the bundled ``questions.jsonl`` and tokenizer exactly.
- ``examples/plugin_example/`` is a pip-installable plugin; ``tests/test_plugins.py``
  installs and uses it.

Everything runs with a temporary working directory, so nothing is written into the
repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
#: Every example file and how this module covers it (a new example must be added here).
COVERED = {
    "quickstart.ipynb": "executed with nbclient",
    "quickstart.py": "run as a script",
    "train_demo_models.py": "--help, and its data and tokenizer reproduce the bundled demo",
    "plugin_example": "installed and used by tests/test_plugins.py",
}


def _environment() -> dict[str, str]:
    """The examples' environment: offline, and one OpenMP thread unless the caller set one.

    The demo models are tiny (d_model 64-128), so a second thread gains nothing, while on a
    busy 2-core machine two OpenMP threads per process spin-wait for each other: the
    notebook's code took 87 s with two threads and 15 s with one, on the same loaded machine.
    """
    return {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1"}


def test_every_example_is_covered():
    present = {p.name for p in EXAMPLES.iterdir() if not p.name.startswith((".", "__"))}
    assert present == set(COVERED), "examples without a test (add them to COVERED and test them): " \
        f"{sorted(present - set(COVERED))}; listed but missing: {sorted(set(COVERED) - present)}"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} have outputs or execution counts; strip them " \
        "(jupyter nbconvert --clear-output --inplace examples/quickstart.ipynb)"
    assert "widgets" not in nb.metadata, "the notebook stores widget state; strip it"
    for i, cell in enumerate(nb.cells):
        assert not set(cell.metadata) & {"execution", "collapsed", "scrolled"}, f"cell {i} stores run metadata"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    """Runs the notebook in a fresh kernel of *this* interpreter.

    The kernel is launched from a kernelspec written into ``tmp_path`` whose argv is
    ``sys.executable -m ipykernel_launcher``, given to nbclient through its own
    ``KernelManager``. The ``python3`` spec that Jupyter would otherwise look up can come
    from a user- or system-wide kernel directory and start another Python (one without
    circuitdiff installed); this way only ipykernel in the test's own environment is needed,
    and neither ``jupyter kernelspec install`` nor ``JUPYTER_PATH`` is touched. The connection
    file and IPython's directory are in ``tmp_path`` too, so nothing is written to ``~``.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "circuitdiff-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "circuitdiff tests", "language": "python",
        "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": _environment()["OMP_NUM_THREADS"],
                "IPYTHONDIR": str(tmp_path / "ipython")},  # added to os.environ; no history in ~/.ipython
    }))
    manager = KernelManager(kernel_name="circuitdiff-test", connection_file=str(tmp_path / "connection.json"),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=manager, timeout=300, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the traceback, on any cell error

    text = "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")
    kept = re.search(r"answered correctly by both; kept (\d+)", text)
    assert kept and int(kept.group(1)) >= 30, text
    assert "| intensity |" in text and "| all |" in text, "the comparison table is missing:\n" + text
    assert "grpo: strongest edges" in text and "->" in text, text
    if importlib.util.find_spec("matplotlib") is not None:
        assert any("image/png" in output.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.outputs), "the figure was not displayed"
    assert list(work.iterdir()) == [], "the notebook wrote into its working directory"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "olmo2"])
def test_quickstart_script_runs(tmp_path, arch):
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--out", str(tmp_path / "out"),
                             "--arch", arch], cwd=tmp_path, env=_environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    family = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}[arch]
    assert f"architecture='{family}'" in result.stdout  # the printed ModelSpec
    assert ("layer level only" if arch == "olmo2" else "layer level = sum of head level") in result.stdout
    assert "strongest edges, patching" in result.stdout
    assert (tmp_path / "out" / "quickstart.cdiff").is_file()


@pytest.mark.slow  # a subprocess
def test_train_demo_models_help_runs_without_training(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_demo_models.py"), "--help"], cwd=tmp_path,
                            env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "--out" in result.stdout and "--quick" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_train_demo_models_reproduces_the_bundled_questions_and_tokenizer(monkeypatch):
    from transformers import AutoTokenizer

    from circuitdiff.demo import DEMO_DATA

    for name in ("TOKENIZERS_PARALLELISM", "WANDB_DISABLED"):  # the script sets them; undo afterwards
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("train_demo_models", EXAMPLES / "train_demo_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    manifest = json.loads((DEMO_DATA / "manifest.json").read_text())
    train = script.make_split(manifest["n_train"], script.SEED)
    held_out = script.make_split(manifest["n_questions"], script.SEED + 1, exclude={p["prompt"] for p in train})
    bundled = [json.loads(line) for line in (DEMO_DATA / "questions.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["answer"]) for p in held_out] == [(q["prompt"], q["answer"]) for q in bundled]

    tokenizer, bundled_tokenizer = script.build_tokenizer(), AutoTokenizer.from_pretrained(DEMO_DATA / "base")
    for text in (bundled[0]["prompt"], "Q: 12+7*3= 7*3=21 12+21=33 \\boxed{33}"):
        assert tokenizer(text)["input_ids"] == bundled_tokenizer(text)["input_ids"]
