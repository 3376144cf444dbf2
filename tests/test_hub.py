"""Models by Hub id from a local Hugging Face cache (never downloaded), and the paper's pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.hub import PAIRS, get_pair, is_hub_id, resolve_checkpoint
from circuitdiff.pipeline import PipelineConfig, run_compare

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root: Path, repo_id: str, checkpoint: Path, revision: str = REVISION) -> Path:
    """The on-disk layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV/}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # resolution is offline whatever the environment says
    return root


def test_a_cached_hub_id_loads_the_same_model_as_its_directory(tmp_path, hub_cache):
    checkpoint = tm.write_checkpoint("llama", tmp_path / "llama")
    snapshot = fake_cache(hub_cache, "tiny-org/tiny-llama", checkpoint)
    assert resolve_checkpoint("tiny-org/tiny-llama") == snapshot
    assert resolve_checkpoint(f"tiny-org/tiny-llama@{REVISION}") == snapshot
    by_id, by_path = cd.load_model("tiny-org/tiny-llama", device="cpu"), cd.load_model(checkpoint, device="cpu")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(by_id(ids), by_path(ids))


def test_a_model_not_in_the_cache_is_refused_with_the_command_to_fetch_it(hub_cache):
    with pytest.raises(cd.MissingPathError, match=r"nothing is downloaded.*hf download other-org/absent"):
        resolve_checkpoint("other-org/absent")
    with pytest.raises(cd.MissingPathError, match="--revision v2"):
        resolve_checkpoint("other-org/absent@v2")


def test_a_partial_snapshot_is_refused(tmp_path, hub_cache):
    checkpoint = tm.write_checkpoint("gpt2", tmp_path / "gpt2")
    snapshot = fake_cache(hub_cache, "tiny-org/partial", checkpoint)
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(cd.MissingPathError, match="no model weights"):
        resolve_checkpoint("tiny-org/partial")
    (snapshot / "config.json").unlink()
    with pytest.raises(cd.MissingPathError, match="no config.json"):
        resolve_checkpoint("tiny-org/partial")


def test_a_local_directory_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch):
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("org/name") and resolve_checkpoint("org/name") == Path("org/name")
    assert is_hub_id("org/other") and not is_hub_id("a/b/c") and not is_hub_id("/abs/path")


def test_the_pipeline_names_the_missing_hub_model_before_loading_anything(tmp_path, hub_cache):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "1+1?", "answer": "2"}\n')
    config = PipelineConfig(device="cpu", robustness=False, progress=False)
    with pytest.raises(cd.MissingPathError, match="hf download absent/base"):
        run_compare("absent/base", "absent/tuned", questions, tmp_path / "out", config, log=lambda _: None)


def test_the_paper_pairs():
    assert set(PAIRS) == {"deepseek-math-grpo", "math-shepherd-ppo", "qwen2.5-dpo", "r1-distill-acereason"}
    pair = get_pair("deepseek-math-grpo")
    assert (pair.base, pair.tuned) == ("deepseek-ai/deepseek-math-7b-instruct", "deepseek-ai/deepseek-math-7b-rl")
    assert get_pair("r1-distill-acereason").tuned == "nvidia/AceReason-Nemotron-7B"
    assert all(is_hub_id(p.base) and is_hub_id(p.tuned) for p in PAIRS.values())
    with pytest.raises(cd.UnknownNameError, match="available: deepseek-math-grpo"):
        get_pair("gpt5-rlhf")


def test_dry_run_prints_the_plan_without_loading_or_writing(run_files, tmp_path, hub_cache, capsys, monkeypatch):
    from circuitdiff.cli import main

    fake_cache(hub_cache, "tiny-org/tuned", run_files["tuned"])
    out = tmp_path / "never-created"
    loads = []
    monkeypatch.setattr("circuitdiff.pipeline.load_model", lambda *a, **k: loads.append(a))
    args = ["compare", str(run_files["base"]), "tiny-org/tuned", "--questions", str(run_files["questions"]),
            "--out", str(out), "--level", "head", "--max-new-tokens", "20", "--alpha", "0.5", "--batch-size", "2",
            "--device", "cpu", "--dry-run"]
    assert main(args) == 0
    plan = capsys.readouterr().out
    model = cd.load_model(run_files["base"], device="cpu")
    graph = cd.AttributionGraph.from_model(model, level="head")
    assert not out.exists() and not loads
    assert "LlamaForCausalLM" in plan and "tiny-org/tuned" in plan and str(hub_cache) in plan
    assert f"{graph.n_edges:,} edges" in plan and "- questions: 6 from" in plan
    longest = max(len(model.tokenizer(f"w{i} w{i + 1} w{i + 2}")["input_ids"]) for i in range(6))
    assert f"batch 2 x {longest + 10} tokens" in plan  # the longest prompt + alpha * max_new_tokens
    assert "at most 20 new tokens" in plan
    # the peak: the base model's attribution batch plus the tuned model's weights (both stay loaded)
    configs = [json.loads((run_files[side] / "config.json").read_text()) for side in ("base", "tuned")]
    peak = cd.estimate_memory(configs[0], graph, batch_size=2, seq_len=longest + 10, dtype=torch.float32).total
    weights = cd.ModelShape.from_config(configs[1], torch.float32).parameter_bytes()
    assert f"**{(peak + weights) / 2**20:.1f} MiB**, the other model's weights ({weights / 2**20:.1f} MiB)" in plan
    assert main(["compare", "--pair", "qwen2.5-dpo", "--questions", str(run_files["questions"]), "--out", str(out),
                 "--dry-run", "--device", "cpu"]) == 2
    assert "hf download RLHFlow/Qwen2.5-7B-SFT" in capsys.readouterr().err and not out.exists()


def test_pair_and_checkpoints_are_exclusive_and_one_checkpoint_is_not_enough(tmp_path, capsys):
    from circuitdiff.cli import main

    base = ["--questions", "q.jsonl", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(["compare", "a/b", "--pair", "qwen2.5-dpo", *base]) == 2
    assert "either --pair NAME or the two checkpoints" in capsys.readouterr().err
    assert main(["compare", "a/b", *base]) == 2
    assert "compare needs two checkpoints" in capsys.readouterr().err
    assert main(["compare", "--pair", "nope", *base]) == 2
    assert "unknown model pair 'nope'" in capsys.readouterr().err


def test_a_pair_supplies_its_template_and_answer_length(tmp_path, hub_cache, run_files, capsys):
    """--pair fills in what the options leave unset: the pair's Hub ids, template and max_new_tokens."""
    from circuitdiff.cli import main

    pair = get_pair("deepseek-math-grpo")
    for side, repo in (("base", pair.base), ("tuned", pair.tuned)):
        snapshot = fake_cache(hub_cache, repo, run_files[side])
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
        (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["compare", "--pair", pair.name, "--questions", str(run_files["questions"]), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--dry-run"]
    assert main([*args, "--max-new-tokens", "16"]) == 0
    plan = capsys.readouterr().out
    assert "template 'deepseek-math'" in plan and "at most 16 new tokens" in plan and pair.tuned in plan
    assert main(args) == 2  # the pair's 1024 new tokens do not fit the tiny models' context
    assert "max_new_tokens=1024" in capsys.readouterr().err


def test_an_invalid_hub_id_is_a_clear_error(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("models/base--v2", "org/name..x"):
        with pytest.raises(cd.MissingPathError, match="neither a local path nor a valid Hub id"):
            resolve_checkpoint(name)
