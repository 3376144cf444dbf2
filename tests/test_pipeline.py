"""The pipeline and the CLI end to end on two tiny checkpoints, with stub generation caches (pipeline_helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.cli import main
from circuitdiff.pipeline import PipelineConfig, run_compare
from circuitdiff.scorers.eap import EAP
from circuitdiff.scorers.eap_ig import EAPIGInputs

from pipeline_helpers import ANSWER_LENGTHS, MAX_NEW_TOKENS, answer_ids, cli_args, write_caches


def test_compare_end_to_end(run_files, tmp_path):
    out = tmp_path / "run"
    write_caches(run_files, out)
    assert main(cli_args(run_files, out)) == 0
    run = json.loads((out / "run.json").read_text())
    # T_bar over q0-q3 (both correct) = mean of 10.5, 12, 11.5, 12.5 = 11.625; window [5.8, 17.4] keeps all
    # four; q5 (tuned 30 tokens) is correct for both but ... base q4 is wrong, so q4 is out before selection.
    assert run["counts"]["questions"] == 6
    assert run["counts"]["correct (base)"] == 5 and run["counts"]["correct (tuned)"] == 6
    assert run["counts"]["correct (both)"] == 5
    assert run["counts"]["dropped: length window"] == 1  # q5: 30 > 1.5 * T_bar
    assert run["counts"]["scored"] == 4
    t_bar = (10.5 + 12 + 11.5 + 12.5 + (9 + 30) / 2) / 5
    assert run["selection"]["t_cut"] == int(0.5 * t_bar) and run["selection"]["rule"] == "paper"
    base = cd.EdgeScores.load(out / "base.cdiff")
    assert base.n_samples == 4 and base.sample_ids == ("q0", "q1", "q2", "q3")
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["paired"] and comparison["settings"]["n_base"] == 4
    assert {r["metric"] for r in comparison["rows"]} >= {"intensity", "diversity", "kurtosis"}
    report = (out / "report.md").read_text()
    assert "| correct (both) | 5 |" in report and "| intensity |" in report
    assert len(run["figures"]) == 5 and (out / "figures" / "volcano.png").is_file()  # 4 + the per-edge tests
    # the scores are those of each model's own answer truncated to T_cut tokens
    model = cd.load_model(run_files["base"], device="cpu")
    t_cut = run["selection"]["t_cut"]
    ids = answer_ids("base", 0, ANSWER_LENGTHS["base"][0])[:t_cut]
    batch = cd.make_batches(model.tokenizer, ["w0 w1 w2"], [ids])
    direct = cd.attribute(model, cd.AttributionGraph.from_model(model, level="layer"), batch,
                          objective="answer_nll", progress=False)
    assert torch.allclose(base.per_sample[0], direct.per_sample[0], atol=1e-6)
    # scorer robustness, on by default: both models re-scored with exact ablation (4 pairs < 16: all of them)
    reference = cd.EdgeScores.load(out / "base.reference.cdiff")
    assert reference.metadata["method"] == "exact" and reference.sample_ids == base.sample_ids
    exact = cd.attribute(model, cd.AttributionGraph.from_model(model, level="layer"), batch, objective="answer_nll",
                         scorer="exact", progress=False)
    assert torch.allclose(reference.per_sample[0], exact.per_sample[0], atol=1e-6)
    verdicts = {v["metric"]: v["verdict"] for v in comparison["robustness"]["verdicts"]}
    assert set(verdicts) >= {"intensity", "diversity"}
    assert set(verdicts.values()) <= {"robust", "scorer-dependent", "inconclusive"}
    assert "**Scorer robustness**" in report and "Robustness check: exact on 4 paired samples" in report
    # every question left out is listed with its reason
    assert len(list(out.glob("base.reference-*.exact.shards/manifest.json"))) == 1  # named by subsample and scorer
    edges = np.load(out / "edge_tests.npz")  # every edge's test, not just the report's top tables
    assert edges["edge"].tolist() == base.edge_names() and edges["q_value"].shape == (base.graph.n_edges,)
    assert {"side": "both", "id": "q4", "reason": "answered incorrectly by base"} in comparison["dropped"]
    assert {"side": "both", "id": "q5", "reason": "length rule: length window"} in comparison["dropped"]
    assert "- questions: 1 left out (length rule: length window): q5" in report
    assert run["template"]["name"] == "plain" and not run["template"]["chat"]
    assert "**base** = `" in report and f"{run_files['tuned'].parent.name}/tuned`" in report  # the models' names


def test_cross_scoring_another_reference_and_sampling(run_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_caches(run_files, out)
    options = ("--n", "3", "--reference-scorer", "eap-ig-inputs", "--cross-score")
    assert main(cli_args(run_files, out, *options)) == 0
    # started again, the re-scored subsample comes from its shards: the reference scorer does not run
    calls = []
    real = EAPIGInputs.score_batch
    monkeypatch.setattr(EAPIGInputs, "score_batch", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    assert main(cli_args(run_files, out, *options)) == 0 and calls == []
    monkeypatch.undo()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["reference_scorer"] == "eap-ig-inputs" and run["config"]["cross_score"]
    assert cd.EdgeScores.load(out / "base.reference.cdiff").metadata["method"] == "eap-ig-inputs"
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["robustness"]["reference"] == "eap-ig-inputs"
    # 4 questions pass the length rules and 3 are drawn: the fourth is listed as not sampled
    assert [d["reason"] for d in comparison["dropped"] if d["reason"].startswith("not sampled")] == \
        ["not sampled (n=3, seed 42)"]
    # cross-scoring: each model on the other's answers, on the same questions and T_cut
    t_cut = run["selection"]["t_cut"]
    for model_side, text_side in (("base", "tuned"), ("tuned", "base")):
        crossed = cd.EdgeScores.load(out / f"{model_side}-on-{text_side}-text.cdiff")
        own = cd.EdgeScores.load(out / f"{model_side}.cdiff")
        assert crossed.sample_ids == own.sample_ids and crossed.metadata["answers"] == f"the {text_side} model's"
        model = cd.load_model(run_files[model_side], device="cpu")
        first = int(crossed.sample_ids[0][1:])
        answer = answer_ids(text_side, first, ANSWER_LENGTHS[text_side][first])[:t_cut]
        assert answer != answer_ids(model_side, first, ANSWER_LENGTHS[model_side][first])[:t_cut]
        direct = cd.attribute(model, cd.AttributionGraph.from_model(model, level="layer"),
                              cd.make_batches(model.tokenizer, [f"w{first} w{first + 1} w{first + 2}"], [answer]),
                              objective="answer_nll", progress=False)
        assert torch.allclose(crossed.per_sample[0], direct.per_sample[0], atol=1e-6)
    cross = json.loads((out / "cross.json").read_text())
    assert list(cross) == ["own", "model|base text", "model|tuned text", "text|base model", "text|tuned model"]
    report = (out / "report.md").read_text()
    assert "## Cross-scoring: model effect and text effect" in report and "text effect in base: B(b) -> B(t)" in report
    # the same run without the check and cross-scoring: their old result files go, the report says why
    assert main(cli_args(run_files, out, "--n", "3", "--no-robustness")) == 0
    assert "**Scorer robustness**: not run (--no-robustness)." in (out / "report.md").read_text()
    for name in ("base.reference.cdiff", "tuned.reference.cdiff", "cross.json", "base-on-tuned-text.cdiff"):
        assert not (out / name).exists()
    assert json.loads((out / "comparison.json").read_text())["robustness"] is None


def test_interrupted_run_resumes_to_the_same_result(run_files, tmp_path, monkeypatch):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for out in (reference, interrupted):
        write_caches(run_files, out)
    assert main(cli_args(run_files, reference)) == 0

    real, calls = EAP.score_batch, []

    def crash_on_third(self, *args, **kwargs):  # one call per scored batch (= per shard)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EAP, "score_batch", crash_on_third)
    assert main(cli_args(run_files, interrupted)) == 130  # base shards 0, 1 done; tuned shard 0 interrupted
    assert sorted(p.name for p in interrupted.glob("base-*.eap.shards/shard-*")) == ["shard-00000.safetensors",
                                                                                     "shard-00001.safetensors"]
    calls.clear()
    monkeypatch.setattr(EAP, "score_batch", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    assert main(cli_args(run_files, interrupted)) == 0
    assert len(calls) == 2  # only the two tuned shards were scored again
    for name in ("base.cdiff", "tuned.cdiff"):
        a, b = cd.EdgeScores.load(reference / name), cd.EdgeScores.load(interrupted / name)
        assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.objective_values, b.objective_values)
    assert json.loads((reference / "comparison.json").read_text())["rows"] == \
        json.loads((interrupted / "comparison.json").read_text())["rows"]


def test_eap_memory_options_reach_the_scorer(run_files, tmp_path):
    """--positions-per-pass and --contraction-dtype: recorded in run.json and the shard manifest, and in effect."""
    runs = {"default": (), "options": ("--positions-per-pass", "4", "--contraction-dtype", "bfloat16")}
    scores = {}
    for name, options in runs.items():
        out = tmp_path / name
        write_caches(run_files, out)
        assert main(cli_args(run_files, out, *options)) == 0
        scores[name] = cd.EdgeScores.load(out / "base.cdiff").per_sample
    config = json.loads((tmp_path / "options" / "run.json").read_text())["config"]
    assert config["positions_per_pass"] == 4 and config["contraction_dtype"] == "bfloat16"
    assert config["scorer"] == "eap" and "method" not in config and config["level"] == "layer"
    assert PipelineConfig.from_dict(config) == PipelineConfig(**config)
    manifest = json.loads(next((tmp_path / "options").glob("base-*.eap.shards/manifest.json")).read_text())
    assert manifest["identity"]["scorer"]["options"] == {"contraction_dtype": "torch.bfloat16"}  # windows: memory only
    difference = (scores["options"] - scores["default"]).norm() / scores["default"].norm()
    assert 1e-5 < difference < 1e-2  # the bfloat16 rounding, and nothing more


def test_method_is_a_deprecated_alias_of_scorer_in_the_config():
    with pytest.deprecated_call(match="method= is deprecated .* pass scorer= instead"):
        config = PipelineConfig(method="exact")
    assert config.scorer == "exact" and config.make_scorer() == "exact"
    with pytest.deprecated_call(match="method= is deprecated"):  # an old run.json's "config"
        assert PipelineConfig.from_dict({"alpha": 0.5, "method": "exact"}) == PipelineConfig(alpha=0.5, scorer="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PipelineConfig(scorer="exact").scorer == "exact"  # no warning for the new name
    with pytest.raises(cd.ArgumentError, match=r"unknown pipeline settings \['scorerr'\]"):
        PipelineConfig.from_dict({"scorerr": "eap"})
    eap = PipelineConfig(positions_per_pass=4).make_scorer()
    assert isinstance(eap, EAP) and eap.positions_per_pass == 4


def test_score_answers_method_is_a_deprecated_alias(monkeypatch):
    from circuitdiff import pipeline

    seen = []

    def attribute(*args, **kwargs):  # records the scorer passed on (as scorer= or, until attribute switches, method=)
        seen.append(kwargs.get("scorer", kwargs.get("method")))
        return SimpleNamespace(metadata={})

    monkeypatch.setattr(pipeline, "attribute", attribute)
    monkeypatch.setattr(pipeline, "make_batches", lambda *args, **kwargs: [])
    model = SimpleNamespace(tokenizer=None)
    pipeline.score_answers(model, None, ["p"], [[1]], t_cut=1, scorer="exact")
    with pytest.deprecated_call(match="method= is deprecated"):
        pipeline.score_answers(model, None, ["p"], [[1]], t_cut=1, method="eap-ig-inputs")
    assert seen == ["exact", "eap-ig-inputs"]


@pytest.mark.slow  # a full run first; -m "not slow" has compare-scores in test_pairing, the run above
def test_compare_scores_command(run_files, tmp_path, capsys):
    out = tmp_path / "run"
    write_caches(run_files, out)
    assert main(cli_args(run_files, out)) == 0
    capsys.readouterr()
    assert main(["compare-scores", str(out / "base.cdiff"), str(out / "tuned.cdiff"), "--out", str(tmp_path / "c")]) == 0
    assert "| intensity |" in capsys.readouterr().out
    assert (tmp_path / "c" / "comparison.json").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (("--alpha", "1.5"), "alpha"),
    (("--delta", "0"), "delta"),
    (("--beta", "0.99", "--gamma", "1.0"), "length window rule removed the last"),
    (("--intervention", "mean"), "intervention='zero' only"),
    (("--scorer", "exact", "--contraction-dtype", "bfloat16"), "options of the eap scorer"),
    (("--positions-per-pass", "0"), "positions_per_pass must be a positive integer"),
])
def test_user_errors_exit_2_without_traceback(run_files, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    write_caches(run_files, out)
    assert main(cli_args(run_files, out, *extra)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("circuitdiff: error:") and message in last and "Traceback" not in err


def test_missing_inputs(run_files, tmp_path, capsys):
    args = cli_args(run_files, tmp_path / "out")
    args[args.index("--questions") + 1] = str(tmp_path / "none.jsonl")
    assert main(args) == 2 and "no questions file" in capsys.readouterr().err
    args = cli_args(run_files, tmp_path / "out")
    args[1] = str(tmp_path / "no-such-checkpoint")
    assert main(args) == 2 and "not a checkpoint directory" in capsys.readouterr().err


def test_disagreeing_tokenizers_are_refused(run_files, tmp_path, capsys):
    other = tm.write_checkpoint("llama", tmp_path / "other", seed=2)
    vocab = json.loads((other / "tokenizer.json").read_text())
    words = vocab["model"]["vocab"]
    words["w0"], words["w1"] = words["w1"], words["w0"]  # same ids, different words
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    files = {**run_files, "tuned": other}
    out = tmp_path / "run"
    write_caches(files, out)
    assert main(cli_args(files, out)) == 2
    assert "tokenizers disagree" in capsys.readouterr().err


@pytest.mark.slow  # two subprocesses
def test_cli_subprocess_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "circuitdiff.cli", "compare-scores", str(tmp_path / "a.cdiff"),
                             str(tmp_path / "b.cdiff")], capture_output=True, text=True)
    assert result.returncode == 2 and "no scores file" in result.stderr and "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "circuitdiff.cli", "compare", "--help"], capture_output=True,
                               text=True)
    assert help_text.returncode == 0 and "--alpha" in help_text.stdout


def test_score_command(run_files, tmp_path):
    out = tmp_path / "one"
    write_caches(run_files, out)
    (out / "base.generations.jsonl").rename(out / "model.generations.jsonl")
    args = ["score", str(run_files["base"]), "--questions", str(run_files["questions"]), "--out", str(out),
            "--alpha", "0.5", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["correct"] == 5 and run["counts"]["scored"] == 5  # lengths 9-13: all in the window
    scores = cd.EdgeScores.load(out / "scores.cdiff")
    assert scores.n_samples == 5 and run["metrics"]["intensity"] > 0


def test_real_generation_with_no_correct_answer(run_files, tmp_path, capsys):
    """Without stub caches the tiny random models really generate (and get nothing right)."""
    args = cli_args(run_files, tmp_path / "run")
    args[args.index("--max-new-tokens") + 1] = "3"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 2
    assert "no questions to select from" in capsys.readouterr().err
    for side in ("base", "tuned"):
        lines = (tmp_path / "run" / f"{side}.generations.jsonl").read_text().splitlines()
        assert len(lines) == 6 and all(len(json.loads(line)["answer_ids"]) <= 3 for line in lines)
        cut = sum(len(json.loads(line)["answer_ids"]) == 3 for line in lines)  # no end token within 3 tokens
        warned = [str(w.message) for w in caught if str(w.message).startswith(f"{side}: ")]
        assert len(warned) == (1 if cut else 0)
        assert all(w.startswith(f"{side}: {cut} of 6 answers reached max_new_tokens=3 without an end token")
                   for w in warned)


@pytest.mark.slow
def test_killed_process_resumes(run_files, tmp_path):
    """A hard kill (SIGKILL, no cleanup) in the middle of scoring; the rerun equals an uninterrupted run."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for out in (reference, killed):
        write_caches(run_files, out)
    assert main(cli_args(run_files, reference)) == 0
    script = (
        "import os, signal, sys\n"
        "from circuitdiff.cli import main\n"
        "from circuitdiff.scorers.eap import EAP\n"
        "real, calls = EAP.score_batch, []\n"
        "def score_batch(self, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, *a, **k)\n"
        "EAP.score_batch = score_batch\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *cli_args(run_files, killed)], capture_output=True)
    assert result.returncode == -9  # killed, mid-run
    assert not (killed / "comparison.json").exists() and len(list(killed.glob("base-*.eap.shards/shard-*"))) == 2
    assert main(cli_args(run_files, killed)) == 0
    for name in ("base.cdiff", "tuned.cdiff"):
        assert torch.equal(cd.EdgeScores.load(reference / name).per_sample, cd.EdgeScores.load(killed / name).per_sample)


def test_template_and_dataset_options_reach_the_questions(run_files, tmp_path, capsys):
    """--dataset-format reads GSM8K records, --template renders them; a chat template the tokenizer lacks is refused
    before any model loads, and the output folder is not left behind."""
    gsm8k = tmp_path / "mine.jsonl"
    gsm8k.write_text('{"question": "Ann has 3 boxes of 6 pens?", "answer": "3 * 6 = 18\\n#### 18"}\n'
                     '{"question": "1,000 + 234?", "answer": "#### 1,234"}\n')
    args = ["compare", str(run_files["base"]), str(run_files["tuned"]), "--questions", str(gsm8k), "--device", "cpu",
            "--max-new-tokens", "16"]
    assert main([*args, "--out", str(tmp_path / "plan"), "--dataset-format", "gsm8k", "--template",
                 "mistral-math-shepherd", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "- questions: 2 from" in plan and "template 'mistral-math-shepherd'" in plan
    out = tmp_path / "chat"
    assert main([*args, "--out", str(out), "--dataset-format", "gsm8k", "--template", "chat", "--quiet"]) == 2
    assert "needs a chat template" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--out", str(out), "--template", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err and not out.exists()


def test_a_run_that_fails_before_writing_leaves_no_folder_but_keeps_an_existing_one(run_files, tmp_path):
    config = PipelineConfig(device="cpu", robustness=False, progress=False)
    for out, existed in ((tmp_path / "new" / "run", False), (tmp_path / "mine", True)):
        if existed:
            out.mkdir()
        with pytest.raises(cd.MissingPathError, match="absent-org/absent"):
            run_compare(run_files["base"], "absent-org/absent", run_files["questions"], out, config,
                        log=lambda _: None)
        assert out.exists() == existed


def test_the_command_line_switches_off_checkpoint_loading_bars(run_files, tmp_path, monkeypatch, capsys):
    """transformers' per-model loading bars would bury circuitdiff's own; HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    args = ["score", str(run_files["base"]), "--questions", str(run_files["questions"]), "--out", str(tmp_path),
            "--device", "cpu", "--dry-run"]
    seen = []
    monkeypatch.setattr("circuitdiff.pipeline.plan_run",
                        lambda *a, **k: seen.append(transformers_logging.is_progress_bar_enabled()) or "plan")
    try:
        transformers_logging.enable_progress_bar()
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
        assert main(args) == 0 and seen.pop()  # kept on
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
        assert main(args) == 0 and not seen.pop()  # off during the run
        assert transformers_logging.is_progress_bar_enabled()  # and on again for the caller
    finally:
        transformers_logging.enable_progress_bar()
    capsys.readouterr()


def test_a_grader_must_be_a_registered_name(tmp_path):
    config = PipelineConfig(device="cpu", grader=lambda output, reference: (None, False))
    with pytest.raises(cd.ArgumentTypeError, match="registered grader's name"):
        config.validate()
    with pytest.raises(cd.UnknownNameError, match="boxed"):
        PipelineConfig(device="cpu", grader="nope").validate()


def test_a_run_refused_by_the_lock_leaves_the_holders_folder_alone(tmp_path):
    from circuitdiff.pipeline import output_lock

    out = tmp_path / "shared"
    out.mkdir()
    with output_lock(out, remove_if_left_empty=True):  # the first run holds the lock, nothing written yet
        with pytest.raises(cd.RunLockedError):
            with output_lock(out, remove_if_left_empty=True):
                pass
        assert out.is_dir()
    with pytest.raises(KeyboardInterrupt):  # the holder itself fails before writing: its new folder goes
        with output_lock(out, remove_if_left_empty=True):
            raise KeyboardInterrupt
    assert not out.exists()


def test_the_vllm_backend_is_refused_off_cuda_and_unknown_backends_are_named():
    with pytest.raises(cd.ArgumentError, match="CUDA only"):
        PipelineConfig(device="cpu", generation_backend="vllm").validate()
    with pytest.raises(cd.ArgumentError, match="unknown generation backend 'sglang'"):
        PipelineConfig(device="cpu", generation_backend="sglang").validate()
