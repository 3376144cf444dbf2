"""Models dispatched over devices with accelerate (``device_map``) score like plain ones.

On CPU every device is "cpu"; ``dispatch_model(force_hooks=True)`` still installs accelerate's hooks (inputs and
outputs of every layer go through ``AlignDevicesHook``); the cross-device moves
themselves need a GPU (see docs: models larger than one GPU). Same weights, same
arithmetic: scores agree to float32 rounding (rtol=1e-5, atol=1e-6 x max |score|).
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd

pytest.importorskip("accelerate")


def _device_map(n_layers: int) -> dict[str, str]:
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    return {name: "cpu" for name in names + [f"model.layers.{i}" for i in range(n_layers)]}


def _dispatched(directory, n_layers: int):
    """The checkpoint as a Hugging Face model with accelerate's device hooks on every layer.

    from_pretrained(device_map=...) installs no hooks when every entry is "cpu";
    force_hooks does (what a map over several GPUs gets).
    """
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return dispatch_model(hf, _device_map(n_layers), main_device="cpu", force_hooks=True)


def _scores(model, level: str, seed: int, **kwargs) -> cd.EdgeScores:
    """answer_nll scores of two random samples (4 prompt + 3 answer tokens)."""
    import tiny_models

    ids = tiny_models.random_ids(2, 7, seed=seed).tolist()
    batches = cd.make_batches(model.tokenizer, [r[:4] for r in ids], [r[4:] for r in ids], batch_size=2)
    return cd.attribute(model, cd.AttributionGraph.from_model(model, level=level), batches,
                        objective="answer_nll", progress=False, **kwargs)


@pytest.mark.parametrize("intervention", ["zero", "patching"])
def test_device_map_model_scores_like_a_plain_one(checkpoints, get_model, intervention):
    from transformers import AutoTokenizer

    import tiny_models

    directory = checkpoints["llama"]
    plain = get_model("llama")
    hf = _dispatched(directory, plain.cfg.n_layers)
    calls = []
    for name, module in (("layer 0", hf.model.layers[0]), ("lm_head", hf.lm_head)):
        hook = module._hf_hook
        hook.pre_forward = lambda m, *a, _f=hook.pre_forward, _n=name, **k: (calls.append(_n), _f(m, *a, **k))[1]
    dispatched = cd.load_model(hf, tokenizer=AutoTokenizer.from_pretrained(directory))

    ids = tiny_models.random_ids(4, 7, seed=3).tolist()
    prompts, corrupted, answers = [r[:4] for r in ids], [r[1:5] for r in ids], [r[4:] for r in ids]
    kwargs = dict(objective="answer_nll", intervention=intervention, progress=False)
    for level in ("head", "layer"):
        results = []
        for model in (plain, dispatched):
            graph = cd.AttributionGraph.from_model(model, level=level)
            batches = cd.make_batches(model.tokenizer, prompts, answers, corrupted_prompts=corrupted, batch_size=2)
            results.append(cd.attribute(model, graph, batches, **kwargs))
        expected, got = results
        scale = float(expected.per_sample.abs().max())
        torch.testing.assert_close(got.objective_values, expected.objective_values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.per_sample, expected.per_sample, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got.mean, expected.mean, rtol=1e-5, atol=1e-6 * scale)
    assert set(calls) == {"layer 0", "lm_head"}  # accelerate's hooks ran in the bridge's passes


def test_load_model_passes_device_map_to_the_loader(checkpoints, get_model, monkeypatch):
    """``load_model(path, device_map=...)`` loads through accelerate's placement and scores like a plain load."""
    from transformer_lens import TransformerBridge

    plain = get_model("llama")
    device_map = _device_map(plain.cfg.n_layers)
    boot = TransformerBridge.boot_transformers
    seen = []
    monkeypatch.setattr(TransformerBridge, "boot_transformers",
                        staticmethod(lambda *a, **k: (seen.append(k), boot(*a, **k))[1]))
    placed = cd.load_model(checkpoints["llama"], device_map=device_map, max_memory={"cpu": "2GiB"})
    assert seen[0]["device_map"] == device_map and seen[0]["max_memory"] == {"cpu": "2GiB"}
    assert "device" not in seen[0]
    torch.testing.assert_close(_scores(placed, "head", seed=4).per_sample, _scores(plain, "head", seed=4).per_sample)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="cpu", device_map="auto"), "either device or device_map"),
    (dict(max_memory={"cpu": "1GiB"}), "max_memory needs device_map"),
])
def test_load_model_refuses_conflicting_placement(checkpoints, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cd.load_model(checkpoints["llama"], **kwargs)


def test_device_map_is_for_paths_only(get_model):
    with pytest.raises(ValueError, match="apply to a checkpoint path"):
        cd.load_model(get_model("llama"), device_map="auto")


def test_ablation_refuses_a_model_spread_over_devices():
    """exact / faithfulness / ACDC are not device-map aware: a clear refusal, not a device mismatch deep inside."""
    import types

    from circuitdiff.engine.ablation import EdgeAblation

    spread = [torch.zeros(1), torch.zeros(1, device="meta")]
    context = types.SimpleNamespace(model=types.SimpleNamespace(parameters=lambda: iter(spread)))
    with pytest.raises(cd.UnsupportedModelError, match="spread over cpu, meta .*scorer='eap'"):
        EdgeAblation(context, None, 0)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_device_map_model_eap_ig_scores_like_a_plain_one(checkpoints, get_model, method):
    from transformers import AutoTokenizer

    directory = checkpoints["llama"]
    plain = get_model("llama")
    dispatched = cd.load_model(_dispatched(directory, plain.cfg.n_layers),
                               tokenizer=AutoTokenizer.from_pretrained(directory))
    expected, got = (_scores(model, "layer", seed=5, method=cd.scorers.get(method, steps=2))
                     for model in (plain, dispatched))
    scale = float(expected.per_sample.abs().max())
    torch.testing.assert_close(got.per_sample, expected.per_sample, rtol=1e-5, atol=1e-6 * scale)
