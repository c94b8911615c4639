"""Quantization-aware training against post-training quantization on SmolLM2-135M-Instruct
(recipes/smollm2_qat.yaml): held-out answer loss and perplexity, size on disk, CPU generation speed.

Models scored, all on the same held-out answers of the recipe's split:
- float:        the `float` stage's final/ (full fine-tuning, no quantization)
- PTQ int8/int4: that model through `lmforge export --format torchao` (post-training quantization)
- QAT int4:     the `qat` stage's quantized/ (trained fake-quantized, then converted)
- QAT float:    the `qat` stage's final/ (its float weights, unquantized), for reference

    python bench/qat.py [--skip-train] [--out runs/smollm2_qat]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge.cli", *args], check=True, cwd=REPO)


def _weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def _tokens_per_second(model, tokenizer, new_tokens: int = 48) -> float:
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers of Europe."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=4, do_sample=False)  # warm up
        start = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - prompt["input_ids"].shape[1]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/smollm2_qat")
    parser.add_argument("--skip-train", action="store_true", help="reuse the recipe's runs in --out")
    args = parser.parse_args()
    out = REPO / args.out
    if not args.skip_train:
        _lmforge("run", "recipes/smollm2_qat.yaml", f"output_dir={out}")
    for weights in ("int8", "int4"):
        _lmforge("export", str(out / "float" / "final"), "-o", str(out / f"ptq_{weights}"), "--format", "torchao",
                 "--dtype", weights)

    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.runtime import matmul_peak_gflops
    from lmforge.models.factory import load_model
    from lmforge.objectives import get_objective
    from lmforge.recipe_files import load_recipe
    from lmforge.sources import training_source

    recipe = load_recipe(out / "float" / "recipe.yaml")
    tokenizer = load_tokenizer(out / "float" / "final")
    objective = get_objective(recipe.objective, tokenizer)
    evaluate = training_source(recipe, objective, tokenizer, {}, torch.device("cpu"), None)["evaluate"]
    models = {"float": out / "float" / "final", "PTQ int8": out / "ptq_int8", "PTQ int4": out / "ptq_int4",
              "QAT int4": out / "qat" / "quantized", "QAT float weights": out / "qat" / "final"}
    rows = {}
    for name, folder in models.items():
        model = load_model(folder, "causal_lm").eval()
        metrics = evaluate(model, "fp32")
        rows[name] = {"answer_loss": metrics["loss"], "perplexity": math.exp(metrics["loss"]),
                      "weights_mb": _weights_mb(folder), "tokens_per_s": _tokens_per_second(model, tokenizer)}
        print(name, rows[name], flush=True)
    fp32, bf16 = matmul_peak_gflops("fp32"), matmul_peak_gflops("bf16")
    print(f"\nmachine: fp32 {fp32:.0f} / bf16 {bf16:.0f} GFLOP/s GEMMs")
    print("| model | held-out answer loss | perplexity | weights on disk | CPU greedy tokens/s (batch 1) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['answer_loss']:.4f} | {r['perplexity']:.2f} | {r['weights_mb']:.0f} MB | {r['tokens_per_s']:.1f} |")
    (out / "qat_bench.json").write_text(json.dumps({"rows": rows, "fp32_gflops": fp32, "bf16_gflops": bf16}, indent=1))


if __name__ == "__main__":
    main()
