"""EAP at 7B scale on one GPU: time, tokens/s and peak memory against a plain pass and TL's flags.

Random-weight Hugging Face models with the shapes of two 7B checkpoints are built
directly on the GPU in bfloat16 (nothing is downloaded; a throwaway word-level
tokenizer is written to a temporary directory):

- ``deepseek-math-7b``: LlamaForCausalLM, 30 layers, d_model 4096, 32 heads (no GQA),
  d_mlp 11008, vocabulary 102400;
- ``qwen2.5-7b``: Qwen2ForCausalLM (q/k/v biases), 28 layers, d_model 3584, 28 query
  heads, 4 key/value heads, d_mlp 18944, vocabulary 152064.

For each model, graph level (layer, head) and sequence length (512, 2048), batch 1,
random token ids, objective ``answer_nll`` on the last quarter of the tokens, it
measures (1 warm-up, then the median of ``--repeats`` timed passes, each between
``torch.cuda.synchronize()`` calls; then one more pass for the peak):

- ``eap``: one ``cd.attribute(..., scorer="eap", intervention="zero")`` call
  (per-sample scores kept; ``--positions-per-pass``, ``--contraction-dtype``,
  ``--checkpoint-blocks``, ``--positions-per-chunk`` and ``--[no-]fused-attention`` set the
  scorer's options (the plain pass runs the same attention as EAP: fused by default, the
  bridge's eager attention with ``--no-fused-attention``), and
  ``--contraction-dtype float32 bfloat16`` measures both side by side): seconds per
  sample, tokens/s, peak memory, and the memory planner's estimate against that peak
  (``estimate_error``); with ``--profile``, one
  more profiled pass of each kind, reporting the time under circuitdiff's profiler labels
  (per-head outputs, receiver gradients, contractions) and the operators that took longest;
- ``plain``: a forward+backward of the same model and batch, no hooks, no parameter
  gradients, the same objective (the backward starts from input embeddings that
  require grad), and the ratio eap / plain (``--skip-plain`` leaves it out, for lengths
  where it cannot fit);
- ``tl_flags``: the same bridge with TransformerLens's ``set_use_split_qkv_input``,
  ``set_use_attn_result`` and ``set_use_hook_mlp_in`` switched on (what EAP-IG and the
  paper's code run on), doing the same zero-ablation EAP the way those codes do: forward
  hooks write every source's output (``hook_result`` per head, ``hook_mlp_out``, the
  embeddings) into one ``[batch, pos, n_sources, d_model]`` buffer in the model's dtype,
  backward hooks on ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` /
  ``hook_mlp_in`` / ``ln_final.hook_in`` contract it with the gradients. Parameter
  gradients are off here too (EAP-IG leaves them on, which adds a copy of the weights).
  Its summed scores are compared with circuitdiff's (``rel_diff``: relative Frobenius
  difference; ~1e-6 in float32, a few percent in bf16).

Peak memory is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``
(absolute: it includes the weights). A pass that runs out of memory is reported as
"OOM" (what it had allocated goes to ``oom_details``) and the run goes on; any other
failure is reported as "ERROR ..." with its traceback on stderr and makes the exit
status 1. Everything is printed as one markdown table and written as JSON to ``--json``
(rewritten after each model). TF32 stays off (PyTorch's default), as for a user.

On the GPU machine (torch, transformers, no transformer-lens; see run_gpu_7b.sh):

    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_7b.py --json $OUT/gpu_7b.json

The identical code path on CPU with tiny shapes (2 layers, d_model 64, 4 heads, 4 or 2
key/value heads, vocabulary 128, 16 and 32 tokens, float32; peak memory from the
profiler's allocation events plus the parameter bytes), as the test runs it:

    python benchmarks/gpu_7b.py --tiny --json /tmp/gpu_7b_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fewer fragmentation OOMs when passes of very different sizes alternate.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence the CPU profiler (--tiny)

import torch  # noqa: E402

try:
    import circuitdiff as cd
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import circuitdiff as cd
from circuitdiff.engine.bridge import Bridge  # noqa: E402


# The random-model shapes and builders are the test suite's (tests/tiny_models.py), shared here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import TINY_SHAPES as TINY_MODELS, Shape, build_model, build_tokenizer  # noqa: E402

MODELS = {
    "deepseek-math-7b": Shape("llama", 30, 4096, 32, 32, 11008, 102400),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 28, 4, 18944, 152064),
}
LEVELS = ("layer", "head")
SEQ_LENS, TINY_SEQ_LENS = (512, 2048), (16, 32)
GIB = 2**30

OOM = "OOM"


class FakeOOM(torch.cuda.OutOfMemoryError):
    """Raised for passes named by ``--fake-oom`` (tests the OOM path on CPU)."""


def is_oom(error: BaseException) -> bool:
    """CUDA out of memory, including the cuBLAS/cuDNN workspace failures that arrive as RuntimeError."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text))


