"""The examples run, so they cannot rot.

- ``examples/quickstart.ipynb`` is stored with the outputs of one run from top to bottom, so
  it can be read on GitHub without running it. The test executes it again with nbclient and
  compares: every code cell must give outputs of the same kinds, and the same printed text up
  to float noise, so the stored outputs cannot go stale. After changing the notebook or what it
  prints, store a fresh run with ``python tests/test_examples.py --store-notebook``.
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
import math
import os
import re
import subprocess
import sys
from decimal import Decimal
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


def test_notebook_is_stored_with_the_outputs_of_one_clean_run():
    import nbformat  # in the test extra
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
        f"{NOTEBOOK.name} is not stored from one run from top to bottom; {STORE}"
    for i, cell in enumerate(code):
        kinds = [output.output_type for output in cell.outputs]
        assert kinds and not {"error"} & set(kinds), f"code cell {i} has no output or an error; {STORE}"
        assert not any(output.get("name") == "stderr" for output in cell.outputs), \
            f"code cell {i} stores stderr (warnings, progress bars); {STORE}"
    texts = [text for cell in code for output in cell.outputs
             for text in (output.get("text", ""), *(v for k, v in output.get("data", {}).items() if k.startswith("text/")))]
    assert not [t for t in texts if re.search(r"/(work|tmp|home|root|Users)/", t)], "the outputs contain a local path"
    size = len(json.dumps([cell.outputs for cell in code]))
    assert size < 200_000, f"the outputs take {size} characters; keep them small"
    assert "widgets" not in nb.metadata, "the notebook stores widget state; strip it"
    for i, cell in enumerate(nb.cells):
        assert not set(cell.metadata) & {"execution", "collapsed", "scrolled"}, f"cell {i} stores run metadata"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_gives_the_stored_outputs(tmp_path):
    import nbformat  # in the test extra
    stored = nbformat.read(NOTEBOOK, as_version=4)
    nb, work = execute_notebook(NOTEBOOK, tmp_path)  # raises CellExecutionError, with the traceback, on any error

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

    for i, (old, new) in enumerate(zip(_code_cells(stored), _code_cells(nb), strict=True)):
        (printed_before, others_before), (printed_now, others_now) = _summary(old), _summary(new)
        assert others_before == others_now, f"code cell {i} gives other outputs than stored; {STORE}"
        assert _same_up_to_float_noise(printed_before, printed_now), \
            f"code cell {i} prints\n{printed_now}\nbut the notebook stores\n{printed_before}\n{STORE}"


STORE = "store a fresh run with: python tests/test_examples.py --store-notebook"
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def execute_notebook(path: Path, tmp_path: Path):
    """Runs the notebook at ``path`` in a fresh kernel of *this* interpreter, in the empty
    folder ``tmp_path/work``; returns the executed notebook and that folder.

    The kernel is launched from a kernelspec written into ``tmp_path`` whose argv is
    ``sys.executable -m ipykernel_launcher``, given to nbclient through its own
    ``KernelManager``. The ``python3`` spec that Jupyter would otherwise look up can come
    from a user- or system-wide kernel directory and start another Python (one without
    circuitdiff installed); this way only ipykernel in the test's own environment is needed,
    and neither ``jupyter kernelspec install`` nor ``JUPYTER_PATH`` is touched. The connection
    file and IPython's directory are in ``tmp_path`` too, so nothing is written to ``~``.
    No timing metadata is recorded, the notebook's own metadata is kept as it was, and
    outputs to stderr (warnings, the dependencies' progress bars) are dropped: they depend on
    the installed versions, and they would store local paths.
    """
    import nbclient
    import nbformat
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
    nb = nbformat.read(path, as_version=4)
    metadata = nb.metadata.copy()
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, km=manager, timeout=300, record_timing=False,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()
    nb.metadata = metadata
    for cell in _code_cells(nb):
        cell.outputs = [output for output in cell.outputs if output.get("name") != "stderr"]
    return nb, work


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _summary(cell) -> tuple[str, list[tuple[str, ...]]]:
    """A code cell's printed text (however the kernel split it into messages) and the types of
    its other outputs with their MIME types."""
    printed = "".join(output.text for output in cell.outputs if output.get("name") == "stdout")
    others = [(output.output_type, *sorted(output.get("data", {}))) for output in cell.outputs
              if output.output_type != "stream"]
    return printed, others


def _same_up_to_float_noise(before: str, now: str) -> bool:
    """The same text, with whole numbers equal and decimals within 2% or one unit of their last digit.

    The scores are deterministic, but another CPU or BLAS build changes them at the 1e-6
    level, which can move a printed last digit or a p-value a little.
    """
    if _NUMBER.split(before) != _NUMBER.split(now):
        return False
    for old, new in zip(_NUMBER.findall(before), _NUMBER.findall(now)):
        if old == new:
            continue
        if not re.search(r"[.eE]", old + new):  # counts, lengths, layer numbers
            return False
        unit = 10.0 ** Decimal(old).as_tuple().exponent
        if not math.isclose(float(old), float(new), rel_tol=0.02, abs_tol=unit):
            return False
    return True


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


if __name__ == "__main__":
    if sys.argv[1:] != ["--store-notebook"]:
        sys.exit("usage: python tests/test_examples.py --store-notebook  (runs the quickstart notebook and "
                 "stores it with its outputs)")
    import tempfile

    import nbformat

    with tempfile.TemporaryDirectory() as scratch:
        executed, _ = execute_notebook(NOTEBOOK, Path(scratch))
    nbformat.write(executed, NOTEBOOK)
    print(f"stored {NOTEBOOK} with its outputs")
