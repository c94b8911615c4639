"""Start-up time of CLI calls that do no work: `lmforge --help`, a command's --help, `--version`.

A user waits for these every time; the target is under 3 s on the 2-core dev machine (lazy imports:
torch and transformers load only in commands that need them). Each call runs in a fresh process,
best of --repeat; the baseline is a bare interpreter (`python -c pass`) measured in the same run, so
the ratio says what lmforge itself adds on this machine.

    python bench/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

CALLS = [["--help"], ["--version"], ["check", "--help"], ["run", "--help"], ["chat", "--help"]]
TARGET_S = 3.0


def best_of(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)  # other work on the machine only ever adds time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    lmforge = shutil.which("lmforge") or str(Path(sys.executable).with_name("lmforge"))
    baseline = best_of([sys.executable, "-c", "pass"], args.repeat)
    print(f"baseline: python -c pass {baseline:.3f} s")
    worst, calls = 0.0, {}
    for call in CALLS:
        seconds = best_of([lmforge, *call], args.repeat)
        worst = max(worst, seconds)
        calls[" ".join(call)] = seconds
        print(f"lmforge {' '.join(call):<14} {seconds:6.3f} s  ({seconds / baseline:5.1f}x the bare interpreter)")
    verdict = "within" if worst < TARGET_S else "OVER"
    print(f"slowest {worst:.3f} s: {verdict} the {TARGET_S:.0f} s target")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import machine, record  # bench/results.py: one file per run (no GEMMs timed here)

    record({"startup": {"baseline_s": baseline, "calls_s": calls, "slowest_s": worst, "target_s": TARGET_S}}, machine({}))
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
