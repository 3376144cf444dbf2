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


@pytest.mark.parametrize("intervention", ["zero", "patching"])
def test_device_map_model_scores_like_a_plain_one(checkpoints, get_model, intervention):
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny_models

    directory = checkpoints["llama"]
    plain = get_model("llama")
    # from_pretrained(device_map=...) installs no hooks when every entry is "cpu";
    # force_hooks does (what a map over several GPUs gets).
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf = dispatch_model(hf, _device_map(plain.cfg.n_layers), main_device="cpu", force_hooks=True)
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
