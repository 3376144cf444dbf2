"""The vLLM generation backend against the Hugging Face one, on a CUDA machine with vLLM installed.

    pip install "circuitdiff[vllm]"
    python benchmarks/vllm_check.py [--model base] [--questions 200] [--json out.json]

Generates the bundled demo model's greedy answers to the bundled questions with both
backends (``generate_answers(backend="hf")`` and ``backend="vllm"``) and prints how many
answers are token for token the same, how many graded verdicts agree, the accuracy of
each, and the wall time of each backend (one run each, after a warm-up question). The
answers may differ where two tokens nearly tie, since vLLM's kernels are not bit-identical
to Hugging Face's; the verdicts should agree on nearly every question.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch

import circuitdiff as cd
from circuitdiff.data import Question, generate_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", choices=["base", "grpo", "dpo"])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("vllm_check.py needs a CUDA device (vLLM runs on GPUs only).")
    data = resources.files("circuitdiff") / "demo_data"
    lines = (data / "questions.jsonl").read_text().splitlines()[:args.questions]
    questions = [Question(r["id"], r["prompt"], r["answer"]) for r in map(json.loads, lines)]
    with resources.as_file(data / args.model) as path:
        model = cd.load_model(path, device="cuda", dtype=torch.float32)
        answers, seconds = {}, {}
        for backend in ("hf", "vllm"):
            generate_answers(model, questions[:1], max_new_tokens=args.max_new_tokens, progress=False,
                             backend=backend)  # warm-up: kernels, engine start
            start = time.perf_counter()
            answers[backend] = generate_answers(model, questions, max_new_tokens=args.max_new_tokens, batch_size=32,
                                                progress=False, backend=backend)
            seconds[backend] = time.perf_counter() - start
    hf, vllm = answers["hf"], answers["vllm"]
    result = {
        "questions": len(questions),
        "same tokens": sum(a.answer_ids == b.answer_ids for a, b in zip(hf, vllm)),
        "same verdict": sum(a.correct == b.correct for a, b in zip(hf, vllm)),
        "accuracy hf": sum(a.correct for a in hf) / len(hf),
        "accuracy vllm": sum(b.correct for b in vllm) / len(vllm),
        "seconds hf": seconds["hf"], "seconds vllm (with engine start)": seconds["vllm"],
    }
    for name, value in result.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
