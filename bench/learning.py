"""Does lmforge still teach? The learning recipes, rerun short, each metric printed (`make bench-learning`).

Speed benchmarks (bench/run.py) say nothing of whether training still works: a change that stops a
recipe from teaching shows up here as a number. Each case runs a shipped recipe on a real model with
its steps cut (or as shipped with --full) and prints what the recipe is for:

- case:         recipes/case_domain_adaptation.yaml (MiniLM): accuracy of each branch, the baseline, forgetting
- lora_vs_full: recipes/lora_vs_full.yaml (MiniLM, Brown genre groups): full vs LoRA vs bottleneck adapters
                accuracy, trainable share
- sft:          recipes/smollm2_sft.yaml (SmolLM2-135M-Instruct): held-out ROUGE-L / exact match before -> after
- preferences:  recipes/smollm2_dpo.yaml (SmolLM2-135M-Instruct, MC-TACO pairs): DPO's held-out likelihood
                accuracy and implicit-reward accuracy, the reward model's held-out accuracy, start -> end
- grpo:         recipes/smollm2_grpo.yaml (SmolLM2-135M-Instruct, generated arithmetic): held-out reward, right
                numbers and number-only answers (greedy), start -> end

Results go to the run's file in bench/results/ (bench/results.py) with the machine's matmul speeds. Nothing asserts:
read the numbers (the README's tables hold the full-length ones).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = REPO / "runs" / "bench_learning"
SHARED = REPO.parent / "shared" / "data"

SHORT = {
    "case": ["stages.general.trainer.max_steps=60", "stages.continual.trainer.max_steps=60",
             "stages.direct.trainer.epochs=1", "stages.adapted.trainer.epochs=1", "eval_batches=10"],
    "lora_vs_full": ["stages.full.trainer.epochs=1", "stages.lora.trainer.epochs=1", "stages.adapter.trainer.epochs=1"],
    "sft": ["stages.sft.trainer.max_steps=40", "generation_examples=16"],
    "preferences": ["stages.dpo.trainer.max_steps=40", "stages.reward.trainer.max_steps=40"],
    "grpo": ["trainer.max_steps=20", "trainer.eval_every=20"],
}


def _lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge.cli", *args], check=True, cwd=REPO)


def _evals(root: Path, stage: str) -> list[dict]:
    folders = [root / stage] if (root / stage / "eval.json").is_file() else sorted((root / stage).glob("seed_*"))
    return [json.loads((f / "eval.json").read_text()) for f in folders]


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def _task_line(evals: list[dict], stage: str) -> dict:
    acc = [e["tasks"][stage]["after"]["accuracy"] for e in evals]
    base = [e["baseline"]["accuracy"] for e in evals if e.get("baseline")]
    train = evals[0]["summary"]["train"]
    return {"accuracy": acc, "baseline": base, "trainable_share": train["trainable"] / train["parameters"],
            "text": f"accuracy {_mean_sd(acc)} (baseline {_mean_sd(base)}), {train['trainable'] / train['parameters']:.1%} trainable"}


def case(out: Path, full: bool) -> dict:
    _lmforge("run", "recipes/case_domain_adaptation.yaml", f"output_dir={out}", *([] if full else SHORT["case"]))
    result = {}
    for stage in ("direct", "adapted"):
        result[stage] = _task_line(_evals(out, stage), stage)
        changes = [e["probes"]["general"]["change"]["relative_change"] for e in _evals(out, stage)]
        result[stage]["general_ppl_change"] = changes
        result[stage]["text"] += f", general perplexity {statistics.fmean(changes):+.0%}"
    return result


def lora_vs_full(out: Path, full: bool) -> dict:
    _lmforge("run", "recipes/lora_vs_full.yaml", f"output_dir={out}", *([] if full else SHORT["lora_vs_full"]))
    return {stage: _task_line(_evals(out, stage), stage) for stage in ("full", "lora", "adapter")}


def sft(out: Path, full: bool) -> dict:
    _lmforge("run", "recipes/smollm2_sft.yaml", f"output_dir={out}", *([] if full else SHORT["sft"]))
    g = _evals(out, "sft")[0]["generation"]
    return {"sft": {k: {"before": g["before"][k], "after": g["after"][k]} for k in ("rouge_l", "exact_match", "chrf")}
            | {"text": f"ROUGE-L {g['before']['rouge_l']:.3f} -> {g['after']['rouge_l']:.3f}, exact match "
                       f"{g['before']['exact_match']:.3f} -> {g['after']['exact_match']:.3f}"}}


def preferences(out: Path, full: bool) -> dict:
    from lmforge.engine.metrics import read_metrics

    _lmforge("run", "recipes/smollm2_dpo.yaml", f"output_dir={out}", *([] if full else SHORT["preferences"]))
    result = {}
    for stage, keys in (("dpo", ("likelihood_accuracy", "accuracy")), ("reward", ("accuracy",))):
        evals = read_metrics(out / stage / "metrics.jsonl", "val")
        first, last = evals[0], evals[-1]
        result[stage] = {k: {"before": first[k], "after": last[k]} for k in keys}
        result[stage]["text"] = ", ".join(f"held-out {k} {first[k]:.3f} -> {last[k]:.3f}" for k in keys)
    return result


def grpo(out: Path, full: bool) -> dict:
    from lmforge.engine.metrics import read_metrics

    _lmforge("run", "recipes/smollm2_grpo.yaml", f"output_dir={out}", *([] if full else SHORT["grpo"]))
    first, last = read_metrics(out / "metrics.jsonl", "val")[0], read_metrics(out / "metrics.jsonl", "val")[-1]
    keys = ("reward", "reward_numeric_match", "reward_regex")
    return {"grpo": {k: {"before": first[k], "after": last[k]} for k in keys}
            | {"text": ", ".join(f"held-out {k} {first[k]:.3f} -> {last[k]:.3f}" for k in keys)}}


CASES = {"case": case, "lora_vs_full": lora_vs_full, "sft": sft, "preferences": preferences, "grpo": grpo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--full", action="store_true", help="the recipes as shipped (tens of minutes each)")
    args = parser.parse_args()
    for script, name in (("spam_case_data.py", "case_data"), ("genre_task_data.py", "genre_data")):
        subprocess.run([sys.executable, str(REPO / "examples" / script), "--shared", str(SHARED), "--out",
                        str(REPO / "runs" / name)], check=True)
    from lmforge.engine.runtime import matmul_peak_gflops

    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "matmul_gflops": {p: round(matmul_peak_gflops(p)) for p in ("fp32", "bf16")}, "full": args.full, "cases": {}}
    for name in args.cases.split(","):
        start = time.time()
        results["cases"][name] = CASES[name](WORK / name, args.full)
        results["cases"][name]["seconds"] = round(time.time() - start)
        for stage, line in results["cases"][name].items():
            if isinstance(line, dict):
                print(f"{name} {stage}: {line['text']}")
        print(f"{name}: {results['cases'][name]['seconds']} s")
    sys.path.insert(0, str(HERE))
    from results import machine, record

    print(f"-> {record(results['cases'], machine(results['matmul_gflops'], full=args.full))}")


if __name__ == "__main__":
    main()
