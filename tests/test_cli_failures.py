"""Scenario 7 of the trust issue: the command line fails early, in one line, and never leaves half-written files.

Before: ``--method eapp`` (now ``--scorer eapp``) loaded both models and generated answers, then failed with a
message that never named ``eapp``; ``--device cuda`` (or ``gpu``) without one, an output
path that is a file, ``comparison.json`` that is a folder, a full disk and crafted files
gave Python tracebacks; ``comparison.json`` and ``report.md`` were written in place.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
from circuitdiff import models
from circuitdiff.cli import main
from pipeline_helpers import cli_args, write_caches


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model is loaded: the options must be checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("circuitdiff.pipeline.load_model", refuse)  # first: importing the pipeline binds the real one
    monkeypatch.setattr(models, "load_model", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("circuitdiff: error: ")
    return err


@pytest.mark.parametrize(("extra", "message"), [
    (("--scorer", "eapp"), "unknown scorer 'eapp'; available: eap"),
    (("--device", "gpu"), "unknown device 'gpu'"),
    (("--level", "neuron"), None),  # argparse's own choices check (exit 2, usage line)
    (("--dtype", "float8"), "unknown dtype 'float8'"),
], ids=["scorer", "device-name", "level", "dtype"])
def test_bad_options_fail_before_any_model_loads(run_files, tmp_path, capsys, no_model_loading, extra, message):
    if message is None:
        with pytest.raises(SystemExit) as info:
            main(cli_args(run_files, tmp_path / "out", *extra))
        assert info.value.code == 2
        return
    assert main(cli_args(run_files, tmp_path / "out", *extra)) == 2
    assert message in one_line_error(capsys)


def test_method_is_a_deprecated_alias_of_scorer(run_files, tmp_path, capsys, no_model_loading):
    """``--method`` still works for one release: it sets --scorer and prints one warning line on stderr."""
    from circuitdiff.cli import _parser

    args = _parser().parse_args(cli_args(run_files, tmp_path / "out", "--method", "exact", "--method", "eap-ig-inputs"))
    assert args.scorer == "eap-ig-inputs"  # like any repeated option, the last one wins
    warning = "circuitdiff: warning: --method is deprecated and will be removed in the next release; use --scorer.\n"
    assert capsys.readouterr().err == warning  # once
    assert _parser().parse_args(cli_args(run_files, tmp_path / "out", "--scorer", "exact")).scorer == "exact"
    assert capsys.readouterr().err == ""
    assert main(cli_args(run_files, tmp_path / "out", "--method", "eapp")) == 2
    assert capsys.readouterr().err.splitlines() == [warning.strip(),
                                                    "circuitdiff: error: unknown scorer 'eapp'; available: " +
                                                    ", ".join(cd.scorers.available()) + "."]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_fails_before_any_model_loads(run_files, tmp_path, capsys, no_model_loading):
    assert main(cli_args(run_files, tmp_path / "out", "--device", "cuda")) == 2
    assert "device 'cuda' is not available on this machine" in one_line_error(capsys)


def test_output_paths_that_cannot_be_written_fail_first(run_files, tmp_path, capsys, no_model_loading):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(cli_args(run_files, file)) == 2
    assert "is a file; pass a directory" in one_line_error(capsys)
    out = tmp_path / "out"
    (out / "comparison.json").mkdir(parents=True)
    assert main(cli_args(run_files, out)) == 2
    assert "comparison.json' is a folder" in one_line_error(capsys)
    graph = cd.AttributionGraph(2, 2, level="layer")
    cd.EdgeScores(graph, torch.zeros(graph.n_sources, graph.n_receivers),
                  torch.randn(3, graph.n_sources, graph.n_receivers) * graph.edge_mask, torch.zeros(3)).save(
        tmp_path / "s.cdiff")
    assert main(["compare-scores", str(tmp_path / "s.cdiff"), str(tmp_path / "s.cdiff"), "--out", str(file)]) == 2
    assert "is a file; pass a directory" in one_line_error(capsys)


def test_a_full_disk_is_one_line_and_leaves_the_old_files_whole(run_files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    write_caches(run_files, out)
    assert main(cli_args(run_files, out)) == 0
    before = {name: (out / name).read_bytes() for name in ("comparison.json", "report.md", "run.json")}
    capsys.readouterr()

    real = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if self.parent == out and self.name.startswith("."):  # a temporary file of an atomic write
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(cli_args(run_files, out)) == 2
    assert "No space left on device" in one_line_error(capsys)
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name  # never truncated
    assert not [p for p in out.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]  # no temporaries left


def test_crafted_score_files_are_one_line(tmp_path, capsys):
    crafted = tmp_path / "crafted.cdiff"
    header = json.dumps({"__metadata__": {"circuitdiff": json.dumps({"format_version": 1, "graph": []})}}).encode()
    crafted.write_bytes(len(header).to_bytes(8, "little") + header)
    assert main(["compare-scores", str(crafted), str(crafted)]) == 2
    assert "crafted.cdiff" in one_line_error(capsys)


def test_debug_shows_the_traceback(run_files, tmp_path, capsys):
    assert main(cli_args(run_files, tmp_path / "out", "--scorer", "eapp", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("circuitdiff: error: unknown scorer")


def test_fresh_discards_cached_generations(run_files, tmp_path, capsys):
    out = tmp_path / "run"
    write_caches(run_files, out)
    assert main(cli_args(run_files, out)) == 0
    capsys.readouterr()  # write_caches loaded the models (with transformers' loading bars)
    edited = run_files["root"] / "edited.jsonl"  # the prompts changed: the cached answers are stale
    edited.write_text(run_files["questions"].read_text().replace('"w0 w1 w2"', '"w0 w1 w3"'))
    args = cli_args({**run_files, "questions": edited}, out)
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "'q0'" in err and "the prompt changed" in err and "--fresh" in err
    assert main([*args[:-1], "--fresh", "--max-new-tokens", "2", "--quiet"]) == 2  # tiny random models: all wrong
    assert "no questions to select from" in one_line_error(capsys)
    lines = (out / "base.generations.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(line)["answer_ids"]) <= 2 for line in lines)  # regenerated
    assert cd.__version__  # the package imports after all of this