def failure(where: str, error: BaseException) -> str:
    """Print the traceback to stderr and return the cell's text: "ERROR Type: message"."""
    print(f"\n!! {where} failed:", file=sys.stderr, flush=True)
    traceback.print_exception(error, file=sys.stderr)
    return f"ERROR {type(error).__name__}: {str(error)[:300]}"


# ---------------------------------------------------------------------------- models
def make_batch(vocab: int, tokens: int, answer_fraction: float, device: str, seed: int = 0,
               batch_size: int = 1) -> cd.Batch:
    """Random ids; labels (the next token) on the last ``answer_fraction`` of the positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, tokens + 1), generator=g)
    labels = ids[:, 1:].clone()
    answer = max(1, int(tokens * answer_fraction))
    labels[:, : tokens - answer] = cd.IGNORE
    return cd.Batch(ids[:, :tokens], labels=labels).to(device)


# ---------------------------------------------------------------------------- passes
def plain_pass(model: Any, batch: cd.Batch, objective: Callable[..., torch.Tensor], bridge: Bridge,
               fused: bool) -> None:
    """Forward+backward without hooks or parameter gradients, from embeddings that require grad
    (``fused``: with the fused attention EAP runs)."""
    with bridge.fused_attention(fused):
        embeddings = model.embed(batch.input_ids).detach().requires_grad_(True)
        logits = model(embeddings)
        objective(logits, batch).sum().backward()


def eap_pass(model: Any, graph: cd.AttributionGraph, batch: cd.Batch, objective: Callable[..., torch.Tensor],
             options: dict[str, Any]) -> cd.EdgeScores:
    eap = cd.scorers.get("eap", **options)
    return cd.attribute(model, graph, [batch], objective=objective, scorer=eap, intervention="zero",
                        per_sample=True, progress=False)


def tl_flags_pass(model: Any, graph: cd.AttributionGraph, batch: cd.Batch,
                  objective: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Zero-ablation EAP the way EAP-IG does it, on a bridge with TL's per-head flags on.

    One activation buffer ``[batch, pos, n_sources, d_model]`` in the model's dtype holds
    ``0 - output`` of every source (written by forward hooks); backward hooks on the
    receivers add ``buffer . gradient`` into float32 ``[n_sources, n_receivers]`` scores
    (summed over the batch). Rows and columns follow ``graph``, so the result is
    comparable with circuitdiff's mean scores.
    """
    b, p = batch.input_ids.shape
    dtype = next(model.parameters()).dtype
    buffer = torch.zeros(b, p, graph.n_sources, model.cfg.d_model, dtype=dtype, device=batch.input_ids.device)
    scores = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.float32, device=buffer.device)
    head = graph.level == "head"

    def source(rows: slice, per_head: bool) -> Callable[..., None]:
        def hook(x: torch.Tensor, hook: Any) -> None:
            x = x.detach()
            if not per_head:  # [b, p, d] -> one row; [b, p, heads, d] summed to one row at layer level
                x = x.unsqueeze(2) if x.ndim == 3 else x.sum(2, keepdim=True)
            buffer[:, :, rows] = -x
        return hook

    def receiver(columns: slice, n_read: int, per_head: bool) -> Callable[..., None]:
        def hook(grad: torch.Tensor, hook: Any) -> None:
            g = grad.unsqueeze(2) if grad.ndim == 3 else (grad if per_head else grad.sum(2, keepdim=True))
            scores[:n_read, columns] += torch.einsum("bpsd,bprd->sr", buffer[:, :, :n_read], g).float()
        return hook

    fwd = [("blocks.0.hook_in", source(slice(0, 1), False))]
    bwd = []
    for layer in range(graph.n_layers):
        fwd.append((f"blocks.{layer}.attn.hook_result", source(graph.attention_sources(layer), head)))
        mlp = graph.mlp_source(layer)
        fwd.append((f"blocks.{layer}.hook_mlp_out", source(slice(mlp, mlp + 1), False)))
        attn = graph.group("attn", layer)
        n_q, n_k, n_v = graph.receivers_per_attention
        start = attn.columns.start
        for name, width in (("q", n_q), ("k", n_k), ("v", n_v)):
            bwd.append((f"blocks.{layer}.attn.hook_{name}_input",
                        receiver(slice(start, start + width), attn.n_sources_read, head)))
            start += width
        group = graph.group("mlp", layer)
        bwd.append((f"blocks.{layer}.hook_mlp_in", receiver(group.columns, group.n_sources_read, False)))
    group = graph.group("logits")
    bwd.append(("ln_final.hook_in", receiver(group.columns, group.n_sources_read, False)))
    embeddings = model.embed(batch.input_ids).detach().requires_grad_(True)
    with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = model(embeddings)
        objective(logits, batch).sum().backward()
    return scores


