"""Wall time of ``circuitdiff demo`` as a user runs it, with a breakdown by stage.

Runs the ``circuitdiff`` command installed next to this Python (``circuitdiff demo --out
<folder>``, the folder deleted before each run) ``--runs`` times, one process after the other, and prints the
median wall time: imports, the manifest check, loading, generation, scoring, the robustness
check, reports and figures. The demo prints a line when each stage ends; the time from the
previous line to that one is the stage's time, and its median over the runs is printed per
line. The lines of one message (the final table) arrive together and count as one.

    python benchmarks/demo_time.py [--runs 3] [--json out.json] [-- more demo options]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Lines that arrive within this many seconds of the previous one belong to the same message.
SAME_MESSAGE_S = 0.05


def command() -> str:
    """The ``circuitdiff`` console script of this environment (else the one on PATH)."""
    script = Path(sys.executable).parent / "circuitdiff"
    found = str(script) if script.is_file() else shutil.which("circuitdiff")
    if found is None:
        sys.exit("no circuitdiff command next to this Python or on PATH; install circuitdiff (pip install -e .)")
    return found


def time_one_run(demo: list[str], out: Path) -> tuple[float, list[tuple[str, float]]]:
    """Runs ``demo --out out``; returns its wall time and ``(first line, seconds)`` per message."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line leaves the process when it is printed
    with tempfile.TemporaryFile("w+") as stderr:
        start = last = time.perf_counter()
        stages: list[tuple[str, float]] = []
        with subprocess.Popen([*demo, "--out", str(out)], stdout=subprocess.PIPE, stderr=stderr, text=True,
                              env=env) as process:
            for line in process.stdout:
                now = time.perf_counter()
                if stages and now - last < SAME_MESSAGE_S:
                    stages[-1] = (stages[-1][0], stages[-1][1] + now - last)
                else:
                    stages.append((line.rstrip("\n"), now - last))
                last = now
        wall = time.perf_counter() - start
        if process.returncode != 0:
            stderr.seek(0)
            sys.exit(f"{' '.join(demo)} failed (exit {process.returncode}):\n{stderr.read()[-5000:]}")
    stages.append(("(process exit)", wall - (last - start)))
    return wall, stages


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs, one after the other (3)")
    parser.add_argument("--json", help="also write the times to this file")
    parser.add_argument("demo_options", nargs="*", help="more options for circuitdiff demo, after --")
    args = parser.parse_args()
    demo = [command(), "demo", *args.demo_options]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{' '.join(demo)}: {args.runs} runs; {cores} cores ({cpu_model()}), Python {platform.python_version()}, "
          f"load average before {os.getloadavg()[0]:.2f}")

    walls, runs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "circuitdiff-demo"  # the same path each run, so the runs print the same lines
        for i in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            wall, stages = time_one_run(demo, out)
            walls.append(wall)
            runs.append(stages)
            print(f"run {i + 1}: {wall:.1f} s (load average {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\nmedian wall time: {statistics.median(walls):.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)})")
    if len({tuple(line for line, _ in stages) for stages in runs}) == 1:
        print("\nmedian s  stage ends with the line")
        for k, (line, _) in enumerate(runs[0]):
            print(f"{statistics.median(stages[k][1] for stages in runs):8.1f}  {line[:100]}")
    else:
        print("\n(the runs printed different lines; no per-stage medians)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": demo, "cores": cores, "cpu": cpu_model(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "wall_s": walls, "median_wall_s": statistics.median(walls),
            "stages": runs,
        }, indent=2))


if __name__ == "__main__":
    main()
