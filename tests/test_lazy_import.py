"""``import circuitdiff`` and ``circuitdiff --help`` stay light: public names import their module on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import circuitdiff as cd

HEAVY = ("torch", "scipy", "numpy", "transformers", "transformer_lens")


def test_the_command_line_help_loads_no_heavy_library():
    code = ("import sys, circuitdiff, circuitdiff.cli\n"
            "for argv in (['--help'], ['demo', '--help'], ['trajectory', '--help']):\n"
            "    try:\n"
            "        circuitdiff.cli.main(argv)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 0, exit.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--trajectory" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_every_public_name_resolves_to_its_module_and_the_static_imports_agree():
    for name in cd.__all__:
        assert getattr(cd, name) is not None, name
    for name, module in cd._EXPORTS.items():
        assert getattr(cd, name) is getattr(sys.modules[module], name), name
    assert set(cd.__all__) == set(cd._EXPORTS) | set(cd._SUBMODULES)
    from circuitdiff import compare, metrics  # from-imports of names and submodules
    assert compare is cd.comparison.compare and metrics is cd.metrics
    # what static tools see (the TYPE_CHECKING block) names the same modules
    tree = ast.parse(Path(cd.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    static = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
              for alias in node.names if node.module != "circuitdiff"}
    assert static == cd._EXPORTS
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        cd.not_a_name  # noqa: B018


def test_a_submodule_import_keeps_the_public_function_of_the_same_name():
    code = ("import types, circuitdiff.acdc, circuitdiff.robustness, circuitdiff as cd\n"  # robustness imports agreement
            "assert not isinstance(cd.acdc, types.ModuleType) and callable(cd.acdc)\n"
            "assert not isinstance(cd.agreement, types.ModuleType) and callable(cd.agreement)\n"
            "assert cd.acdc is sys.modules['circuitdiff.acdc'].acdc\n")
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