# ---------------------------------------------------------------------------- measuring
class Meter:
    """Times passes and measures their peak memory on one device."""

    def __init__(self, device: str, repeats: int, fake_oom: list[str]) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.repeats = repeats
        self.fake_oom = fake_oom
        #: key -> what an out-of-memory pass had allocated at most, and the failed request
        self.oom_details: dict[str, dict[str, Any]] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        """Give freed blocks back to the GPU (on CPU there is nothing to give back, and
        ``gc.collect`` over the heap of transformers and TransformerLens takes ~0.3 s)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()

    def measure(self, key: str, run: Callable[[], Any], baseline_bytes: int) -> dict[str, float] | str:
        """``{"seconds", "peak_bytes"}`` of ``run`` (warm-up, median of repeats, a peak pass), or "OOM"."""
        result: dict[str, float] | str
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in self.fake_oom):
                raise FakeOOM(f"--fake-oom {key}")
            run()  # warm-up
            times = []
            for _ in range(self.repeats):
                self.sync()
                start = time.perf_counter()
                run()
                self.sync()
                times.append(time.perf_counter() - start)
            result = {"seconds": statistics.median(times), "peak_bytes": float(self.peak(run, baseline_bytes))}
        except Exception as error:  # one failing pass must not cost the other cells of a GPU run
            if is_oom(error):
                result = OOM
                request = re.search(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)", str(error))
                self.oom_details[key] = {
                    "allocated_peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else None,
                    "tried_to_allocate": request.group(1) if request else None}
            else:
                result = failure(key, error)
        self.free()  # after the except block, so the traceback's frames are gone
        return result

    def profile(self, key: str, run: Callable[[], Any]) -> dict[str, Any] | str:
        """:func:`profile_pass` of ``run``, or "OOM" / "ERROR ..." (the run goes on)."""
        result: dict[str, Any] | str
        try:
            result = profile_pass(run, self.cuda)
        except Exception as error:
            result = OOM if is_oom(error) else failure(f"{key} (profile)", error)
        self.free()
        return result

    def peak(self, run: Callable[[], Any], baseline_bytes: int) -> int:
        """Peak bytes allocated during one more pass, including what was allocated before it
        (:func:`circuitdiff.planner.measure_peak`; on CPU plus ``baseline_bytes``, the parameters)."""
        return cd.planner.measure_peak(run, self.device, baseline_bytes)

def profile_pass(run: Callable[[], Any], cuda: bool) -> dict[str, Any]:
    """One profiled pass: where its time goes (kernel time on CUDA, CPU time otherwise).

    ``seconds``: the total (every kernel once on CUDA; every operator's own CPU time
    otherwise); ``labels``: the time under each of circuitdiff's ``torch.profiler`` labels
    (``engine.products.PROFILER_LABELS``, kernels launched inside included); ``top``: the operators,
    with their input shapes, whose own kernels (CUDA) or own CPU time took longest;
    ``top_kernels`` (CUDA only, else empty): the kernels that took longest, by name (a
    cuBLAS kernel's name says e.g. whether it splits the reduction).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from circuitdiff.engine.products import PROFILER_LABELS

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    total = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)  # microseconds
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    host = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    labels = {label: sum(total(e) for e in host if e.name == label) / 1e6 for label in PROFILER_LABELS}
    kernels: dict[str, list[float]] = {}  # name: [seconds, launches]
    if cuda:  # the kernels themselves, each once (as torch's own profiler table sums them)
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
                kernels.setdefault(e.name, [0.0, 0])
                kernels[e.name][0] += e.self_device_time_total / 1e6
                kernels[e.name][1] += 1
        overall = sum(seconds for seconds, _ in kernels.values())
    else:
        overall = sum(e.self_cpu_time_total for e in host) / 1e6
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                  if e.device_type == DeviceType.CPU and e.key not in PROFILER_LABELS), key=own, reverse=True)
    return {"seconds": overall, "labels": labels,
            "top": [{"op": e.key, "input_shapes": str(e.input_shapes), "calls": e.count, "seconds": own(e) / 1e6}
                    for e in ops[:12]],
            "top_kernels": [{"kernel": name, "launches": launches, "seconds": t} for name, (t, launches)
                            in sorted(kernels.items(), key=lambda item: item[1][0], reverse=True)[:12]]}


