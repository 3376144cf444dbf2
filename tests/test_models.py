"""Loading and validating models."""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm


def test_load_from_directory_is_ready(checkpoints):
    model = cd.load_model(checkpoints["qwen2"], device="cpu")
    assert not model.training
    spec = cd.describe_model(model)
    assert (spec.architecture, spec.n_layers, spec.n_heads, spec.n_kv_heads) == ("Qwen2ForCausalLM", 3, 4, 2)
    assert spec.dtype == "float32" and not spec.parallel_blocks


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_the_bridge_computes_what_hugging_face_computes(checkpoints, get_model, arch):
    """Every proof compares circuitdiff with TransformerLens's own hooks; this ties the bridge to the model itself.

    A right-padded batch of 7 tokens, longer than the tiny checkpoints' sliding windows of 3,
    which must change their logits, as Gemma 2's soft-capping must (else they would not be tested).
    """
    from transformers import AutoModelForCausalLM

    ids, mask = tm.random_ids(2, 7, seed=3), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    def hf_logits(**config) -> torch.Tensor:
        hf = AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation="eager", **config).eval()
        with torch.no_grad():
            return hf(ids, attention_mask=mask).logits

    with torch.no_grad():
        bridge = get_model(arch)(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(bridge[real], hf_logits()[real], rtol=1e-4, atol=1e-4)
    changes = {"olmo3": ["window"], "gemma2": ["window", "softcap"], "gemma3": ["window"]}.get(arch, [])
    if "window" in changes:
        full = hf_logits(layer_types=["full_attention"] * 3)
        assert (full[real] - bridge[real]).abs().max() > 1e-2
    if "softcap" in changes:
        uncapped = hf_logits(attn_logit_softcapping=None, final_logit_softcapping=None)
        assert (uncapped[real] - bridge[real]).abs().max() > 1e-1


def test_load_from_hf_model_with_in_memory_tokenizer(checkpoints):
    """An in-memory tokenizer has no name_or_path; TransformerLens would fail on it."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    vocab = {f"w{i}": i for i in range(tm.VOCAB - 1)} | {"[UNK]": tm.VOCAB - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    assert not tokenizer.name_or_path
    model = cd.load_model(hf, tokenizer=tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5)


def bos_adding_checkpoint(source, directory):
    """A copy of ``source`` whose tokenizer puts [BOS] before every text, as Llama's does."""
    import shutil

    from tokenizers import Tokenizer, processors

    shutil.copytree(source, directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    bos = tokenizer.token_to_id("[BOS]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory, bos


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_the_checkpoints_own_bos_behaviour_is_kept(checkpoints, tmp_path, arch):
    """TransformerLens makes every tokenizer with a BOS token add it; circuitdiff keeps the checkpoint's choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "w1 w2 w3"
    plain = cd.load_model(checkpoints[arch], device="cpu")
    native = AutoTokenizer.from_pretrained(checkpoints[arch])
    assert plain.tokenizer(text)["input_ids"] == native(text)["input_ids"] == [1, 2, 3]
    directory, bos = bos_adding_checkpoint(checkpoints[arch], tmp_path / arch)
    with_bos = cd.load_model(directory, device="cpu")
    assert with_bos.tokenizer(text)["input_ids"] == [bos, 1, 2, 3]
    in_memory = cd.load_model(AutoModelForCausalLM.from_pretrained(checkpoints[arch]), tokenizer=native)
    assert in_memory.tokenizer(text)["input_ids"] == [1, 2, 3]


def test_load_from_bridge_returns_it(get_model):
    model = get_model("gpt2")
    assert cd.load_model(model) is model


def test_attribution_restores_gradients_and_mode(checkpoints):
    model = cd.load_model(checkpoints["gpt2"])
    model.train()
    frozen = model.blocks[0].attn.q.original_component.weight
    frozen.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2]], [[3]])
    seen = {}

    def objective(logits, batch):  # look inside the run
        seen["training"] = model.training
        seen["param_grads"] = any(p.requires_grad for p in model.parameters())
        return cd.objectives.answer_nll()(logits, batch)

    cd.attribute(model, graph, batches, objective=objective, progress=False)
    assert seen == {"training": False, "param_grads": False}
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_missing_directory_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads weights"):
        cd.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cd.load_model(tmp_path)


def test_hf_model_without_tokenizer_is_refused(checkpoints):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    with pytest.raises(cd.UnsupportedModelError, match="needs its tokenizer"):
        cd.load_model(hf)


def test_boot_native_bridge_is_refused():
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=16, n_layers=1, n_ctx=8, d_head=4, n_heads=4, d_vocab=10)
    native = TransformerBridge.boot_native(cfg)
    with pytest.raises(cd.UnsupportedModelError, match=r"boot_native.*load it with cd.load_model\(hf_model"):
        cd.AttributionGraph.from_model(native)


def test_unvalidated_architecture_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig

    tm.save_tokenizer(tmp_path)
    config = GemmaConfig(vocab_size=tm.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(cd.UnsupportedModelError, match="'GemmaForCausalLM' has not been validated"):
        cd.load_model(hf, tokenizer=AutoTokenizer.from_pretrained(tmp_path))


@pytest.mark.parametrize("family, closest", [("qwen2_moe", "shared expert.*closest validated family is Qwen3Moe"),
                                             ("olmoe", "OLMoE.*closest validated family is Qwen3MoeForCausalLM")])
def test_families_not_yet_validated_name_the_closest_one(tmp_path, family, closest):
    from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig, Qwen2MoeConfig

    tm.save_tokenizer(tmp_path)
    shape = dict(vocab_size=tm.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    config = OlmoeConfig(**shape) if family == "olmoe" else Qwen2MoeConfig(moe_intermediate_size=16, **shape)
    hf = AutoModelForCausalLM.from_config(config)
    hf.config.architectures = [type(hf).__name__]  # what save_pretrained writes, and TransformerLens reads
    with pytest.raises(cd.UnsupportedModelError, match=f"has not been validated.*{closest}.*docs/support.md"):
        cd.load_model(hf, tokenizer=AutoTokenizer.from_pretrained(tmp_path))


def test_split_qkv_mode_is_refused(get_reference):
    with pytest.raises(cd.UnsupportedModelError, match=r"set_use_split_qkv_input\(False\)"):
        cd.describe_model(get_reference("llama"))


def test_other_objects_are_refused():
    with pytest.raises(cd.UnsupportedModelError, match="expected a transformer_lens.TransformerBridge"):
        cd.describe_model(torch.nn.Linear(2, 2))
    with pytest.raises(cd.UnsupportedModelError, match="load_model got a int"):
        cd.load_model(3)


def test_a_bfloat16_olmo_bridge_built_without_load_model_runs(checkpoints):
    """TransformerLens 4.3 keeps OLMo's rotated q and k in float32; Bridge casts them back as load_model does."""
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(checkpoints["olmo2"]), device="cpu", dtype=torch.bfloat16)
    ids = tm.random_ids(1, 5)
    with pytest.raises(RuntimeError, match="expected scalar type"):  # the TransformerLens bug this works around
        bridge(ids)
    graph = cd.AttributionGraph.from_model(bridge, level="layer")
    batch = cd.Batch(ids, labels=torch.cat([torch.full((1, 3), cd.IGNORE), ids[:, 3:]], 1))
    scores = cd.attribute(bridge, graph, [batch], objective="answer_nll", progress=False)
    assert torch.isfinite(scores.per_sample).all() and scores.per_sample.abs().sum() > 0


def test_the_pipeline_refuses_a_level_at_load_before_generating(checkpoints):
    from circuitdiff.pipeline import _load

    with pytest.raises(cd.UnsupportedModelError, match="post-norm"):
        _load(checkpoints["olmo2"], "cpu", torch.float32, "head")
    assert _load(checkpoints["olmo2"], "cpu", torch.float32, "layer") is not None
