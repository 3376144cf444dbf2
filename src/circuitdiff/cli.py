"""The ``circuitdiff`` command: a thin shell over :mod:`circuitdiff.pipeline`.

    circuitdiff compare BASE_DIR TUNED_DIR --questions gsm8k.jsonl --alpha 0.1 --level layer --out results/
    circuitdiff score MODEL_DIR --questions gsm8k.jsonl --out results/
    circuitdiff compare-scores base.cdiff tuned.cdiff [--out results/] [--reference-scores b.ref.cdiff t.ref.cdiff]
    circuitdiff demo            # the bundled tiny base / GRPO / DPO models, into ./circuitdiff-demo/
    circuitdiff demo --trajectory   # base against each checkpoint of the bundled GRPO run
    circuitdiff study study.toml --out study/   # a grid of settings, pooled (see circuitdiff.study)
    circuitdiff trajectory INITIAL_DIR RUN_DIR --questions q.jsonl --out traj/   # checkpoints against the initial model

Every option is checked before a model is loaded or a token generated. Expected failures
(bad files, bad options, a missing device, an unwritable output folder, a full disk,
nothing left after filtering, results of another run in the output folder) print one line
to stderr and exit with status 2; ``--debug`` prints the traceback too. Ctrl-C exits with
130 and the run resumes when started again; ``--fresh`` starts it over.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import fields

from circuitdiff.choices import Level
from circuitdiff.errors import ArgumentError, CircuitDiffError
from circuitdiff.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLES, EXACT_EDGE_LIMIT

__all__ = ["main"]

_LEVELS = [level.value for level in Level]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Checkpoint-loading bars (one per model, per shard) would bury circuitdiff's own progress bars; they stay off
    # unless HF_HUB_DISABLE_PROGRESS_BARS=0 is set (read when huggingface_hub is imported, after this line). When
    # main() is called from Python with transformers already imported, they are switched off for the call only.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    restore = None
    if getattr(args, "quiet", False) or ("transformers" in sys.modules
                                         and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"):
        from transformers.utils import logging as transformers_logging

        if transformers_logging.is_progress_bar_enabled():
            restore = transformers_logging.enable_progress_bar
        transformers_logging.disable_progress_bar()
    try:
        return args.run(args)
    except (CircuitDiffError, OSError) as exc:  # OSError: missing files, permissions, a full disk
        if args.debug:
            traceback.print_exc()
        print(f"circuitdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitdiff: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitdiff", description="How did post-training change a model inside?")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    compare = commands.add_parser("compare", help="generate, filter, score and compare two checkpoints",
                                  description="The paper's pipeline on two local Hugging Face checkpoints.",
                                  parents=[common])
    compare.add_argument("base", nargs="?", help="base checkpoint: a directory or the Hub id of a cached model")
    compare.add_argument("tuned", nargs="?", help="tuned checkpoint (same tokenizer family), likewise")
    compare.add_argument("--pair", metavar="NAME",
                         help="instead of BASE TUNED: one of the paper's model pairs by name (Hub ids, read from the "
                              "Hugging Face cache; their template and max new tokens): deepseek-math-grpo, "
                              "math-shepherd-ppo, qwen2.5-dpo, r1-distill-acereason")
    _pipeline_options(compare)
    _dry_run_option(compare)
    _trust_options(compare)
    compare.add_argument("--reference-scorer", metavar="NAME",
                         help="robustness reference (default: exact at layer level; at head level exact up to "
                              f"{EXACT_EDGE_LIMIT:,} edges, else eap-ig-inputs for eap)")
    compare.set_defaults(run=_compare)

    score = commands.add_parser("score", help="generate, filter and score one checkpoint",
                                description="Score one model on the questions it answers correctly.", parents=[common])
    score.add_argument("model", help="checkpoint: a directory or the Hub id of a cached model")
    _pipeline_options(score)
    _dry_run_option(score)
    score.set_defaults(run=_score)

    demo = commands.add_parser("demo", help="compare the bundled tiny base, GRPO and DPO models (no download)",
                               description="The compare pipeline for base vs grpo and base vs dpo on the bundled "
                                           "demo checkpoints and questions, on CPU.", parents=[common])
    demo.add_argument("--out", default="circuitdiff-demo", help="output directory (circuitdiff-demo)")
    demo.add_argument("--n", type=int, default=200, help="questions to sample (200)")
    demo.add_argument("--max-questions", type=int, help="read only the first N bundled questions (all 500)")
    demo.add_argument("--level", choices=_LEVELS, default="layer", help="graph level (layer)")
    _scorer_options(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    demo.add_argument("--fresh", action="store_true", help="discard cached generations and scores in --out")
    demo.add_argument("--trajectory", action="store_true",
                      help="instead: base against every checkpoint of the bundled GRPO run, into --out/trajectory/")
    _devices_option(demo, "checkpoints (with --trajectory)")
    _trust_options(demo)
    demo.set_defaults(run=_demo)

    saved = commands.add_parser("compare-scores", help="compare two saved .cdiff files",
                                description="Compare two per-sample score files on the same graph; samples are "
                                            "paired by sample id.", parents=[common])
    saved.add_argument("base", help="base scores (.cdiff)")
    saved.add_argument("tuned", help="tuned scores (.cdiff)")
    saved.add_argument("--out", help="also write comparison.json and report.md here")
    saved.add_argument("--coarsen", action="store_true", help="compare the common layer-level graph")
    saved.add_argument("--unpaired", action="store_true", help="the files score different prompts")
    saved.add_argument("--reference-scores", nargs=2, metavar=("BASE_REF", "TUNED_REF"),
                       help="the two models re-scored with a reference scorer on a subsample (.cdiff): the report "
                            "says per metric whether the conclusion holds under both scorers")
    saved.set_defaults(run=_compare_scores)

    study = commands.add_parser("study", help="run a grid of settings from a TOML file and pool them",
                                description="Every model pair x question file x grid setting of the study file runs "
                                            "the compare pipeline in its own folder (resumable; a failed setting is "
                                            "reported, not fatal); the metrics are then pooled over the settings "
                                            "(mean relative change, fraction up, random-effects meta-analysis).",
                                parents=[common])
    study.add_argument("file", help="study file (TOML; see docs/study.md)")
    study.add_argument("--out", required=True, help="output directory (reused to resume)")
    study.add_argument("--quiet", action="store_true", help="no log lines")
    _devices_option(study, "settings")
    study.set_defaults(run=_study)

    trajectory = commands.add_parser(
        "trajectory", help="every checkpoint of a training run against its initial model",
        description="Each model answers the questions (one model in memory at a time); the questions every model "
                    "answers correctly are scored for each; every checkpoint is compared with the initial model and "
                    "each metric is tested for a trend along the steps (see docs/trajectory.md).", parents=[common])
    trajectory.add_argument("initial", help="the initial model: a checkpoint directory or a cached Hub id")
    trajectory.add_argument("checkpoints", nargs="+",
                            help="a run folder of checkpoint-N folders, a glob ('run/checkpoint-*'), or the folders")
    trajectory.add_argument("--initial-step", type=int, default=0, help="the initial model's step (0)")
    trajectory.add_argument("--log", dest="training_log", metavar="FILE",
                            help="trainer_state.json or CSV of per-step values (reward, ...) to correlate with")
    _pipeline_options(trajectory)
    _devices_option(trajectory, "checkpoints")
    trajectory.set_defaults(run=_trajectory)
    return parser


def _devices_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--devices", type=_device_list, metavar="LIST",
                        help=f"spread the {what} over these devices, one process each (e.g. cuda:0,cuda:1; default: "
                             "one process)")


def _device_list(text: str) -> list[str]:
    """``cuda:0, cuda:1`` as ``["cuda:0", "cuda:1"]``; nothing named is an error."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError(f"no device named in {text!r}; e.g. cuda:0,cuda:1")
    return devices


