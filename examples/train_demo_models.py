#!/usr/bin/env python
"""Train three tiny Llama-architecture demo models (base / grpo / dpo) on CPU.

Task: synthetic arithmetic such as ``Q: 12+7*3=`` with a short step-by-step
answer `` 7*3=21 12+21=33 \\boxed{33}``.  A character-level tokenizer is
built with ``tokenizers`` and wrapped in ``PreTrainedTokenizerFast``.

Stages
  base : SFT with TRL ``SFTTrainer`` (prompt/completion data, completion-only loss),
         deliberately under-trained so greedy accuracy is imperfect.
  grpo : base + TRL ``GRPOTrainer``, reward = 1 for a correct final answer, else 0; its
         weights every ``grpo_checkpoint_every`` steps (the last included) go to
         ``DIR/grpo-run/checkpoint-N`` and its ``trainer_state.json`` (the reward log) to
         ``DIR/grpo-run`` (what ``circuitdiff demo --trajectory`` follows).
  dpo  : base + TRL ``DPOTrainer`` on offline preference pairs: base's own correct vs.
         wrong completion, sampled once on training prompts; same number of steps as grpo.

Usage::

    pip install -e ".[train]"
    python examples/train_demo_models.py --out src/circuitdiff/demo_data   # ~20 min on 2 cores
    python examples/train_demo_models.py --out /tmp/demo --quick          # smoke test, ~1 min
    python examples/train_demo_models.py --out DIR --grpo-run-only  # only DIR/grpo-run, from DIR/base (~9 min)

``DIR/{base,grpo,dpo}`` hold the checkpoints (safetensors + tokenizer + config),
``DIR/questions.jsonl`` the held-out problems, and ``DIR/manifest.json`` the seed,
budgets, accuracies, wall times, library versions and every file's SHA-256 (what
``circuitdiff demo`` checks). Fixed seeds; the same library versions and thread count
reproduce the files.
It uses circuitdiff only to hash the files as ``circuitdiff demo`` checks them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

SEED = 1234
MAX_NEW_TOKENS = 40

# --------------------------------------------------------------------------- task


def make_problem(rng: random.Random) -> dict:
    """One problem: prompt, reference completion and integer answer."""
    kind = rng.randrange(3)
    if kind == 0:  # a+b*c
        a, b, c = rng.randint(1, 99), rng.randint(2, 9), rng.randint(2, 9)
        x = b * c
        y = a + x
        expr, steps = f"{a}+{b}*{c}", f"{b}*{c}={x} {a}+{x}={y}"
    elif kind == 1:  # a*b-c
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        x = a * b
        c = rng.randint(1, x)
        y = x - c
        expr, steps = f"{a}*{b}-{c}", f"{a}*{b}={x} {x}-{c}={y}"
    else:  # a+b-c
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        x = a + b
        c = rng.randint(1, x)
        y = x - c
        expr, steps = f"{a}+{b}-{c}", f"{a}+{b}={x} {x}-{c}={y}"
    return {
        "prompt": f"Q: {expr}=",
        "completion": f" {steps} \\boxed{{{y}}}",
        "answer": str(y),
    }


def make_split(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set(exclude or ())
    while len(out) < n:
        p = make_problem(rng)
        if p["prompt"] in seen:
            continue
        seen.add(p["prompt"])
        out.append(p)
    return out


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUM = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """Last \\boxed{} content, else last integer."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def is_correct(completion: str, answer: str) -> bool:
    return extract_answer(completion) == answer


# ---------------------------------------------------------------------- tokenizer

CHARS = list("0123456789+-*=: Q\\boxed{}")
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]  # pad != 0 on purpose (TRL uses `pad_id or eos_id`)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(CHARS))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character (spaces included) becomes its own token
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate tokens without inserting spaces
    tok.add_special_tokens(SPECIALS)  # so "<eos>" in text is matched before char splitting
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.model_max_length = 128
    # round-trip check over the task's characters
    for s in ["Q: 12+7*3=", " 7*3=21 12+21=33 \\boxed{33}", "  1 2  ", "Q: 1+2-3= 1+2=3 3-3=0 \\boxed{0}"]:
        ids = fast(s, add_special_tokens=False)["input_ids"]
        assert fast.decode(ids) == s, (s, fast.decode(ids))
        assert len(ids) == len(s)
    assert fast("x<eos>", add_special_tokens=False)["input_ids"][-1] == fast.eos_token_id
    return fast


# -------------------------------------------------------------------------- model


def build_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


# ------------------------------------------------------------------------- helpers


@torch.no_grad()
def generate(model, tok, prompts, *, do_sample=False, temperature=1.0, num_return_sequences=1, batch_size=256):
    model.eval()
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        kw = dict(max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if do_sample:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_return_sequences)
        else:
            kw.update(do_sample=False)
        gen = model.generate(**enc, **kw)
        outs.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs


