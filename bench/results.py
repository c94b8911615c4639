"""One results file per benchmark run, every case of the run in it.

`make bench` gives its scripts one run id (BENCH_RUN, the run's start time): each records its cases into
bench/results/run-<id>.json (gpu-run-<id>.json on a GPU), so one file holds the whole run, the machine it
ran on (its measured fp32 / bf16 GEMM rates: figures from different machines are not comparable) and
when each case was measured. `finish()`, at the end of the run, copies that file to latest.json
(gpu-latest.json). A script run alone (`python bench/generation.py --only llama_cpp`) records into a run
of its own, named by its start time, and leaves latest.json to whole runs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_ALONE = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")  # this process's run, when no BENCH_RUN is given


def run_id() -> str:
    return os.environ.get("BENCH_RUN") or _ALONE


def run_file(gpu: bool = False) -> Path:
    return RESULTS / f"{'gpu-' if gpu else ''}run-{run_id()}.json"


def machine(peaks: dict, **more) -> dict:
    """The machine a case ran on: CPU, cores, torch, the GEMM rates measured in the same run."""
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "matmul_gflops": peaks, **more}


def record(cases: dict, machine_info: dict, gpu: bool = False) -> Path:
    """Add `cases` to this run's file (a case measured again replaces its earlier figures in the same run)."""
    RESULTS.mkdir(exist_ok=True)
    path = run_file(gpu)
    run = json.loads(path.read_text()) if path.is_file() else {"run": run_id(), "machine": machine_info, "cases": {}}
    now = datetime.datetime.now().isoformat(timespec="seconds")
    for name, case in cases.items():
        run["cases"][name] = {**case, "measured": now}
    if machine_info != run["machine"]:  # a later script measured the GEMMs again: kept beside its cases
        for name in cases:
            run["cases"][name]["machine"] = machine_info
    path.write_text(json.dumps(run, indent=2))
    return path


def finish(gpu: bool = False) -> Path:
    """The whole run's file becomes latest.json."""
    latest = RESULTS / f"{'gpu-' if gpu else ''}latest.json"
    shutil.copyfile(run_file(gpu), latest)
    return latest


if __name__ == "__main__":  # `python bench/results.py finish [--gpu]`: the end of `make bench` (bench/gpu.sh)
    import sys

    if sys.argv[1:2] != ["finish"] or not os.environ.get("BENCH_RUN"):
        sys.exit("usage: BENCH_RUN=ID python bench/results.py finish [--gpu]  (the run's scripts ran under that BENCH_RUN)")
    gpu = "--gpu" in sys.argv[2:]
    if not run_file(gpu).is_file():
        sys.exit(f"bench: no {run_file(gpu)}: no case was recorded under BENCH_RUN={run_id()}")
    print(f"bench: {run_file(gpu)} -> {finish(gpu)}")
