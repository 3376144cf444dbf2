"""Stub inputs for pipeline and CLI tests: two tiny checkpoints, six questions, stub generation caches.

The caches make the tiny random models "answer" chosen questions correctly with answers
of chosen lengths, which exercises the cache path of generation; everything after that
(selection, truncation, scoring, comparison, reports) runs for real. The ``run_files``
fixture (in conftest.py) writes the checkpoints and questions.
"""

from __future__ import annotations

import json

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.data.generation import answer_identity, generation_settings
from circuitdiff.identity import model_identity

MAX_NEW_TOKENS = 32  # above every stub answer (30 tokens at most): none counts as cut
ANSWER_LENGTHS = {"base": [10, 12, 11, 13, 12, 9], "tuned": [11, 12, 12, 12, 13, 30]}
WRONG = {"base": {4}, "tuned": set()}  # base gets q4 wrong; q5's tuned answer is too long for the window


def write_run_files(checkpoints, root):
    """The base and tuned checkpoints and the questions file of the pipeline tests, under ``root``."""
    tuned = tm.write_checkpoint("llama", root / "tuned", seed=1)
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i} w{i + 1} w{i + 2}", "answer": "4"}) + "\n"
                                 for i in range(6)))
    return {"base": checkpoints["llama"], "tuned": tuned, "questions": questions, "root": root}


def answer_ids(side, question, length):
    """The stub answer of ``side`` to question ``question``: token ids, different for the two models."""
    offset = 0 if side == "base" else 3
    return [(7 * question + k + offset) % 30 for k in range(length)]


def write_caches(files, out):
    """Stub generation caches: answers of the chosen lengths, boxed 4 (correct) or 5 (wrong)."""
    out.mkdir(parents=True, exist_ok=True)
    for side in ("base", "tuned"):
        model = cd.load_model(files[side], device="cpu")
        produced_by = model_identity(model)
        lines = []
        for i, length in enumerate(ANSWER_LENGTHS[side]):
            answer = "5" if i in WRONG[side] else "4"
            ids = answer_ids(side, i, length)
            prompt = f"w{i} w{i + 1} w{i + 2}"
            prompt_length = len(model.tokenizer(prompt)["input_ids"])
            lines.append(json.dumps({"id": f"q{i}", "text": f"so \\boxed{{{answer}}}", "answer_ids": ids,
                                     "prompt_length": prompt_length,
                                     "identity": answer_identity(produced_by, prompt,
                                                                 generation_settings(model, MAX_NEW_TOKENS))}))
        (out / f"{side}.generations.jsonl").write_text("\n".join(lines) + "\n")


def cli_args(files, out, *extra):
    return ["compare", str(files["base"]), str(files["tuned"]), "--questions", str(files["questions"]),
            "--out", str(out), "--alpha", "0.5", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2",
            "--device", "cpu", "--dtype", "float32", "--quiet", *extra]