def accuracy(model, tok, problems) -> float:
    comps = generate(model, tok, [p["prompt"] for p in problems])
    return sum(is_correct(c, p["answer"]) for c, p in zip(comps, problems)) / len(problems)


def save(model, tok, path: Path):
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def load(path: Path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    return AutoModelForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)


def common_args(out_dir: Path, steps: int, lr: float, bs: int):
    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=bs,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, steps // 10),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,  # TRL configs enable it by default; pointless (and slower) here
    )


# -------------------------------------------------------------------------- stages


def train_base(tok, train, out_dir: Path, budget: dict):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = build_model(tok)
    ds = Dataset.from_list([{"prompt": p["prompt"], "completion": p["completion"]} for p in train])
    cfg = SFTConfig(
        **common_args(out_dir / "_sft", budget["sft_steps"], budget["sft_lr"], budget["sft_bs"]),
        max_length=96,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    return trainer.model


def train_grpo(tok, base_dir: Path, train, out_dir: Path, budget: dict, run_dir: Path):
    """GRPO from ``base_dir``; saves the weights every ``grpo_checkpoint_every`` steps (and
    at the last) to ``run_dir/checkpoint-N`` and the trainer state (log history) to
    ``run_dir/trainer_state.json``."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class SaveEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % budget["grpo_checkpoint_every"] == 0 or step == state.max_steps:
                save(model, tok, run_dir / f"checkpoint-{step}")

    model, _ = load(base_dir)

    def correctness_reward(prompts, completions, answer, **kwargs):
        return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]

    ds = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in train])
    cfg = GRPOConfig(
        **{**common_args(out_dir / "_grpo", budget["grpo_steps"], budget["grpo_lr"], budget["grpo_bs"]),
           # the reward is logged at every checkpoint's step (the mean over the 20 steps before it)
           "logging_steps": math.gcd(20, budget["grpo_checkpoint_every"])},
        num_generations=budget["num_generations"],
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,  # no reference model -> cheaper on CPU
        disable_dropout=True,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness_reward],
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[SaveEvery()],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer.train()
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    return trainer.model


def make_dpo_pairs(model, tok, train, n_prompts: int, n_samples: int):
    """Sample ``n_samples`` completions per prompt once from base; pair its first correct
    one (chosen) with its first wrong one (rejected). Prompts without both are skipped, so
    every pair is the model's own text (no reference solutions)."""
    torch.manual_seed(SEED)
    probs = train[:n_prompts]
    comps = generate(model, tok, [p["prompt"] for p in probs], do_sample=True, num_return_sequences=n_samples)
    pairs = []
    for i, p in enumerate(probs):
        cs = comps[i * n_samples : (i + 1) * n_samples]
        good = [c for c in cs if is_correct(c, p["answer"])]
        bad = [c for c in cs if not is_correct(c, p["answer"])]
        if good and bad:
            pairs.append({"prompt": p["prompt"], "chosen": good[0], "rejected": bad[0]})
    return pairs


def train_dpo(tok, base_dir: Path, pairs, out_dir: Path, budget: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, _ = load(base_dir)
    ds = Dataset.from_list(pairs)
    cfg = DPOConfig(
        **common_args(out_dir / "_dpo", budget["dpo_steps"], budget["dpo_lr"], budget["dpo_bs"]),
        beta=budget["dpo_beta"],
        loss_type=budget["dpo_loss"],  # list in TRL 1.x; "sft" on chosen (RPO-style) keeps the policy from collapsing
        loss_weights=budget["dpo_loss_weights"],
        max_length=96,
        disable_dropout=True,
    )
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    return trainer.model


# ---------------------------------------------------------------------------- main

# Budgets measured on 2 CPU cores, 1 thread per process (greedy accuracy on the 500
# held-out problems; base 44.4%). See docs/demo.md for the sweeps behind these choices.
FULL = dict(
    n_train=20000, n_eval=500,
    sft_steps=800, sft_lr=2e-3, sft_bs=64,  # 750 steps: 44%, 1050: 64%, 1200: 66%
    # GRPO, 600 steps: lr 3e-5 rose steadily to 64.2%; lr 1e-4 peaked at 60.6% (step 500) and fell to 56.2%
    grpo_steps=600, grpo_lr=3e-5, grpo_bs=64, num_generations=8,  # 8 prompts x 8 samples per step
    grpo_checkpoint_every=100,  # 6 checkpoints in grpo-run/, 2.9 MB each
    # DPO, 600 steps on 2228 pairs: pure sigmoid at lr 1e-5 peaked at 52.6% (step 100) and fell to 43.0%
    # (step 500); the added NLL term on the chosen answer (RPO) keeps it from drifting (55.8% at step 200)
    dpo_prompts=3000, dpo_samples=8, dpo_steps=600, dpo_lr=5e-5, dpo_bs=16,
    dpo_beta=0.1, dpo_loss=["sigmoid", "sft"], dpo_loss_weights=[1.0, 1.0],
)
QUICK = dict(
    n_train=2000, n_eval=100,
    sft_steps=60, sft_lr=2e-3, sft_bs=64,
    grpo_steps=4, grpo_lr=1e-4, grpo_bs=16, num_generations=4, grpo_checkpoint_every=2,
    dpo_prompts=200, dpo_samples=4, dpo_steps=4, dpo_lr=1e-4, dpo_bs=8,
    dpo_beta=0.1, dpo_loss=["sigmoid", "sft"], dpo_loss_weights=[1.0, 1.0],
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path,
                    help="output folder; src/circuitdiff/demo_data replaces the bundled demo")
    ap.add_argument("--quick", action="store_true", help="tiny budget for smoke tests")
    ap.add_argument("--grpo-run-only", action="store_true",
                    help="write only OUT/grpo-run: GRPO again from OUT/base with its checkpoints (the other "
                         "models and the questions are kept)")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: with 2 OpenMP threads on a shared 2-core box a step was ~20x slower)",
    )
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)

    import datasets
    import transformers
    import trl
    from transformers import set_seed

    from circuitdiff.demo import check_demo_files, file_sha256

    set_seed(SEED)
    random.seed(SEED)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="circuitdiff-train-"))  # the trainers' output_dir; nothing is kept

    train = make_split(budget["n_train"], SEED)
    evals = make_split(budget["n_eval"], SEED + 1, exclude={p["prompt"] for p in train})
    tok = build_tokenizer()
    times, acc, extra = {}, {}, {}
    if args.grpo_run_only:  # keep what the full run recorded for the three models
        previous = json.loads((out / "manifest.json").read_text())
        times, acc = previous["wall_time_s"], previous["accuracy"]
        extra = {"dpo_pairs": previous["dpo_pairs"]}
    else:
        with open(out / "questions.jsonl", "w") as handle:
            for i, p in enumerate(evals):
                handle.write(json.dumps({"id": f"demo-{i:03d}", "prompt": p["prompt"], "answer": p["answer"]}) + "\n")
    t_all = time.time()

    def finish(name: str, model, started: float) -> None:
        """Save a trained model, record its training time and held-out accuracy."""
        save(model, tok, out / name)
        times[f"{name}_train_s"] = round(time.time() - started, 1)
        acc[name] = accuracy(model, tok, evals)
        print(f"[{name}] eval acc={acc[name]:.3f}  train {times[f'{name}_train_s']}s", flush=True)

    if not args.grpo_run_only:
        t0 = time.time()
        finish("base", train_base(tok, train, work, budget), t0)

    set_seed(SEED)
    t0 = time.time()
    run_dir = out / "grpo-run"
    grpo = train_grpo(tok, out / "base", train, work, budget, run_dir)
    if args.grpo_run_only:
        times["grpo_run_train_s"] = round(time.time() - t0, 1)
        extra["grpo_run_made_by"] = "examples/train_demo_models.py --grpo-run-only, after the full run"
    else:
        finish("grpo", grpo, t0)
    extra["grpo_run_accuracy"] = {
        folder.name: accuracy(load(folder)[0], tok, evals)
        for folder in sorted(run_dir.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1]))
    }
    print(f"[grpo-run] {extra['grpo_run_accuracy']}", flush=True)

    if not args.grpo_run_only:
        set_seed(SEED)
        t0 = time.time()
        base_m, _ = load(out / "base")
        pairs = make_dpo_pairs(base_m, tok, train, budget["dpo_prompts"], budget["dpo_samples"])
        times["dpo_sampling_s"] = round(time.time() - t0, 1)
        extra["dpo_pairs"] = len(pairs)
        print(f"[dpo] {len(pairs)} pairs of base's own correct and wrong answers", flush=True)
        t0 = time.time()
        finish("dpo", train_dpo(tok, out / "base", pairs, work, budget), t0)
        times["total_s"] = round(time.time() - t_all, 1)
    shutil.rmtree(work, ignore_errors=True)

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "script": "examples/train_demo_models.py" + (" --quick" if args.quick else ""),
        "seed": SEED,
        "task": "synthetic arithmetic (a+b*c, a*b-c, a+b-c), two steps, final answer in \\boxed{}",
        "tokenizer": "one token per character",
        "n_train": len(train),
        "questions": "questions.jsonl: the held-out problems",
        "n_questions": len(evals),
        "eval_metric": "greedy exact final-answer accuracy (last \\boxed{}) on questions.jsonl",
        "accuracy": acc,
        "wall_time_s": times,
        "budget": budget,
        **extra,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
        },
        "files": {p.relative_to(out).as_posix(): file_sha256(p) for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    check_demo_files(out)  # what circuitdiff demo will check
    print(json.dumps({"accuracy": acc, "wall_time_s": times}, indent=2))


if __name__ == "__main__":
    main()