def show_profile(profile: dict[str, Any] | str, contraction_flop: int | None = None) -> str:
    """The profile's total and label times; with ``contraction_flop``, the contractions' rate too."""
    if not isinstance(profile, dict):
        return profile
    labels = ", ".join(f"{name.removeprefix('circuitdiff.')} {seconds(t)}" for name, t in profile["labels"].items())
    contract = profile["labels"].get("circuitdiff.contract")
    rate = (f" ({contraction_flop / contract / 1e12:.3g} TFLOP/s over {contraction_flop:.2e} FLOP)"
            if contraction_flop and contract else "")
    return f"{seconds(profile['seconds'])} profiled; {labels}{rate}"


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    return float((ours - theirs).norm() / ours.norm().clamp_min(1e-30))


def run_model(name: str, shape: Shape, args: argparse.Namespace, meter: Meter, tmp: Path) -> tuple[list[dict], dict]:
    """Every cell of one model (which the caller frees once this returns)."""
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    hf = build_model(shape, args.device, dtype)
    tokenizer = build_tokenizer(shape.vocab, tmp / name)
    model = cd.load_model(hf, tokenizer=tokenizer, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = cd.describe_model(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    info = {"architecture": spec.architecture, "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weight_bytes, "build_seconds": time.perf_counter() - started,
            "allocated_after_build_bytes": torch.cuda.memory_allocated() if meter.cuda else weight_bytes}
    print(f"\n== {name}: {spec.architecture}, {spec.n_layers} layers, d_model {spec.d_model}, {spec.n_heads} heads "
          f"({spec.n_kv_heads} kv), vocab {spec.d_vocab}, {info['parameters'] / 1e6:,.1f} M parameters, "
          f"{size(weight_bytes)} of weights ({spec.dtype}), built in {info['build_seconds']:.1f} s", flush=True)
    objective = cd.objectives.answer_nll()
    graphs = {level: cd.AttributionGraph.from_model(model, level=level) for level in args.levels}
    cells: dict[tuple[str, int, str], dict] = {}
    kept: dict[tuple[str, int, str], torch.Tensor] = {}
    # the attention EAP runs (its fused_attention, None: fused where the model allows it), for the plain pass too
    bridge = Bridge(model)
    fused = bridge.fuses_attention(args.fused_attention)

    for tokens in args.seq:
        batch = make_batch(shape.vocab, tokens, args.answer_fraction, args.device, batch_size=args.batch)
        key = f"{name}/plain/-/{tokens}"
        plain = "skipped" if args.skip_plain else meter.measure(
            key, lambda batch=batch: plain_pass(model, batch, objective, bridge, fused), weight_bytes)
        print(f"  {tokens} tokens, plain: {show(plain, meter.oom_details.get(key))}", flush=True)
        plain_profile = None
        if args.profile and isinstance(plain, dict):
            plain_profile = meter.profile(key, lambda batch=batch: plain_pass(model, batch, objective, bridge, fused))
            print(f"    profile: {show_profile(plain_profile)}", flush=True)
        for level in args.levels:
            for contraction_name in args.contraction_dtype:  # side by side, against the same plain pass
                contraction = getattr(torch, contraction_name)
                options = dict(positions_per_pass=args.positions_per_pass, contraction_dtype=contraction,
                               checkpoint_blocks=args.checkpoint_blocks, positions_per_chunk=args.positions_per_chunk,
                               fused_attention=fused)
                last: list[cd.EdgeScores] = []

                def eap(graph: cd.AttributionGraph = graphs[level], batch: cd.Batch = batch, last: list = last,
                        options: dict[str, Any] = options) -> None:
                    last[:] = [eap_pass(model, graph, batch, objective, options)]

                key = f"{name}/eap/{level}/{tokens}/{contraction_name}"
                result = meter.measure(key, eap, weight_bytes)
                if last:
                    kept[level, tokens, contraction_name] = last[0].mean
                del last
                meter.free()
                print(f"  {tokens} tokens, eap {level} ({contraction_name} contraction): "
                      f"{show(result, meter.oom_details.get(key))}", flush=True)
                graph = graphs[level]
                # One multiply-add per real edge, position and d_model coordinate.
                contraction_flop = 2 * graph.n_edges * args.batch * tokens * spec.d_model
                eap_profile = None
                if args.profile and isinstance(result, dict):
                    eap_profile = meter.profile(key, eap)
                    print(f"    profile: {show_profile(eap_profile, contraction_flop)}", flush=True)
                estimate = cd.estimate_memory(model, graph, batch_size=args.batch, seq_len=tokens,
                                              loss_positions=max(1, int(tokens * args.answer_fraction)), **options)
                cells[level, tokens, contraction_name] = {
                    "model": name, "architecture": spec.architecture, "level": level, "tokens": tokens,
                    "contraction_dtype": contraction_name, "eap": result, "plain": plain,
                    "options": {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                                for k, v in options.items()},
                    **({"profile": {"eap": eap_profile, "plain": plain_profile}} if eap_profile else {}),
                    # circuitdiff's [batch, n_sources, window, d_model] buffer
                    "eap_buffer_bytes": args.batch * graph.n_sources * spec.d_model * contraction.itemsize
                    * min(args.positions_per_pass or tokens, tokens),
                    "n_sources": graph.n_sources, "n_receivers": graph.n_receivers, "n_edges": graph.n_edges,
                    "contraction_flop": contraction_flop,
                    # circuitdiff's memory planner, against the measured peak (estimate / peak - 1)
                    "estimate_bytes": estimate.total,
                    "estimate_error": (estimate.total / result["peak_bytes"] - 1) if isinstance(result, dict)
                    else None}
        del batch

    # TransformerLens's own per-head path: switch the flags on (circuitdiff refuses
    # such a bridge, so this comes after its passes), same model, same batches.
    flags_error = "skipped" if args.skip_tl else None
    try:
        if not args.skip_tl:
            model.set_use_split_qkv_input(True)
            model.set_use_attn_result(True)
            model.set_use_hook_mlp_in(True)
    except Exception as error:
        flags_error = failure(f"{name}: switching on TransformerLens's flags", error)
    for tokens in args.seq if flags_error is None else ():
        batch = make_batch(shape.vocab, tokens, args.answer_fraction, args.device, batch_size=args.batch)
        for level in args.levels:
            last_scores: list[torch.Tensor] = []

            def tl(graph: cd.AttributionGraph = graphs[level], batch: cd.Batch = batch,
                   out: list = last_scores) -> None:
                out[:] = [tl_flags_pass(model, graph, batch, objective)]

            key = f"{name}/tl/{level}/{tokens}"
            result = meter.measure(key, tl, weight_bytes)
            for contraction_name in args.contraction_dtype:
                cell = cells[level, tokens, contraction_name]
                cell["tl_flags"] = result
                if last_scores and (level, tokens, contraction_name) in kept:
                    cell["rel_diff"] = relative_difference(kept[level, tokens, contraction_name],
                                                           last_scores[0] / args.batch)
            del last_scores
            meter.free()
            print(f"  {tokens} tokens, tl_flags {level}: {show(result, meter.oom_details.get(key))}", flush=True)
        del batch

    for cell in cells.values():
        cell.setdefault("tl_flags", flags_error)
    # Release the weights (shared by the bridge) even if a registry or cache still holds a module.
    hf.to_empty(device="meta")
    for cell in cells.values():
        eap, plain = cell["eap"], cell["plain"]
        if isinstance(eap, dict):
            eap["tokens_per_s"] = args.batch * cell["tokens"] / eap["seconds"]
        cell["ratio"] = eap["seconds"] / plain["seconds"] if isinstance(eap, dict) and isinstance(plain, dict) else None
        cell.setdefault("rel_diff", None)
    return list(cells.values()), info


# ---------------------------------------------------------------------------- output
def show(result: dict[str, float] | str, oom: dict[str, Any] | None = None) -> str:
    if result == OOM and oom and oom.get("allocated_peak_bytes"):
        return (f"OOM (had allocated up to {size(oom['allocated_peak_bytes'])}, "
                f"then tried to allocate {oom.get('tried_to_allocate') or '?'})")
    if not isinstance(result, dict):
        return str(result)
    return f"{seconds(result['seconds'])}, peak {size(result['peak_bytes'])}"


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 0.1 else f"{value * 1e3:.1f} ms"


def size(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def table(cells: list[dict]) -> str:
    header = ["model", "graph", "tokens", "contraction", "EAP s/pass", "EAP tokens/s", "EAP peak", "planner est.", "plain fwd+bwd",
              "plain peak", "EAP / plain", "TL flags pass", "TL flags peak", "TL vs cd scores"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        eap, plain, tl = c["eap"], c["plain"], c.get("tl_flags", "-")

        def field(result: Any, key: str, fmt: Callable[[float], str]) -> str:
            if isinstance(result, dict):
                return fmt(result[key])
            return "ERROR" if str(result).startswith("ERROR") else str(result)

        row = [c["model"], c["level"], str(c["tokens"]), c["contraction_dtype"],
               field(eap, "seconds", seconds), field(eap, "tokens_per_s", lambda v: f"{v:,.0f}"),
               field(eap, "peak_bytes", size), size(c["estimate_bytes"]),
               field(plain, "seconds", seconds), field(plain, "peak_bytes", size),
               f"{c['ratio']:.2f}x" if c["ratio"] is not None else "-",
               field(tl, "seconds", seconds), field(tl, "peak_bytes", size),
               f"{c['rel_diff']:.1e}" if c.get("rel_diff") is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "transformer-lens", "circuitdiff"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed (imported from a path)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "versions": versions, "dtype": args.dtype, "batch": args.batch, "repeats": args.repeats,
            "positions_per_pass": args.positions_per_pass, "contraction_dtypes": args.contraction_dtype,
            "answer_fraction": args.answer_fraction, "objective": "answer_nll", "intervention": "zero",
            "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory
            if args.device.startswith("cuda") else None,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "peak_memory": "torch.cuda.max_memory_allocated (absolute)" if args.device.startswith("cuda")
            else "parameter bytes + peak of the profiler's allocation events",
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in float32 (the test's mode)")
    parser.add_argument("--json", type=Path, help="write the cells and the environment here")
    parser.add_argument("--models", nargs="+", help="a subset of the models (default: all of the mode)")
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 512 2048; tiny: 16 32)")
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per cell, after one warm-up")
    parser.add_argument("--batch", type=int, default=1, help="samples per pass (1)")
    parser.add_argument("--skip-tl", action="store_true", help="leave out TransformerLens's flags path")
    parser.add_argument("--positions-per-pass", type=int,
                        help="EAP in position windows of this many tokens (default: one pass)")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="EAP with checkpoint_blocks=True (one block's activations kept for the backward)")
    parser.add_argument("--fused-attention", action=argparse.BooleanOptionalAction,
                        help="EAP's fused_attention (default: the scorer's, fused where the model allows it); "
                             "the plain pass runs the same attention")
    parser.add_argument("--positions-per-chunk", type=int,
                        help="EAP's positions_per_chunk (receiver gradients a chunk of positions at a time)")
    parser.add_argument("--skip-plain", action="store_true",
                        help="leave out the plain pass (long sequences, where it cannot fit)")
    parser.add_argument("--contraction-dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                        help="EAP's source buffer and contraction dtype (scores are summed in float32); with both, "
                             "each EAP cell is measured with each, side by side")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more plain and EAP pass per cell: time under circuitdiff's labels, top ops")
    parser.add_argument("--answer-fraction", type=float, default=0.25,
                        help="share of the positions (the last ones) that the objective scores")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", help="default: bfloat16 (float32 with --tiny)")
    parser.add_argument("--fake-oom", action="append", default=[], metavar="PATTERN",
                        help="treat passes whose key model/kind/level/tokens matches as out of memory "
                             "(kind: plain, eap, tl); tests the OOM path")
    args = parser.parse_args(argv)
    catalogue = TINY_MODELS if args.tiny else MODELS
    args.models = args.models or list(catalogue)
    unknown = [m for m in args.models if m not in catalogue]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(catalogue)}")
    args.seq = args.seq or list(TINY_SEQ_LENS if args.tiny else SEQ_LENS)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --tiny for the CPU version")
    if args.tiny:  # tiny matrices: threads only contend (10x slower on 2 busy cores)
        torch.set_num_threads(1)

    env = environment(args)
    print(f"device {env['device']}, {args.dtype}, batch {args.batch}, warm-up + median of {args.repeats}, "
          f"answer_nll on the last {args.answer_fraction:.0%} of the tokens; versions {env['versions']}", flush=True)
    meter = Meter(args.device, args.repeats, args.fake_oom)
    cells: list[dict] = []
    models: dict[str, dict] = {}
    started = time.perf_counter()

    def save(complete: bool) -> None:  # after every model, so a run cut short keeps what it measured
        env["total_seconds"] = time.perf_counter() - started
        env["complete"] = complete
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"environment": env, "models": models, "cells": cells,
                                             "oom_details": meter.oom_details}, indent=2))

    with tempfile.TemporaryDirectory(prefix="gpu_7b-") as tmp:
        for name in args.models:
            try:
                model_cells, info = run_model(name, catalogue[name], args, meter, Path(tmp))
            except Exception as error:
                model_cells, info = [], {"error": failure(name, error)}
            gc.collect()  # the model is gone with run_model's frame; collect cycles, empty the cache
            meter.free()
            if meter.cuda:
                info["allocated_after_free_bytes"] = torch.cuda.memory_allocated()
                if info["allocated_after_free_bytes"] > GIB:
                    print(f"  warning: {size(info['allocated_after_free_bytes'])} still allocated after {name}",
                          flush=True)
            cells += model_cells
            models[name] = info
            save(complete=False)
    save(complete=True)
    weights = ", ".join(f"{name} {size(info['weight_bytes'])}" for name, info in models.items()
                        if "weight_bytes" in info)
    print(f"\n{table(cells)}\n\nBatch {args.batch}; seconds are medians of {args.repeats} passes after a warm-up. "
          f"Peaks are the most memory allocated during one pass, weights included ({weights}; "
          f"{env['peak_memory']}). EAP: one cd.attribute call (zero ablation; source buffer and contraction in the "
          "dtype of the contraction column, float32 scores). "
          "Plain: forward+backward, no hooks, no parameter gradients. TL flags: the same EAP with an EAP-IG-style "
          "buffer on TransformerLens's split-qkv / attn-result / mlp-in flags; TL vs cd: relative difference "
          "of the two passes' scores.\n"
          f"total {env['total_seconds']:.1f} s", flush=True)
    errors = [f"{name}: {info['error']}" for name, info in models.items() if "error" in info]
    errors += [f"{c['model']} {c['level']} {c['tokens']} {kind}: {c[kind]}" for c in cells
               for kind in ("eap", "plain", "tl_flags") if str(c.get(kind)).startswith("ERROR")]
    errors += [f"{c['model']} {c['level']} {c['tokens']} {kind} profile: {result}" for c in cells
               for kind, result in c.get("profile", {}).items() if str(result).startswith("ERROR")]
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
