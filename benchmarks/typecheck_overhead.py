"""Cost of the runtime shape checks (circuitdiff.typecheck) per ``cd.attribute`` call.

Runs ``shape_checked(cd.attribute)`` on the bundled demo model (a 4-layer Llama, d_model
128, vocabulary 29) with the checks off and on, interleaved so drift hits both alike, and
prints the medians and their ratio; then, since on a busy machine that ratio is mostly
noise, how many annotations one call checks (the objective and ``evaluate`` per forward
pass, ``Batch`` per batch moved, ``EdgeScores`` at the end), the time spent in those
checks (median) and its share of the unchecked call. A tiny model is the worst case: the
checks cost the same whatever the model's size.

    python benchmarks/typecheck_overhead.py --threads 1   # --threads 1 on a shared machine
    python benchmarks/typecheck_overhead.py --scorer eap --batch-size 1 --tokens 8 --batches 8 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import circuitdiff as cd
from circuitdiff import typecheck
from circuitdiff.demo import DEMO_DATA


def time_in_checks(call) -> tuple[int, float]:
    """How many annotations one ``call()`` checks and the seconds spent checking them.

    A timing wrapper around the checker: a direct measure, unlike the difference of two
    noisy medians (it leaves out the jaxtyping context and the wrapper's loop, ~1 us a call).
    """
    check, spent = typecheck._check, [0, 0.0]

    def timed(*args):
        start = time.perf_counter()
        try:
            check(*args)
        finally:
            spent[0] += 1
            spent[1] += time.perf_counter() - start

    typecheck._check = timed
    typecheck.enable(True)
    try:
        call()
    finally:
        typecheck._check = check
    return spent[0], spent[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", action="append", help="default: eap and eap-ig-inputs")
    parser.add_argument("--level", default="layer", choices=("layer", "head"))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = cd.load_model(DEMO_DATA / "base", dtype=torch.float32, device="cpu")
    graph = cd.AttributionGraph.from_model(model, level=args.level)
    vocab = model.cfg.d_vocab
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.batches * args.batch_size, args.tokens - 3), generator=g).tolist()
    answers = torch.randint(0, vocab, (args.batches * args.batch_size, 4), generator=g).tolist()
    batches = cd.make_batches(model.tokenizer, prompts, answers, batch_size=args.batch_size)
    attribute = typecheck.shape_checked(cd.attribute)
    print(f"demo model ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}), {args.level} level, "
          f"{args.batches} batches of {args.batch_size} x {args.tokens} tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'scorer':<16}{'off ms':>9}{'on ms':>9}{'on/off':>9}{'checks':>8}{'in checks ms':>14}{'share':>8}")
    for scorer in args.scorer or ["eap", "eap-ig-inputs"]:
        def call() -> None:
            attribute(model, graph, batches, objective="answer_nll", scorer=scorer, intervention="zero",
                      progress=False)

        def run(on: bool) -> float:
            typecheck.enable(on)
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

        run(False), run(True)  # warm up (and resolve the annotations once)
        times: dict[bool, list[float]] = {False: [], True: []}
        spent = []
        for repeat in range(args.repeats):
            for on in (False, True) if repeat % 2 else (True, False):  # neither always goes first
                times[on].append(run(on))
            n, seconds = time_in_checks(call)
            spent.append(seconds)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        checking = statistics.median(spent)
        print(f"{scorer:<16}{off * 1e3:9.1f}{on * 1e3:9.1f}{on / off:8.3f}x{n:8d}{checking * 1e3:14.2f}"
              f"{checking / off:8.2%}")

if __name__ == "__main__":
    main()
