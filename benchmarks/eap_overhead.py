"""EAP cost against a plain forward+backward pass of the same model and batch.

Prints, measured side by side in one run (medians of interleaved repeats):

- time ratio (one-batch ``cd.attribute`` call) / (plain forward+backward, no hooks,
  no parameter gradients) for intervention "zero" and "patching", at head and layer
  level, and the cost of a forward pass alone (the floor patching adds); zero ablation
  with EAP's bfloat16 contraction too (``contraction_dtype=torch.bfloat16``, modes
  ``<level>:zero:bfloat16``);
- the same for one batch scored through a bound run (``graph.bind(...)``, then
  ``scorer.score_batch``; modes ``<level>:<intervention>:batch``): what every batch of a
  many-batch call costs, without the call's fixed costs (the run's binding and, above
  all, the fingerprint of the weights that binds the result to them, recomputed in
  every call; see ``benchmarks/fingerprint_cost.py``);
- EAP runs the scorers' default attention, torch's fused kernel where the model allows it
  (``fused_attention=None``), so its ratios are against a plain pass with the same fused
  attention (mode ``plain:fused``), and after a slash against the plain pass as the bridge
  runs it (eager attention, mode ``plain``);
- peak memory of PyTorch tensors allocated by each pass (profiler allocation events
  on CPU, ``max_memory_allocated`` on CUDA), next to the goal "plain peak + source
  buffer + one layer's transients".

Goals (issue 24, llama-512): head level <= 1.25x time for zero and <= 1.6x for patching, layer
level <= 1.15x and <= 1.55x (issue 2 had 1.25x and 1.6x for both); memory within the goal.

Old against new (``--baseline REF``): the same passes with circuitdiff as of git
commit ``REF`` and with this checkout, each side in its own worker process (model loaded
once), the repeats interleaved pass by pass between the two sides; prints both medians and
new / old.

    python benchmarks/eap_overhead.py                    # both CPU configurations
    python benchmarks/eap_overhead.py --config gpt2-50k --repeats 15
    python benchmarks/eap_overhead.py --baseline eedab3c --repeats 15   # old vs new
    python benchmarks/eap_overhead.py --config llama-512 --batch 1 --pos 1024 --repeats 5   # a long sequence
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import circuitdiff as cd  # noqa: E402

CONFIGS = {
    # The doc's CPU speed reference: GPT-2 shape with its real 50k vocabulary.
    "gpt2-50k": dict(arch="gpt2", vocab=50257),
    # A harder case for the ratio: a Llama with a small vocabulary, so the
    # unembedding does not dominate the plain pass.
    "llama-512": dict(arch="llama", vocab=512),
    # The families added since (issue 21), each a tiny row beside the others.
    "qwen3-512": dict(arch="qwen3", vocab=512),
    "llama3-512": dict(arch="llama3", vocab=512),
    "phi3-512": dict(arch="phi3", vocab=512),
    # mixture of experts: 4 experts of d_mlp 2 * d_model, top-2 routed (the dense rows' MLP work per token)
    "qwen3moe-512": dict(arch="qwen3_moe", vocab=512),
    "mixtral-512": dict(arch="mixtral", vocab=512),
    # post-norm families (layer level only)
    "olmo2-512": dict(arch="olmo2", vocab=512),
    "gemma2-512": dict(arch="gemma2", vocab=512),
}
D_MODEL, N_LAYERS, N_HEADS, BATCH, POS, ANSWER = 256, 4, 8, 8, 64, 8
GOALS = {("head", "zero"): 1.25, ("head", "patching"): 1.6, ("layer", "zero"): 1.15, ("layer", "patching"): 1.55}


def build_checkpoint(name: str, directory: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MixtralConfig, Olmo2Config,
                              Phi3Config, PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig)

    spec = CONFIGS[name]
    torch.manual_seed(0)
    if spec["arch"] == "gpt2":
        config = GPT2Config(vocab_size=spec["vocab"], n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                            n_positions=POS + 1)
    else:
        shape = dict(vocab_size=spec["vocab"], hidden_size=D_MODEL, intermediate_size=4 * D_MODEL,
                     num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
                     max_position_embeddings=POS + 1)
        if spec["arch"] == "qwen3":
            config = Qwen3Config(head_dim=D_MODEL // N_HEADS, **shape)
        elif spec["arch"] == "phi3":
            config = Phi3Config(pad_token_id=spec["vocab"] - 1, **shape)  # its default pad id is past this vocabulary
        elif spec["arch"] == "qwen3_moe":
            config = Qwen3MoeConfig(head_dim=D_MODEL // N_HEADS, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=2 * D_MODEL, norm_topk_prob=True, **shape)
        elif spec["arch"] == "mixtral":
            config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **{**shape, "intermediate_size": 2 * D_MODEL})
        elif spec["arch"] == "olmo2":
            config = Olmo2Config(pad_token_id=spec["vocab"] - 1, eos_token_id=spec["vocab"] - 1, **shape)  # defaults: past the vocabulary
        elif spec["arch"] == "gemma2":
            config = Gemma2Config(head_dim=D_MODEL // N_HEADS, **shape)
        elif spec["arch"] == "llama3":
            config = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                 **shape)
        else:
            config = LlamaConfig(**shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(spec["vocab"] - 1)} | {"[UNK]": spec["vocab"] - 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tokenizer.save_pretrained(directory)
    return directory


class Runner:
    """One model and batch; each method runs one pass."""

    def __init__(self, checkpoint: Path, device: str, dtype: torch.dtype) -> None:
        self.model = cd.load_model(checkpoint, device=device, dtype=dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        vocab = self.model.cfg.d_vocab
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (BATCH, POS + 1), generator=g)
        corrupted = torch.randint(0, vocab, (BATCH, POS), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : POS - ANSWER] = cd.IGNORE  # the objective scores an answer of ANSWER tokens
        self.batch = cd.Batch(ids[:, :POS], labels=labels, corrupted_input_ids=corrupted).to(device)
        self.objective = cd.objectives.answer_nll()
        self.device = device
        self.modes = modes(checkpoint)
        levels = [level for level in ("head", "layer") if f"{level}:zero" in self.modes]
        self.graphs = {level: cd.AttributionGraph.from_model(self.model, level=level) for level in levels}
        self.runs: dict[tuple[str, str], object] = {}
        self.eap = cd.scorers.get("eap")
        from circuitdiff.engine.bridge import Bridge  # in the checkout timed (--baseline: the old one)

        self.bridge = Bridge(self.model)

    def plain(self, fused: bool = False) -> None:
        # (a --baseline checkout's Bridge may predate fused_attention: not called for the plain pass)
        with self.bridge.fused_attention() if fused else contextlib.nullcontext():
            embeddings = self.model.embed(self.batch.input_ids).detach().requires_grad_(True)
            logits = self.model(embeddings)
            self.objective(logits, self.batch).sum().backward()

    def forward(self) -> None:
        """A forward pass without gradients: the extra cost patching pays per batch."""
        with torch.no_grad():
            self.model(self.batch.input_ids)

    def score_batch(self, level: str, intervention: str) -> None:
        """One batch through a run bound once (the engine's per-batch cost)."""
        key = (level, intervention)
        if key not in self.runs:
            self.runs[key] = self.graphs[level].bind(self.model, objective=self.objective, intervention=intervention,
                                                     progress=False)
        with self.runs[key] as run:
            self.eap.score_batch(run, self.batch, 0)

    def attribute(self, level: str, intervention: str, contraction_dtype: torch.dtype | None = None) -> None:
        eap = cd.scorers.get("eap", contraction_dtype=contraction_dtype)
        # ``scorer=`` since issue 19; a --baseline checkout may predate it
        chosen = {"scorer" if "scorer" in inspect.signature(cd.attribute).parameters else "method": eap}
        cd.attribute(self.model, self.graphs[level], [self.batch], objective=self.objective,
                     intervention=intervention, progress=False, **chosen)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def modes(checkpoint: Path) -> list[str]:
    """The passes timed: plain, forward, and EAP per level and intervention (layer level only for post-norm families)."""
    from circuitdiff.engine.architectures import FAMILIES

    config = json.loads((checkpoint / "config.json").read_text())
    family = FAMILIES.get(config["architectures"][0])
    levels = ("layer",) if getattr(family, "post_norm", False) else ("head", "layer")
    fused = config.get("attn_logit_softcapping") is None  # the fused kernel does not soft-cap (Gemma 2)
    return (["plain", "forward"] + ["plain:fused"] * fused
            + [f"{level}:{iv}" for level in levels
               for iv in ("zero", "patching", "zero:bfloat16", "zero:batch", "patching:batch")])


def compared(timed: list[str]) -> list[str]:
    """The modes ``--baseline`` times on both sides: older checkouts have no fused attention to run a plain pass with."""
    return [mode for mode in timed if mode != "plain:fused"]


def run_mode(runner: Runner, mode: str) -> None:
    name, *option = mode.split(":")
    if name in ("plain", "forward"):
        runner.plain(fused=True) if option == ["fused"] else getattr(runner, name)()
    else:
        intervention, *option = option
        if option == ["batch"]:
            runner.score_batch(name, intervention)
        else:
            runner.attribute(name, intervention, getattr(torch, option[0]) if option else None)


def time_modes(runner: Runner, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {mode: [] for mode in runner.modes}
    for mode in runner.modes:  # warm up
        run_mode(runner, mode)
    for _ in range(repeats):  # interleaved, so drift hits every mode alike
        for mode in runner.modes:
            runner.sync()
            start = time.perf_counter()
            run_mode(runner, mode)
            runner.sync()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def measure_peak(runner: Runner, mode: str) -> int:
    """Peak bytes of PyTorch tensors allocated during one pass (after a warm-up pass), above what was there.

    :func:`circuitdiff.planner.measure_peak`: ``max_memory_allocated`` on CUDA, the PyTorch
    profiler's allocation events in time order on CPU (exact for tensors, blind to the C
    allocator's caching, which makes RSS too noisy to compare passes).
    """
    run_mode(runner, mode)
    base = torch.cuda.memory_allocated() if runner.device.startswith("cuda") else 0
    return cd.planner.measure_peak(lambda: run_mode(runner, mode), runner.device) - base

def expected_extra(graph: cd.AttributionGraph, buffer_bytes: int = 4) -> tuple[int, int]:
    """(source buffer bytes, one layer's float32 receiver-gradient transient bytes)."""
    buffer = BATCH * graph.n_sources * POS * D_MODEL * buffer_bytes
    receivers = graph.group("attn", 0).columns
    layer = BATCH * (receivers.stop - receivers.start) * POS * D_MODEL * 4
    return buffer, layer


def report(name: str, checkpoint: Path, device: str, dtype: str, repeats: int) -> dict:
    runner = Runner(checkpoint, device, getattr(torch, dtype))
    medians = time_modes(runner, repeats)
    peaks = {mode: measure_peak(runner, mode) for mode in runner.modes if mode != "forward"}
    mb = 2 ** 20
    print(f"\n== {name}: {N_LAYERS} layers, d_model {D_MODEL}, {N_HEADS} heads, vocab {runner.model.cfg.d_vocab}, "
          f"batch {BATCH} x {POS} tokens (answer_nll on the last {ANSWER}), {device}, {dtype}, torch threads {torch.get_num_threads()}, "
          f"median of {repeats}")
    print(f"plain forward+backward: {medians['plain'] * 1e3:.1f} ms, peak +{peaks['plain'] / mb:.1f} MB; "
          f"forward alone (no grad): {medians['forward'] / medians['plain']:.2f}x of it")
    plain = "plain:fused" if "plain:fused" in medians else "plain"  # the attention EAP runs
    if plain != "plain":
        print(f"plain forward+backward with fused attention, as EAP runs it: {medians[plain] * 1e3:.1f} ms "
              f"({medians[plain] / medians['plain']:.2f}x), peak +{peaks[plain] / mb:.1f} MB; the ratios are against "
              "it (after the slash: against the bridge's eager plain pass)")
    print(f"{'attribute() pass':<24}{'ms':>8}{'ratio':>8}{'goal':>7}  {'peak MB':>8}{'goal MB':>9}"
          "  goal = plain + buffer + 2 x one layer's receiver gradients")
    rows = {}
    for level in runner.graphs:
        for intervention, buffer_bytes in (("zero", 4), ("patching", 4), ("zero:bfloat16", 2), ("zero:batch", 4),
                                           ("patching:batch", 4)):
            mode = f"{level}:{intervention}"
            goal = GOALS[level, intervention.split(":")[0]]
            buffer, layer = expected_extra(runner.graphs[level], buffer_bytes)
            ratio = medians[mode] / medians[plain]
            memory_goal = peaks[plain] + buffer + 2 * layer
            against_eager = f" / {medians[mode] / medians['plain']:.2f}x" if plain != "plain" else ""
            print(f"{mode:<24}{medians[mode] * 1e3:8.1f}{ratio:7.2f}x{goal:6.2f}x  {peaks[mode] / mb:8.1f}"
                  f"{memory_goal / mb:9.1f}  ({peaks[plain] / mb:.1f} + {buffer / mb:.1f} + 2 x {layer / mb:.1f})"
                  + against_eager)
            rows[mode] = {"ms": medians[mode] * 1e3, "ratio": ratio, "ratio_to_eager_plain": medians[mode] / medians["plain"],
                          "peak_bytes": peaks[mode], "memory_goal_bytes": memory_goal}
    return {"plain_ms": medians["plain"] * 1e3, "plain_peak_bytes": peaks["plain"],
            "plain_fused_ms": medians["plain:fused"] * 1e3 if "plain:fused" in medians else None, "passes": rows}


def worker(checkpoint: Path, device: str, dtype: str) -> None:
    """Load the model once, then time one pass per mode name read from stdin (prints seconds)."""
    runner = Runner(checkpoint, device, getattr(torch, dtype))
    for mode in compared(runner.modes):  # warm up
        run_mode(runner, mode)
    print("ready", Path(cd.__file__).resolve().parents[1], flush=True)
    for line in sys.stdin:
        runner.sync()
        start = time.perf_counter()
        run_mode(runner, line.strip())
        runner.sync()
        print(time.perf_counter() - start, flush=True)


def compare_with_baseline(ref: str, name: str, checkpoint: Path, device: str, dtype: str, repeats: int,
                          tmp: Path) -> dict:
    """Medians of every mode with circuitdiff at git ``ref`` (old) and this checkout (new), interleaved."""
    root = Path(__file__).resolve().parents[1]
    old_src = tmp / "baseline"
    if not old_src.exists():
        old_src.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", ref, "src/circuitdiff"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    sides = {}
    for side, src in (("old", old_src / "src"), ("new", root / "src")):
        env = {**os.environ, "PYTHONPATH": str(src)}
        sides[side] = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(checkpoint), "--device", device, "--dtype", dtype,
             "--threads", str(torch.get_num_threads()), "--batch", str(BATCH), "--pos", str(POS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for (side, process), src in zip(sides.items(), (old_src / "src", root / "src"), strict=True):
        ready = process.stdout.readline().split()  # type: ignore[union-attr]
        if ready != ["ready", str(src.resolve())]:
            raise RuntimeError(f"the {side} worker did not start with circuitdiff from {src}: {ready}")
    timed = compared(modes(checkpoint))
    times = {(side, mode): [] for side in sides for mode in timed}
    for _ in range(repeats):  # interleaved: drift hits both sides and every mode alike
        for mode in timed:
            for side, process in sides.items():
                process.stdin.write(mode + "\n")  # type: ignore[union-attr]
                process.stdin.flush()  # type: ignore[union-attr]
                times[side, mode].append(float(process.stdout.readline()))  # type: ignore[union-attr]
    for process in sides.values():
        process.stdin.close()  # type: ignore[union-attr]
        process.wait()
    medians = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"\n== {name}: circuitdiff at {ref} (old) against this checkout (new), {device}, {dtype}, "
          f"median of {repeats} interleaved repeats")
    print(f"{'pass':<20}{'old ms':>9}{'new ms':>9}{'new/old':>9}")
    rows = {}
    for mode in timed:
        old, new = medians["old", mode], medians["new", mode]
        print(f"{mode:<20}{old * 1e3:9.1f}{new * 1e3:9.1f}{new / old:8.2f}x")
        rows[mode] = {"old_ms": old * 1e3, "new_ms": new * 1e3, "new_over_old": new / old}
    return rows


def main() -> None:
    global BATCH, POS, ANSWER
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--baseline", metavar="REF", help="compare with circuitdiff at this git commit instead")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"samples per batch ({BATCH})")
    parser.add_argument("--pos", type=int, default=POS, help=f"tokens per sample ({POS}; the answer is the last 1/8)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one side of --baseline
    args = parser.parse_args()
    BATCH, POS, ANSWER = args.batch, args.pos, max(1, args.pos // 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.device, args.dtype)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.config or sorted(CONFIGS):
            checkpoint = build_checkpoint(name, Path(tmp) / name)
            if args.baseline:
                results[name] = compare_with_baseline(args.baseline, name, checkpoint, args.device, args.dtype,
                                                      args.repeats, Path(tmp))
            else:
                results[name] = report(name, checkpoint, args.device, args.dtype, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