def _pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", required=True,
                        help="questions: a .jsonl/.json/.parquet file, or a dataset cached by Hugging Face (math500, "
                             "gsm8k, college-math, or a Hub id); see docs/datasets.md")
    parser.add_argument("--template", help="prompt template: plain (default), chat, qwen2.5-math, deepseek-math, "
                                           "r1-distill, mistral-math-shepherd, or a plugin's (the pair's with --pair)")
    parser.add_argument("--grader", help="answer checker: math-verify (default), boxed (the hand checker), or a "
                                         "plugin's; see docs/graders.md")
    parser.add_argument("--dataset-format", metavar="NAME",
                        help="the records' format: math500, gsm8k, college-math or questions (default: the named "
                             "dataset's; a local file or other Hub id is read as the questions schema)")
    parser.add_argument("--split", help="split of a Hub dataset (default: the format's, test)")
    parser.add_argument("--out", required=True, help="output directory (reused to resume)")
    parser.add_argument("--alpha", type=float, default=0.1, help="truncation fraction of the mean length (0.1)")
    parser.add_argument("--beta", type=float, default=0.5, help="lower length bound, fraction of the mean (0.5)")
    parser.add_argument("--gamma", type=float, default=1.5, help="upper length bound, multiple of the mean (1.5)")
    parser.add_argument("--delta", type=float, default=0.5, help="balance threshold (0.5)")
    parser.add_argument("--rule", choices=["paper", "code", "paper-code"], default="paper",
                        help="length rule: paper (default), code (the public code's criteria), paper-code (the "
                             "public code as it runs: its integer-truncated bounds; see docs/reproducing.md)")
    parser.add_argument("--n", type=int, default=100, help="questions to sample (100)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (42)")
    parser.add_argument("--max-questions", type=int, help="read only the first N questions of the file")
    parser.add_argument("--level", choices=_LEVELS, default="layer", help="graph level (layer)")
    _scorer_options(parser)
    parser.add_argument("--positions-per-pass", type=int, metavar="W",
                        help="eap only: score each batch in windows of W positions, to bound memory (one pass)")
    parser.add_argument("--contraction-dtype", choices=["bfloat16"],
                        help="eap only: bfloat16 source buffer and contraction, float32 sums (float32)")
    parser.add_argument("--checkpoint-blocks", action="store_true",
                        help="eap / eap-ig: keep one block's activations for the backward, not every block's "
                             "(long sequences; one more forward pass)")
    parser.add_argument("--fused-attention", action=argparse.BooleanOptionalAction,
                        help="eap / eap-ig: attention through torch's fused kernel, without the pos x pos pattern "
                             "(default: wherever the model allows it, all but Gemma 2; --no-fused-attention: the "
                             "bridge's eager attention)")
    parser.add_argument("--positions-per-chunk", type=int, metavar="C",
                        help="eap / eap-ig: form the receivers' gradients C positions at a time in the one backward "
                             "(long sequences; all at once)")
    parser.add_argument("--intervention", default="zero",
                        help="zero (the only one the pipeline runs; use cd.attribute for the others)")
    parser.add_argument("--batch-size", type=int, default=8, help="(8)")
    parser.add_argument("--generation-backend", choices=["hf", "vllm"],
                        help="hf (default: the model's own generate) or vllm (CUDA; pip install \"circuitdiff[vllm]\")")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"generation length limit (the pair's with --pair, else {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--fresh", action="store_true",
                        help="discard cached generations and score shards of an earlier run in --out")
    parser.add_argument("--drop-nonfinite", dest="nonfinite", action="store_const", const="drop", default="error",
                        help="leave samples with NaN/inf scores out (listed in the report) instead of stopping")


