"""circuitdiff in one page, on a tiny random model it builds itself (no download).

    python examples/quickstart.py [--out DIR] [--arch llama|qwen3|olmo2]

1. builds a 3-layer Llama (or Qwen3, with its per-head QK-norm, or OLMo 2, with norms
   after attention and MLP) with grouped-query attention and a word-level tokenizer,
   saves it like any Hugging Face checkpoint and loads it with cd.load_model;
2. scores every edge of the finest graph the model supports (head level; layer level
   for post-norm families such as OLMo 2) with EAP (zero ablation and patching), per
   sample, with the answer-NLL objective;
3. checks the layer-level graph is the exact coarsening of the head-level one (where
   there is a head level);
4. saves the scores, loads them back and prints the strongest edges.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import circuitdiff as cd  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "plus", "is"]


def build_tiny_checkpoint(directory: Path, arch: str = "llama") -> Path:
    """A random Llama, Qwen3 or OLMo 2 (3 layers, d_model 64, 4 query / 2 key-value heads) + tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, Olmo2Config, PreTrainedTokenizerFast, Qwen3Config

    vocab = {word: i for i, word in enumerate(WORDS + ["[PAD]", "[UNK]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(directory)
    torch.manual_seed(0)
    shape = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.2,
                 pad_token_id=vocab["[PAD]"])
    config = {"qwen3": lambda: Qwen3Config(head_dim=16, **shape),
              "olmo2": lambda: Olmo2Config(eos_token_id=None, **shape),  # its default is past this vocabulary
              "llama": lambda: LlamaConfig(**shape)}[arch]()
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write quickstart.cdiff (default: a temp dir)")
    parser.add_argument("--arch", choices=["llama", "qwen3", "olmo2"], default="llama",
                        help="the tiny model's family (llama)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = cd.load_model(build_tiny_checkpoint(Path(tmp) / f"tiny-{args.arch}", args.arch), device="cpu")
        print(f"model: {cd.describe_model(model)}")

        prompts = ["two plus three is", "one plus one is", "four plus four is", "three plus five is"]
        answers = ["five", "two", "eight", "eight"]
        corrupted = ["six plus three is", "seven plus one is", "zero plus four is", "one plus five is"]
        batches = cd.make_batches(model.tokenizer, prompts, answers, corrupted_prompts=corrupted, batch_size=2)

        levels = cd.supported_levels(model)  # ("head", "layer"); ("layer",) for post-norm families
        graph = cd.AttributionGraph.from_model(model, level=levels[0])
        print(f"graph: {graph}")
        zero = cd.attribute(model, graph, batches, objective="answer_nll", intervention="zero")
        patching = cd.attribute(model, graph, batches, objective="answer_nll", intervention="patching")
        print(f"clean answer NLL per prompt: {[round(v, 3) for v in zero.objective_values.tolist()]}")

        if "head" in levels:
            layer = cd.attribute(model, graph.layer_level(), batches, objective="answer_nll", intervention="zero",
                                 progress=False)
            gap = (zero.to_layer_level().mean - layer.mean).abs().max().item()
            print(f"layer level = sum of head level: max difference {gap:.2e}")
        else:
            print("layer level only: this family normalises each layer's output, so heads do not add up")

        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "quickstart.cdiff"
        patching.save(path)
        loaded = cd.EdgeScores.load(path)
        assert torch.equal(loaded.per_sample, patching.per_sample)
        print(f"saved and reloaded {path.name}: {loaded}")

        for name, scores in (("zero ablation", zero), ("patching", patching)):
            print(f"\nstrongest edges, {name} (score = NLL(ablated) - NLL(clean), positive = edge helps):")
            for edge, value in scores.top(5):
                print(f"  {edge:<22} {value:+.4f}")


if __name__ == "__main__":
    main()
