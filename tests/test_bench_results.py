"""bench/results.py: every script of one `make bench` run records into one file; latest.json is that file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _record(tmp_path, run: str | None, cases: dict, peaks: dict) -> str:
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import results; "
            f"results.RESULTS = __import__('pathlib').Path(sys.argv[2]); "
            f"print(results.record({cases!r}, results.machine({peaks!r})))")
    env = {k: v for k, v in os.environ.items() if k != "BENCH_RUN"} | ({"BENCH_RUN": run} if run else {})
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "bench"), str(tmp_path)], env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_scripts_of_one_run_write_one_file_and_finish_makes_it_latest(tmp_path):
    first = _record(tmp_path, "2026-12-08T010203", {"generate_batch": {"speedup": 3.5}}, {"fp32": 199.0, "bf16": 427.0})
    second = _record(tmp_path, "2026-12-08T010203", {"grpo_step": {"step_speedup": 1.6}}, {"fp32": 201.0, "bf16": 425.0})
    assert first == second == str(tmp_path / "run-2026-12-08T010203.json")
    run = json.loads((tmp_path / "run-2026-12-08T010203.json").read_text())
    assert set(run["cases"]) == {"generate_batch", "grpo_step"} and run["machine"]["matmul_gflops"]["fp32"] == 199.0
    assert run["cases"]["grpo_step"]["machine"]["matmul_gflops"]["fp32"] == 201.0  # its own GEMM rates, kept beside it
    assert all("measured" in case for case in run["cases"].values())
    alone = _record(tmp_path, None, {"llama_cpp": {}}, {})  # a script run alone: a run of its own
    assert alone != first and json.loads(Path(alone).read_text())["cases"].keys() == {"llama_cpp"}
    code = "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import results; results.RESULTS = pathlib.Path(sys.argv[2]); print(results.finish())"
    subprocess.run([sys.executable, "-c", code, str(REPO / "bench"), str(tmp_path)],
                   env={**os.environ, "BENCH_RUN": "2026-12-08T010203"}, check=True, capture_output=True)
    assert json.loads((tmp_path / "latest.json").read_text()) == run