def _dry_run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the models, questions and settings, print the plan and a memory estimate, and "
                             "stop (no weights loaded, nothing written)")


def _trust_options(parser: argparse.ArgumentParser) -> None:
    """The scorer robustness check and cross-scoring (compare and demo)."""
    parser.add_argument("--no-robustness", dest="robustness", action="store_false",
                        help="skip re-scoring a subsample with a reference scorer (the report then cannot say whether "
                             "its conclusions depend on the scorer)")
    parser.add_argument("--robustness-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"paired samples re-scored by the robustness check ({DEFAULT_SAMPLES})")
    parser.add_argument("--cross-score", action="store_true",
                        help="also score each model on the other's answers: model effect with the text fixed, text "
                             "effect with the model fixed")


class _DeprecatedAlias(argparse.Action):
    """An old option name: sets the new option's value and prints a deprecation warning on stderr (once)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if not getattr(namespace, "deprecation_warned", False):
            print(f"circuitdiff: warning: {option_string} is deprecated and will be removed in the next release; use "
                  f"--{self.dest}.", file=sys.stderr)
            namespace.deprecation_warned = True
        setattr(namespace, self.dest, values)


def _scorer_options(parser: argparse.ArgumentParser) -> None:
    """``--scorer`` and its deprecated alias ``--method``."""
    parser.add_argument("--scorer", default="eap", help="scorer (eap)")
    parser.add_argument("--method", dest="scorer", action=_DeprecatedAlias, help="deprecated alias of --scorer")


def _config(args: argparse.Namespace, pair=None):
    """The run's PipelineConfig from the options; a pair supplies what the options leave unset."""
    from circuitdiff.pipeline import PipelineConfig

    names = {f.name for f in fields(PipelineConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "max_new_tokens" not in values:
        values["max_new_tokens"] = pair.max_new_tokens if pair is not None else DEFAULT_MAX_NEW_TOKENS
    if "template" not in values and pair is not None:
        values["template"] = pair.template
    return PipelineConfig(**values, progress=not args.quiet)


def _log(args: argparse.Namespace):
    return (lambda line: None) if args.quiet else print


def _compare(args: argparse.Namespace) -> int:
    from circuitdiff.pipeline import plan_run, run_compare

    pair = None
    if args.pair is not None:
        from circuitdiff.hub import get_pair

        if args.base is not None:
            raise ArgumentError("give either --pair NAME or the two checkpoints BASE TUNED, not both.")
        pair = get_pair(args.pair)
        args.base, args.tuned = pair.base, pair.tuned
    elif args.tuned is None:
        raise ArgumentError("compare needs two checkpoints, BASE and TUNED (directories or cached Hub ids), or "
                            "--pair NAME.")
    config = _config(args, pair)
    if args.dry_run:
        print(plan_run({"base": args.base, "tuned": args.tuned}, args.questions, args.out, config))
        return 0
    result = run_compare(args.base, args.tuned, args.questions, args.out, config, log=_log(args))
    _log(args)(result.to_markdown())
    return 0


def _score(args: argparse.Namespace) -> int:
    from circuitdiff.pipeline import plan_run, run_score

    if args.dry_run:
        print(plan_run({"model": args.model}, args.questions, args.out, _config(args)))
        return 0
    run_score(args.model, args.questions, args.out, _config(args), log=_log(args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from circuitdiff.demo import demo_config, run_demo, run_demo_trajectory

    config = demo_config(n=args.n, max_questions=args.max_questions, level=args.level, scorer=args.scorer,
                         progress=not args.quiet, fresh=args.fresh, robustness=args.robustness,
                         robustness_samples=args.robustness_samples, cross_score=args.cross_score)
    if args.trajectory:
        _log(args)(run_demo_trajectory(args.out, config, log=_log(args), devices=args.devices).to_markdown())
    elif args.devices:
        raise ArgumentError("--devices spreads a trajectory's checkpoints; use it with --trajectory.")
    else:
        run_demo(args.out, config, log=_log(args))
    return 0


def _compare_scores(args: argparse.Namespace) -> int:
    from circuitdiff.comparison import compare
    from circuitdiff.pipeline import prepare_output_dir, write_text
    from circuitdiff.scores import EdgeScores

    base, tuned = EdgeScores.load(args.base, mmap=True), EdgeScores.load(args.tuned, mmap=True)  # checks both files
    reference = None if args.reference_scores is None else tuple(EdgeScores.load(p) for p in args.reference_scores)
    out = prepare_output_dir(args.out, ("comparison.json", "report.md", "edge_tests.npz")) if args.out else None
    result = compare(base, tuned, paired=False if args.unpaired else None, coarsen=args.coarsen,
                     reference_scores=reference)
    report = result.to_markdown()
    if out is not None:
        result.to_json(str(out / "comparison.json"))
        if result.edge_tests is not None:
            result.edge_tests.save(out / "edge_tests.npz")
        write_text(out / "report.md", f"# circuitdiff compare-scores\n\n{args.base} vs {args.tuned}\n\n{report}\n")
    print(report)
    return 0


def _trajectory(args: argparse.Namespace) -> int:
    from circuitdiff.trajectory import read_training_log, run_trajectory

    checkpoints = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    logs = read_training_log(args.training_log) if args.training_log else None
    result = run_trajectory(args.initial, checkpoints, args.questions, args.out, _config(args),
                            initial_step=args.initial_step, logs=logs, devices=args.devices, log=_log(args))
    _log(args)(result.to_markdown())
    return 0


def _study(args: argparse.Namespace) -> int:
    from circuitdiff.study import run_study

    result = run_study(args.file, args.out, log=_log(args), devices=args.devices)
    print(result.to_markdown())
    return 1 if result.failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
