"""The bundled demo: files match the manifest, the models load, answer and score, and
``circuitdiff demo`` runs end to end on a reduced setting, from the installed wheel."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
from circuitdiff.cli import main
from circuitdiff.data import generate_answers, read_questions
from circuitdiff.demo import DEMO_DATA, TUNED_MODELS, check_demo_files, side_by_side
from test_packaging import build_wheel, install_in_fresh_environment

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", *TUNED_MODELS)


def test_every_file_matches_the_manifest():
    manifest = json.loads((DEMO_DATA / "manifest.json").read_text())
    files = {p.relative_to(DEMO_DATA).as_posix() for p in DEMO_DATA.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((DEMO_DATA / name).read_bytes()).hexdigest() == digest, name
    for model in (*MODELS, *(f"grpo-run/checkpoint-{step}" for step in range(100, 700, 100))):
        assert {f"{model}/model.safetensors", f"{model}/config.json", f"{model}/tokenizer.json"} <= files
    assert set(manifest["grpo_run_accuracy"]) == {f"checkpoint-{step}" for step in range(100, 700, 100)}
    assert check_demo_files() == manifest
    assert set(manifest["accuracy"]) == set(MODELS) and manifest["seed"] == 1234
    assert {"torch", "transformers", "trl"} <= set(manifest["versions"])


def test_package_data_ships_every_demo_file():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["circuitdiff"]
    for path in DEMO_DATA.rglob("*"):
        if path.is_file():
            name = path.relative_to(DEMO_DATA.parent).as_posix()
            assert any(fnmatch.fnmatch(name, p) and name.count("/") == p.count("/") for p in patterns), name


def test_changed_missing_or_extra_files_are_refused(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_DATA, copy)
    weights = copy / "grpo" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(cd.DataError, match="grpo/model.safetensors.*does not match its SHA-256"):
        check_demo_files(copy)
    shutil.copyfile(DEMO_DATA / "grpo" / "model.safetensors", weights)
    check_demo_files(copy)
    (copy / "dpo" / "notes.txt").write_text("x")
    with pytest.raises(cd.DataError, match="does not list.*dpo/notes.txt"):
        check_demo_files(copy)
    (copy / "dpo" / "notes.txt").unlink()
    (copy / "questions.jsonl").unlink()
    with pytest.raises(cd.DataError, match="questions.jsonl.*missing"):
        check_demo_files(copy)
    with pytest.raises(cd.DataError, match="no demo manifest"):
        check_demo_files(tmp_path)


@pytest.mark.parametrize("name", [m if m == "base" else pytest.param(m, marks=pytest.mark.slow) for m in MODELS])
def test_bundled_models_answer_as_the_manifest_says_and_score(name):
    manifest = check_demo_files()
    model = cd.load_model(DEMO_DATA / name, device="cpu")
    spec = cd.describe_model(model)
    assert (spec.architecture, spec.n_kv_heads < spec.n_heads) == ("LlamaForCausalLM", True)  # GQA
    questions = read_questions(DEMO_DATA / "questions.jsonl")
    assert len(questions) == manifest["n_questions"]
    answers = generate_answers(model, questions, batch_size=100, max_new_tokens=48, progress=False)
    accuracy = sum(a.correct for a in answers) / len(answers)
    # the training script measured it with its own generation loop and answer check
    assert accuracy == pytest.approx(manifest["accuracy"][name], abs=0.01)
    correct = [a for a in answers if a.correct][:4]
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = cd.make_batches(model.tokenizer, [q.prompt for q in questions if q.id in {a.id for a in correct}],
                              [a.answer_ids for a in correct], batch_size=4)
    scores = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    assert scores.per_sample.shape == (4, graph.n_sources, graph.n_receivers)
    assert torch.isfinite(scores.per_sample).all() and scores.mean.abs().max() > 0


@pytest.mark.slow
def test_demo_runs_from_the_installed_wheel_end_to_end(tmp_path, capsys):
    """``circuitdiff demo`` from the wheel, installed (not editable) into a fresh environment and
    run in an empty folder; then a second run and ``--trajectory`` in this process reuse its work."""
    wheel = build_wheel(tmp_path / "wheel")
    documented = re.search(r"the wheel is ([\d.]+) MB", (ROOT / "docs" / "demo.md").read_text())
    assert documented and abs(wheel.stat().st_size / 1e6 - float(documented.group(1))) < 0.5, \
        f"the wheel is {wheel.stat().st_size / 1e6:.1f} MB; update the size in docs/demo.md"
    bin_dir = install_in_fresh_environment(wheel, tmp_path / "env")
    work = tmp_path / "work"
    work.mkdir()
    # one OpenMP thread unless the caller set one (see test_examples._environment); no src/ on the path
    env = {"OMP_NUM_THREADS": "1", **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([bin_dir / "python", "-c", "import circuitdiff; print(circuitdiff.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "env"), f"circuitdiff was imported from {where}, not the wheel"
    done = subprocess.run([bin_dir / "circuitdiff", "demo", "--max-questions", "80", "--n", "12", "--quiet"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout == ""
    out = work / "circuitdiff-demo"  # the default --out, relative to the working folder
    assert list(work.iterdir()) == [out]
    for name in TUNED_MODELS:
        run = json.loads((out / f"base-vs-{name}" / "run.json").read_text())
        assert run["counts"]["questions"] == 80 and run["counts"]["scored"] == 12
        assert len(run["figures"]) == 5 and all((work / f).is_file() for f in run["figures"])  # 4 + volcano
    report = (out / "report.md").read_text()
    assert "| metric (all edges) | base -> grpo | base -> dpo |" in report
    # each cell is the per-comparison JSON's row, in % of base
    rows = {name: {r["metric"]: r for r in json.loads((out / f"base-vs-{name}" / "comparison.json").read_text())["rows"]
                   if r["group"] == "all"} for name in TUNED_MODELS}
    intensity = next(line for line in report.splitlines() if line.startswith("| intensity |"))
    for name, cell in zip(TUNED_MODELS, intensity.split(" | ")[1:]):
        row = rows[name]["intensity"]
        assert cell.startswith(f"{row['percent_change']:+.1f}% [{100 * row['ci_low'] / row['base']:+.1f}, ")
    # the scorer robustness verdicts, one table below: each cell is the comparison's own verdict
    assert "| metric | base -> grpo (eap vs exact, 12 samples) | base -> dpo (eap vs exact, 12 samples) |" in report
    verdict_line = report.splitlines()[[i for i, line in enumerate(report.splitlines())
                                         if line.startswith("| intensity |")][1]]
    for name, cell in zip(TUNED_MODELS, verdict_line.strip("| ").split(" | ")[1:]):
        verdict = next(v for v in json.loads((out / f"base-vs-{name}" / "comparison.json").read_text())
                       ["robustness"]["verdicts"] if v["metric"] == "intensity")
        assert cell == (f"{verdict['verdict']} (eap {verdict['headline']['direction']}, "
                        f"exact {verdict['reference']['direction']})")
    # a second run reuses everything: the same numbers (the files' timestamps aside)
    def numbers():
        result = json.loads((out / "base-vs-dpo" / "comparison.json").read_text())
        return result["rows"], result["similarity"]

    before = numbers()
    assert main(["demo", "--out", str(out), "--max-questions", "80", "--n", "12"]) == 0
    printed = capsys.readouterr().out
    assert "| metric (all edges) | base -> grpo | base -> dpo |" in printed and "base 44.4%" in printed
    assert numbers() == before

    # the GRPO run's checkpoints against base, starting from the base answers above
    assert main(["demo", "--trajectory", "--out", str(out), "--max-questions", "80", "--n", "12", "--quiet"]) == 0
    trajectory = out / "trajectory"
    assert (trajectory / "step-0.generations.jsonl").read_bytes() == (out / "base-vs-grpo" /
                                                                       "base.generations.jsonl").read_bytes()
    data = json.loads((trajectory / "trajectory.json").read_text())
    steps = [100, 200, 300, 400, 500, 600]
    assert data["steps"] == steps and len(data["trends"]) == len(cd.metrics.available())
    reward = cd.read_training_log(DEMO_DATA / "grpo-run" / "trainer_state.json")["reward"]
    assert data["logs"]["reward"] == {str(step): value for step, value in reward.items()}
    assert set(data["logs"]["accuracy"]) == {"0", *map(str, steps)}
    run = json.loads((trajectory / "run.json").read_text())
    assert run["counts"]["questions"] == 80 and run["figures"] and all(Path(f).is_file() for f in run["figures"])


def test_devices_without_trajectory_or_without_a_name_are_refused(capsys):
    assert main(["demo", "--devices", "cpu,cpu"]) == 2
    assert "use it with --trajectory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--trajectory", "--devices", " , "])
    assert exit_info.value.code == 2 and "no device named" in capsys.readouterr().err


def test_side_by_side_reads_each_comparison(get_model):
    from test_metrics import random_scores, scores_from

    graph = cd.AttributionGraph.from_model(get_model("llama"), level="layer")
    base = random_scores(graph)
    doubled = scores_from(graph, 2 * base.per_sample)
    table = side_by_side({"twice": cd.compare(base, doubled), "same": cd.compare(base, base)})
    intensity = next(line for line in table.splitlines() if line.startswith("| intensity |"))
    twice = intensity.split(" | ")[1]  # "+100.0% [low, high] p=..."; the CI is that of base's mean intensity
    low, high = (float(x) for x in twice[twice.index("[") + 1:twice.index("]")].split(", "))
    assert twice.startswith("+100.0% [") and low < 100 < high
    assert intensity.endswith("| +0.0% [+0.0, +0.0] p=1 (Holm 1) |")
    holm = float(twice[twice.index("(Holm ") + 6:-1])  # the row's Holm-adjusted p
    assert holm == pytest.approx(cd.compare(base, doubled).get("intensity").p_holm, rel=0.05)
    assert table.splitlines()[0] == "| metric (all edges) | base -> twice | base -> same |"
    assert "| Spearman(base, tuned) | 1.000 | 1.000 |" in table and "| samples (paired) | 30 | 30 |" in table
