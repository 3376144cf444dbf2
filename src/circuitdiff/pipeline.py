"""The paper's pipeline end to end: generate, filter, truncate, score, compare.

Each step is a function a notebook can call on its own; :func:`run_compare` chains them
and writes everything into one output directory:

| file | what |
|---|---|
| ``base.generations.jsonl``, ``tuned.generations.jsonl`` | generation caches (resumable) |
| ``base-KEY.SCORER.shards/``, ``tuned-KEY.SCORER.shards/`` | per-batch score shards (resumable; KEY names the questions scored, T_cut and level, so other settings keep their own) |
| ``base.cdiff``, ``tuned.cdiff`` | the per-sample edge scores |
| ``comparison.json``, ``report.md`` | :func:`circuitdiff.compare` and its tables |
| ``base.reference.cdiff``, ``tuned.reference.cdiff`` (and ``.reference-KEY.SCORER.shards/``) | the scorer robustness check's re-scored subsample |
| ``edge_tests.npz`` | every edge's per-edge test (:meth:`circuitdiff.differential.EdgeTests.save`) |
| ``base-on-tuned-text.cdiff``, ``tuned-on-base-text.cdiff`` (and ``-KEY.SCORER.shards/``), ``cross.json`` | cross-scoring, with ``cross_score`` |
| ``figures/`` | plots, when matplotlib is installed |
| ``run.json`` | parameters, every filter count, versions |

A run interrupted at any point and started again with the same arguments reuses the
finished generations and score shards; nothing is counted twice. Both are bound to what
produced them (weights, tokenizer, prompts, settings; see :mod:`circuitdiff.identity`):
started again with anything else, the run stops with an error naming what changed, and
``fresh=True`` (``--fresh``) discards them. Two processes cannot write into one output
directory at once. Every file is written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import InitVar, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from circuitdiff import scorers
from circuitdiff.attribution import attribute
from circuitdiff.checkpoint import directory_lock
from circuitdiff.choices import Level, NonFinitePolicy
from circuitdiff.comparison import Comparison, compare
from circuitdiff.crossscore import cross_compare
from circuitdiff.data import Generation, Question, generate_answers, grading, make_batches, select_by_length
from circuitdiff.data.datasets import load_questions
from circuitdiff.data.generation import BACKENDS
from circuitdiff.data.grading import DEFAULT_GRADER
from circuitdiff.data.selection import LengthSelection, check_parameters
from circuitdiff.data.templates import get_template, template_identity
from circuitdiff.defaults import DEFAULT_MAX_NEW_TOKENS
from circuitdiff.engine.architectures import check_level
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, UnknownNameError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hub import is_hub_id, resolve_checkpoint
from circuitdiff.io import write_atomically
from circuitdiff.models import describe_model, load_model
from circuitdiff.report import json_ready
from circuitdiff.robustness import DEFAULT_SAMPLES, choose_reference, no_reference_reason, reference_cost, subsample
from circuitdiff.scorers import Scorer
from circuitdiff.scorers.base import renamed_method
from circuitdiff.scores import EdgeScores

__all__ = ["PipelineConfig", "score_answers", "check_tokenizers", "check_device", "prepare_output_dir", "output_lock",
           "run_compare", "run_score", "plan_run", "write_text"]


@dataclass
class PipelineConfig:
    """Every setting of a run (the defaults are the paper's, section 4).

    ``scorer`` names the scorer (:func:`circuitdiff.scorers.available`); ``method`` is its
    deprecated alias, still accepted by the constructor and :meth:`from_dict` (with a DeprecationWarning).
    """

    alpha: float = 0.1
    beta: float = 0.5
    gamma: float = 1.5
    delta: float = 0.5
    rule: str = "paper"
    n: int | None = 100
    seed: int = 42
    max_questions: int | None = None  # read only the file's first N questions (quick trials)
    grader: str = DEFAULT_GRADER  # checks the answers (circuitdiff.data.grading); recomputed from cached text
    generation_backend: str = "hf"  # "vllm": generate with vLLM (CUDA, circuitdiff[vllm]); see data.generation
    template: str = "plain"  # the prompt template (circuitdiff.data.templates); chat ones use the base tokenizer
    dataset_format: str | None = None  # the questions' record format (circuitdiff.data.datasets.DATASETS)
    split: str | None = None  # the split of a Hub dataset (default: the format's)
    level: str = "layer"
    scorer: str = "eap"
    positions_per_pass: int | None = None  # the eap scorer's position windows (memory)
    contraction_dtype: str | None = None  # "bfloat16": the eap scorer's bfloat16 contraction (memory)
    checkpoint_blocks: bool = False  # eap / eap-ig: one block's activations kept for the backward (memory)
    positions_per_chunk: int | None = None  # eap / eap-ig: receiver gradients a chunk of positions at a time (memory)
    fused_attention: bool | None = None  # eap / eap-ig: fused attention kernel (None: where the model allows it)
    intervention: str = "zero"
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    fresh: bool = False  # discard cached generations and score shards of an earlier run in the output directory
    nonfinite: str = "error"  # "drop": leave samples with NaN/inf scores out (listed in the report)
    robustness: bool = True  # re-score a subsample with a reference scorer; the report says if conclusions hold
    robustness_samples: int = DEFAULT_SAMPLES  # paired samples in that subsample (drawn with seed)
    reference_scorer: str | None = None  # default: circuitdiff.robustness.choose_reference
    cross_score: bool = False  # also score each model on the other's answers (model vs text effect)
    method: InitVar[str | None] = None  # deprecated alias of scorer

    def __post_init__(self, method: str | None) -> None:
        self.scorer = renamed_method(self.scorer, method, stacklevel=3)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        """A config from its JSON form, ``run.json``'s ``"config"`` (an old ``"method"`` key: see ``scorer``)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)} - {"method"})
        if unknown:
            raise ArgumentError(f"unknown pipeline settings {unknown}; see PipelineConfig for the valid ones.")
        return cls(**data)

    def torch_dtype(self, device: str) -> torch.dtype:
        """bfloat16 on CUDA, float32 elsewhere, unless ``dtype`` says otherwise."""
        name = self.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        if name not in ("float32", "float64", "bfloat16", "float16"):
            raise DataError(f"unknown dtype {name!r}; use float32, float64, bfloat16 or float16.")
        return getattr(torch, name)

    def resolved_device(self) -> str:
        """``device`` if set, else ``"cuda"`` when available, else ``"cpu"``."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def validate(self) -> None:
        """Refuse bad settings before any model is loaded or any token generated."""
        check_parameters(self.alpha, self.beta, self.gamma, self.delta, self.rule, self.n)
        Level.parse(self.level)
        NonFinitePolicy.parse(self.nonfinite)
        get_template(self.template)
        if not isinstance(self.grader, str):
            raise ArgumentTypeError(f"grader must be a registered grader's name (run.json records it); got "
                                    f"{self.grader!r}. Register a callable with cd.grading.register(name, grader).")
        grading.resolve(self.grader)  # an unknown grader, or math-verify not installed
        if self.generation_backend not in BACKENDS:
            raise ArgumentError(f"unknown generation backend {self.generation_backend!r}; use one of {BACKENDS}.")
        if self.generation_backend == "vllm" and not self.resolved_device().startswith("cuda"):
            raise ArgumentError(f"generation_backend='vllm' runs on CUDA only; the device is "
                                f"{self.resolved_device()!r}. Use the default backend 'hf' there.")
        if self.scorer not in scorers.available():
            raise UnknownNameError(f"unknown scorer {self.scorer!r}; available: {', '.join(scorers.available())}.")
        check_device(self.resolved_device())
        if self.max_questions is not None and self.max_questions < 1:
            raise DataError(f"max_questions must be >= 1 (or None for the whole file); got {self.max_questions}.")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise DataError(f"batch size and max new tokens must be >= 1; got {self.batch_size} and "
                            f"{self.max_new_tokens}.")
        if (self.positions_per_pass is not None or self.contraction_dtype is not None) and self.scorer != "eap":
            raise DataError(f"positions_per_pass and contraction_dtype are options of the eap scorer; got "
                            f"scorer={self.scorer!r}. Use scorer='eap' or leave them unset.")
        memory_options = (self.checkpoint_blocks or self.fused_attention is not None
                          or self.positions_per_chunk is not None)
        if memory_options and self.scorer not in ("eap", "eap-ig-inputs", "eap-ig-activations"):
            raise DataError(f"checkpoint_blocks, fused_attention and positions_per_chunk are options of the eap and "
                            f"eap-ig scorers; got scorer={self.scorer!r}. Leave them unset.")
        if self.contraction_dtype not in (None, "float32", "bfloat16"):
            raise DataError(f"unknown contraction dtype {self.contraction_dtype!r}; use bfloat16 (or leave it unset "
                            "for float32).")
        self.make_scorer()  # the scorer validates its own options
        if isinstance(self.robustness_samples, bool) or not isinstance(self.robustness_samples, int) \
                or self.robustness_samples < 2:
            raise DataError(f"robustness_samples must be an integer >= 2; got {self.robustness_samples!r}.")
        if self.reference_scorer is not None:
            if self.reference_scorer not in scorers.available():
                raise UnknownNameError(f"unknown reference scorer {self.reference_scorer!r}; available: "
                                       f"{', '.join(scorers.available())}.")
            if self.reference_scorer == self.scorer:
                raise DataError(f"the reference scorer is the scorer itself ({self.scorer!r}); choose another "
                                "(e.g. exact) or leave it unset.")
        if self.intervention != "zero":
            raise DataError(
                f"the pipeline scores with intervention='zero' only (the paper's); got {self.intervention!r}. "
                "'patching' needs corrupted prompts and 'mean' / 'mean-positional' need reference data, which the "
                "pipeline does not build: call cd.attribute on its generations for those."
            )
        self.torch_dtype(self.resolved_device())

    def make_scorer(self) -> str | Scorer:
        """The scorer to run: the name ``scorer``, or a scorer object with the memory options that are set."""
        options = {"positions_per_pass": self.positions_per_pass, "positions_per_chunk": self.positions_per_chunk,
                   "contraction_dtype": None if self.contraction_dtype is None else getattr(torch, self.contraction_dtype),
                   "checkpoint_blocks": self.checkpoint_blocks or None, "fused_attention": self.fused_attention}
        options = {k: v for k, v in options.items() if v is not None}
        return scorers.get(self.scorer, **options) if options else self.scorer

    def select(self, base_lengths: Sequence[int], tuned_lengths: Sequence[int],
               prompt_lengths: tuple[Sequence[int], Sequence[int]] | None = None) -> LengthSelection:
        """:func:`~circuitdiff.data.select_by_length` with this run's settings."""
        return select_by_length(base_lengths, tuned_lengths, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                                delta=self.delta, rule=self.rule, n=self.n, seed=self.seed,
                                prompt_lengths=prompt_lengths)


def check_tokenizers(base: Any, tuned: Any, prompts: Sequence[str]) -> None:
    """Refuse two models whose tokenizers encode the prompts differently."""
    for prompt in prompts[:20]:
        a, b = base.tokenizer(prompt)["input_ids"], tuned.tokenizer(prompt)["input_ids"]
        if list(a) != list(b):
            raise DataError("the two checkpoints' tokenizers disagree (they encode the same prompt into different "
                            f"tokens, e.g. {prompt[:60]!r}); compare models of the same tokenizer family.")


def score_answers(model: Any, graph: AttributionGraph, prompts: Sequence[str], answers: Sequence[Sequence[int]], *,
                  t_cut: int, shards: str | os.PathLike[str] | None = None, scorer: str | Scorer = "eap",
                  intervention: str = "zero", batch_size: int = 8, progress: bool = True,
                  sample_ids: Sequence[str] | None = None, fresh: bool = False, nonfinite: str = "error",
                  method: str | Scorer | None = None) -> EdgeScores:
    """Per-sample scores of each model-generated answer, truncated to ``t_cut`` tokens.

    The objective is ``answer_nll`` (the paper's self-entropy): ``prompt + answer[:t_cut - 1]``
    is fed and the first ``t_cut`` answer tokens are scored. With ``shards=DIR`` the run
    is resumable: it is :func:`circuitdiff.attribute` with ``checkpoint_dir=DIR`` (one
    ``DIR/shard-00000.safetensors`` per batch and ``DIR/manifest.json`` naming the run;
    finished shards are reused when the same run is started again, and a directory of
    another run is refused; ``fresh=True`` discards it). ``scorer`` is a scorer name or
    object, e.g. ``cd.scorers.get("eap", positions_per_pass=512)`` (``method`` is its
    deprecated alias). ``sample_ids`` name the samples (e.g. question ids; default: a hash
    of each prompt); ``nonfinite`` is passed to :func:`circuitdiff.attribute`.
    """
    scorer = renamed_method(scorer, method, stacklevel=2)
    if any(len(a) < t_cut for a in answers):
        raise DataError(f"every answer must have at least t_cut={t_cut} tokens.")
    batches = make_batches(model.tokenizer, list(prompts), [list(a)[:t_cut] for a in answers], batch_size=batch_size,
                           sample_ids=sample_ids)
    scores = attribute(model, graph, batches, objective="answer_nll", scorer=scorer, intervention=intervention,
                       progress=progress, checkpoint_dir=shards, fresh=fresh, nonfinite=nonfinite)
    scores.metadata.update({"t_cut": t_cut, "objective": "answer_nll (self-entropy of the answer)"})
    return scores


def run_compare(base_dir: str | os.PathLike[str], tuned_dir: str | os.PathLike[str],
                questions_path: str | os.PathLike[str], out: str | os.PathLike[str],
                config: PipelineConfig | None = None, log: Callable[[str], None] = print) -> Comparison:
    """The whole pipeline for two checkpoints; see the module docstring for the files written."""
    new = not Path(out).exists()
    config, questions, out, device = _start(config, questions_path, out, _COMPARE_OUTPUTS, base_dir)
    with output_lock(out, remove_if_left_empty=new):
        return _run_compare(base_dir, tuned_dir, questions_path, out, config, questions, device, log)


def _run_compare(base_dir: str | os.PathLike[str], tuned_dir: str | os.PathLike[str],
                 questions_path: str | os.PathLike[str], out: Path, config: PipelineConfig,
                 questions: list[Question], device: str, log: Callable[[str], None]) -> Comparison:
    dtype = config.torch_dtype(device)
    log(f"{len(questions)} questions from {questions_path}")
    counts: dict[str, Any] = {"questions": len(questions)}

    paths = {"base": resolve_checkpoint(base_dir), "tuned": resolve_checkpoint(tuned_dir)}  # both, before loading
    models = {side: _load(path, device, dtype, config.level) for side, path in paths.items()}
    check_tokenizers(models["base"], models["tuned"], [q.prompt for q in questions])
    template = template_identity(config.template, models["base"].tokenizer)
    generations: dict[str, list[Generation]] = {}
    for side, model in models.items():
        generations[side] = _generate(model, questions, out / f"{side}.generations.jsonl", config, counts, side)
        counts[f"correct ({side})"] = sum(g.correct for g in generations[side])
        log(f"{side}: {counts[f'correct ({side})']}/{len(questions)} answered correctly")
    both = [i for i in range(len(questions)) if generations["base"][i].correct and generations["tuned"][i].correct]
    counts["correct (both)"] = len(both)
    selection = config.select([len(generations["base"][i].answer_ids) for i in both],
                              [len(generations["tuned"][i].answer_ids) for i in both],
                              prompt_lengths=([generations["base"][i].prompt_length for i in both],
                                              [generations["tuned"][i].prompt_length for i in both]))
    chosen = _chosen(both, selection, counts)
    log(f"{len(both)} answered correctly by both; kept {len(chosen)} "
        f"(dropped: {selection.dropped}); T_cut = {selection.t_cut} tokens")

    scores = {side: _score(models[side], questions, generations[side], chosen, selection.t_cut, config, out, side)
              for side in models}
    reference, robustness_note = _reference_scores(models, questions, generations, chosen, selection.t_cut, config,
                                                   scores, out, log)
    cross = _cross_scores(models, questions, generations, chosen, selection.t_cut, config, out) \
        if config.cross_score else None
    _remove_stale_outputs(out, reference is not None, cross is not None)
    del models
    gc.collect()

    result = compare(scores["base"], scores["tuned"], paired=True, reference_scores=reference)
    if result.robustness is not None:
        result.robustness.cost = robustness_note
    result.dropped += _questions_left_out(questions, generations, both, selection)
    result.to_json(str(out / "comparison.json"))
    if result.edge_tests is not None:
        result.edge_tests.save(out / "edge_tests.npz")
    report = result.to_markdown(result.groups)  # every group: all, by receiver and source kind, by layer
    names = (_display_name(base_dir), _display_name(tuned_dir))
    models_line = f"**base** = `{names[0]}` vs **tuned** = `{names[1]}`"
    sections = [f"# circuitdiff compare\n\n{models_line}\n\n{_describe(counts, selection.t_cut, config)}"]
    if reference is None:
        sections.append(f"**Scorer robustness**: {robustness_note}")
    sections.append(report)
    if cross is not None:
        crossed = cross_compare(scores["base"], scores["tuned"], cross["base"], cross["tuned"], breakdown=False,
                                edge_tests=False)
        write_text(out / "cross.json", json.dumps(json_ready(crossed.to_dict()), indent=2))
        sections.append(f"## Cross-scoring: model effect and text effect\n\n{crossed.to_markdown()}")
    write_text(out / "report.md", "\n\n".join(sections) + "\n")
    figures = _plots(result, out / "figures", names if names[0] != names[1] else ("base", "tuned"))
    write_text(out / "run.json", json.dumps({
        "base": str(base_dir), "tuned": str(tuned_dir), "questions": str(questions_path), "template": template,
        "config": asdict(config),
        "device": device, "dtype": str(dtype).replace("torch.", ""), "counts": counts,
        "selection": _selection_record(selection), "figures": figures,
        "versions": scores["base"].metadata.get("versions", {}),
    }, indent=2))
    log(f"report: {out / 'report.md'}")
    return result


def run_score(model_dir: str | os.PathLike[str], questions_path: str | os.PathLike[str], out: str | os.PathLike[str],
              config: PipelineConfig | None = None, log: Callable[[str], None] = print) -> EdgeScores:
    """One model: generate, keep its correct answers, apply the length rules to its own
    lengths, score; writes ``model.generations.jsonl``, ``model-KEY.SCORER.shards/``, ``scores.cdiff``
    and ``run.json`` into ``out``."""
    new = not Path(out).exists()
    config, questions, out, device = _start(config, questions_path, out, _SCORE_OUTPUTS, model_dir)
    with output_lock(out, remove_if_left_empty=new):
        return _run_score(model_dir, questions_path, out, config, questions, device, log)


def _run_score(model_dir: str | os.PathLike[str], questions_path: str | os.PathLike[str], out: Path,
               config: PipelineConfig, questions: list[Question], device: str, log: Callable[[str], None]) -> EdgeScores:
    from circuitdiff.metrics import summarize

    model = _load(model_dir, device, config.torch_dtype(device), config.level)
    counts: dict[str, Any] = {"questions": len(questions)}
    generations = _generate(model, questions, out / "model.generations.jsonl", config, counts)
    correct = [i for i, g in enumerate(generations) if g.correct]
    counts["correct"] = len(correct)
    lengths = [len(generations[i].answer_ids) for i in correct]
    selection = config.select(lengths, lengths)
    chosen = _chosen(correct, selection, counts)
    log(f"{len(correct)}/{len(questions)} answered correctly; kept {len(chosen)}; T_cut = {selection.t_cut} tokens")
    scores = _score(model, questions, generations, chosen, selection.t_cut, config, out, "scores", cache="model")
    summary = summarize(scores)["all"] if scores.n_samples >= 2 else {}
    write_text(out / "run.json", json.dumps({
        "model": str(model_dir), "questions": str(questions_path),
        "template": template_identity(config.template, model.tokenizer), "config": asdict(config), "device": device,
        "counts": counts, "selection": _selection_record(selection), "metrics": summary,
        "versions": scores.metadata.get("versions", {}),
    }, indent=2, default=float))
    log("\n".join(f"{name}: {value:.4g}" for name, value in summary.items()))
    return scores


_COMPARE_OUTPUTS = ("comparison.json", "report.md", "run.json", "base.cdiff", "tuned.cdiff",
                    "base.generations.jsonl", "tuned.generations.jsonl", "base.reference.cdiff",
                    "tuned.reference.cdiff", "cross.json", "base-on-tuned-text.cdiff", "tuned-on-base-text.cdiff",
                    "edge_tests.npz")
_SCORE_OUTPUTS = ("scores.cdiff", "run.json", "model.generations.jsonl")


@contextlib.contextmanager
def output_lock(out: Path, remove_if_left_empty: bool = False) -> Iterator[None]:
    """Hold ``out/.lock`` for the run: a second process writing into ``out`` gets a RunLockedError.

    With ``remove_if_left_empty`` (the run created ``out``), a run that fails before writing any file leaves no
    folder behind: ``out`` is removed when it holds nothing but the lock and empty folders.
    """
    with directory_lock(out, f"another circuitdiff run is writing into {str(out)!r}; wait for it to finish or "
                             "choose another --out."):
        try:
            yield
        except BaseException:  # only the lock's holder may remove the folder (a refused run must not)
            if remove_if_left_empty and all(p.is_dir() or p.name == ".lock" for p in out.rglob("*")):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _start(config: PipelineConfig | None, questions_path: str | os.PathLike[str],
           out: str | os.PathLike[str], outputs: Sequence[str] = (),
           model: str | os.PathLike[str] | None = None) -> tuple[PipelineConfig, list[Question], Path, str]:
    """Check the settings, the questions and the output directory (before any model loads); create ``out``.

    ``model`` (a checkpoint directory or cached Hub id) lends its tokenizer to a chat template.
    """
    config = config or PipelineConfig()
    config.validate()
    questions = _questions(config, questions_path, model)
    out = prepare_output_dir(out, outputs)
    return config, questions, out, config.resolved_device()


def _questions(config: PipelineConfig, source: str | os.PathLike[str],
               model: str | os.PathLike[str] | None) -> list[Question]:
    """The run's questions, their prompts rendered with the config's template (a chat template with ``model``'s
    tokenizer: both models of a comparison see the same text)."""
    return load_questions(source, template=config.template, tokenizer=template_tokenizer(config.template, model),
                          dataset_format=config.dataset_format, split=config.split,
                          max_questions=config.max_questions)


def template_tokenizer(template: str, model: str | os.PathLike[str] | None) -> Any:
    """``model``'s tokenizer when ``template`` renders through a chat template, else None (plain text needs none)."""
    if not get_template(template).chat:
        return None
    from transformers import AutoTokenizer

    if model is None:
        raise ArgumentError(f"the {template!r} template renders prompts with a model's chat template; this run has no "
                            "model to take it from.")
    return AutoTokenizer.from_pretrained(resolve_checkpoint(model))


def plan_run(models: dict[str, str | os.PathLike[str]], questions_path: str | os.PathLike[str],
             out: str | os.PathLike[str], config: PipelineConfig | None = None) -> str:
    """What :func:`run_compare` (models ``base`` and ``tuned``) or :func:`run_score` (``model``) would do, as
    markdown: models resolved, questions read, graph size and memory estimate; no weights loaded, nothing written
    (:func:`circuitdiff.dryrun.describe_plan`)."""
    from circuitdiff.dryrun import describe_plan

    config = config or PipelineConfig()
    config.validate()
    questions = _questions(config, questions_path, next(iter(models.values())))
    return describe_plan(models, questions, config, str(questions_path), out)


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or an accelerator this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ArgumentError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(parsed.type, False):
        raise ArgumentError(f"device {device!r} is not available on this machine (torch sees no {parsed.type}); "
                            "use --device cpu, or run where that device is.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ArgumentError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s).")


def prepare_output_dir(out: str | os.PathLike[str], outputs: Sequence[str] = ()) -> Path:
    """Create ``out`` and check that it is writable and that none of ``outputs`` (file names in it) is a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"the output path {str(out)!r} is a file; pass a directory (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ArgumentError(f"cannot write into the output directory {str(out)!r} ({exc.strerror or exc}); choose "
                            "another --out.") from None
    for name in outputs:
        if (out / name).is_dir():
            raise ArgumentError(f"{str(out / name)!r} is a folder, but this run writes a file there; move it away "
                                "or choose another --out.")
    return out


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _generate(model: Any, questions: list[Question], cache: Path, config: PipelineConfig,
              counts: dict[str, Any] | None = None, name: str = "model") -> list[Generation]:
    """The model's answers (cached in ``cache``); warns about answers cut at ``max_new_tokens`` and counts them in
    ``counts`` under ``"cut at N tokens (name)"``."""
    generations = generate_answers(model, questions, cache=cache, batch_size=config.batch_size,
                                   max_new_tokens=config.max_new_tokens, progress=config.progress, fresh=config.fresh,
                                   grader=config.grader, backend=config.generation_backend)
    cut = cut_answers(generations, config.max_new_tokens)
    if cut:
        if counts is not None:
            counts[f"cut at {config.max_new_tokens} tokens ({name})"] = cut
        warnings.warn(f"{name}: {cut} of {len(generations)} answers reached max_new_tokens={config.max_new_tokens} "
                      "without an end token; they were cut, may lack their final answer and then count as wrong. "
                      "Raise --max-new-tokens for long chain-of-thought models.", stacklevel=2)
    return generations


def cut_answers(generations: Sequence[Generation], max_new_tokens: int) -> int:
    """How many answers reached ``max_new_tokens`` without an end token (cut, so maybe without a final answer)."""
    return sum(len(g.answer_ids) >= max_new_tokens for g in generations)


def _chosen(candidates: list[int], selection: LengthSelection, counts: dict[str, Any]) -> list[int]:
    """The question indices ``selection`` kept among ``candidates``; records the drops in ``counts``."""
    counts.update({f"dropped: {rule}": k for rule, k in selection.dropped.items()})
    chosen = [candidates[k] for k in selection.kept]
    counts["scored"] = len(chosen)
    return chosen


def _score(model: Any, questions: list[Question], answers: list[Generation], picked: list[int], t_cut: int,
           config: PipelineConfig, out: Path, name: str, *, scorer: str | Scorer | None = None,
           answered_by: str = "own", cache: str | None = None) -> EdgeScores:
    """Score the questions at ``picked`` on ``answers`` (one per question); save them to ``out/{name}.cdiff``.

    Resumable in ``out/{cache or name}-{KEY}.{scorer name}.shards``, KEY a hash of the questions scored, ``t_cut``
    and the level (:func:`selection_key`): a rerun in the same ``out`` with another scorer, grader, ``alpha``, seed
    or level reuses the answers and scores into its own shards instead of clashing with the earlier ones.
    ``scorer`` defaults to the config's; ``answered_by`` ("own", "base", "tuned") is recorded as
    ``metadata["answers"]``.
    """
    graph = AttributionGraph.from_model(model, level=config.level)
    scorer = scorer or config.make_scorer()
    scorer_name = scorer if isinstance(scorer, str) else scorer.name
    key = selection_key([questions[i].id for i in picked], t_cut, config.level)
    scores = score_answers(model, graph, [questions[i].prompt for i in picked], [answers[i].answer_ids for i in picked],
                           t_cut=t_cut, shards=out / f"{cache or name}-{key}.{scorer_name}.shards", scorer=scorer,
                           intervention=config.intervention, batch_size=config.batch_size, progress=config.progress,
                           sample_ids=[questions[i].id for i in picked], fresh=config.fresh,
                           nonfinite=config.nonfinite)
    scores.metadata["answers"] = "the model's own" if answered_by == "own" else f"the {answered_by} model's"
    scores.save(out / f"{name}.cdiff")
    return scores


def selection_key(sample_ids: Sequence[str], t_cut: int, level: str) -> str:
    """Eight hex digits naming what a score-shard folder scores: the sample ids in order, ``t_cut`` and the level."""
    return hashlib.sha256(json.dumps([list(sample_ids), t_cut, str(level)]).encode()).hexdigest()[:8]


def _reference_scores(models: dict[str, Any], questions: list[Question], generations: dict[str, list[Generation]],
                      chosen: list[int], t_cut: int, config: PipelineConfig, scores: dict[str, EdgeScores], out: Path,
                      log: Callable[[str], None]) -> tuple[tuple[EdgeScores, EdgeScores] | None, str]:
    """Both models re-scored with the reference scorer on a seeded subsample, and a line on the cost.

    None (and the reason) when the check is off or there is no affordable reference. The
    shards live in ``{side}.reference-{KEY}.{scorer}.shards``, so another reference or
    subsample starts its own cache instead of clashing with this one.
    """
    if not config.robustness:
        return None, "not run (--no-robustness)."
    graph = scores["base"].graph
    reference = config.reference_scorer or choose_reference(graph, config.scorer)
    if reference is None:
        return None, no_reference_reason(graph, config.scorer)
    ids = set(subsample(scores["base"], scores["tuned"], config.robustness_samples, config.seed))
    picked = [i for i in chosen if questions[i].id in ids]
    cost = reference_cost(graph, reference, len(picked), config.scorer, len(chosen))
    log(cost)
    rescored = {}
    for side, model in models.items():
        rescored[side] = _score(model, questions, generations[side], picked, t_cut, config, out,
                                f"{side}.reference", scorer=reference)
    return (rescored["base"], rescored["tuned"]), cost


def _cross_scores(models: dict[str, Any], questions: list[Question], generations: dict[str, list[Generation]],
                  chosen: list[int], t_cut: int, config: PipelineConfig, out: Path) -> dict[str, EdgeScores]:
    """Each model scored on the other model's answers: ``{"base": B(t), "tuned": T(b)}``."""
    other = {"base": "tuned", "tuned": "base"}
    return {side: _score(model, questions, generations[other[side]], chosen, t_cut, config, out,
                         f"{side}-on-{other[side]}-text", answered_by=other[side])
            for side, model in models.items()}


def _remove_stale_outputs(out: Path, robustness: bool, cross: bool) -> None:
    """Delete result files an earlier run in ``out`` wrote and this one does not (they would contradict its report).

    Score shards stay: they are caches, bound to what produced them.
    """
    stale = [] if robustness else ["base.reference.cdiff", "tuned.reference.cdiff"]
    stale += [] if cross else ["base-on-tuned-text.cdiff", "tuned-on-base-text.cdiff", "cross.json"]
    for name in stale:
        (out / name).unlink(missing_ok=True)


def _questions_left_out(questions: list[Question], generations: dict[str, list[Generation]], both: list[int],
                        selection: LengthSelection) -> list[dict[str, Any]]:
    """Every question not scored, and why: answered wrongly by a model, or removed by a length rule."""
    left_out = []
    for i, question in enumerate(questions):
        wrong = [side for side in ("base", "tuned") if not generations[side][i].correct]
        if wrong:
            left_out.append({"side": "both", "id": question.id,
                             "reason": f"answered incorrectly by {' and '.join(wrong)}"})
    sampled = f"not sampled (n={selection.parameters.get('n')}, seed {selection.parameters.get('seed')})"
    for position, rule in selection.removed.items():
        reason = sampled if rule == "not sampled" else f"length rule: {rule}"
        left_out.append({"side": "both", "id": questions[both[position]].id, "reason": reason})
    return left_out


def _selection_record(selection: LengthSelection) -> dict[str, Any]:
    return {"t_cut": selection.t_cut, "reference_length": selection.reference_length, **selection.parameters}


def _load(directory: str | os.PathLike[str], device: str, dtype: torch.dtype, level: str) -> Any:
    """The model, refused before any generation if it cannot be attributed at ``level``."""
    path = resolve_checkpoint(directory)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DataError(f"{str(path)!r} is not a checkpoint directory (a folder with config.json, written by "
                        "save_pretrained) nor the Hub id of a cached model.")
    model = load_model(path, device=device, dtype=dtype)
    check_level(describe_model(model).architecture, level)
    return model


def _display_name(source: str | os.PathLike[str]) -> str:
    """A model's name for reports and plots: a Hub id as given, a directory by its last two path parts."""
    text = os.fspath(source)
    return text if is_hub_id(text) else "/".join(Path(text).resolve().parts[-2:])


def _describe(counts: dict[str, Any], t_cut: int, config: PipelineConfig) -> str:
    lines = ["| step | questions |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in counts.items()]
    settings = (f"alpha {config.alpha}, beta {config.beta}, gamma {config.gamma}, delta {config.delta}, "
                f"length rule {config.rule}, n {config.n}, seed {config.seed}; template {config.template}, grader "
                f"{config.grader}, at most {config.max_new_tokens} new tokens; T_cut {t_cut} tokens; "
                f"{config.level}-level graph, {config.scorer}, {config.intervention} ablation, answer_nll")
    return "\n".join(lines) + f"\n\nSettings: {settings}."


def _plots(result: Comparison, directory: Path, names: tuple[str, str] = ("base", "tuned")) -> list[str]:
    """Plot files written (``names``: the models' display names), or none when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from circuitdiff.plots import plot_comparison

    return [str(p) for p in plot_comparison(result, directory, names=names).values()]
