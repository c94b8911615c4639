"""lmforge vs Hugging Face `Trainer` / `datasets`, side by side in one run (`make bench`).

Each case runs both tools in separate processes (so peak RSS is each tool's own), alternating,
`--repeats` times, on the same model config, data, batch, sequence length and number of steps,
and reports medians. Both losses must fall. Results go to bench/results/latest.json (and a dated
copy); one line per case is printed. This is a benchmark, not a test: nothing here asserts speed.

Cases: clm_pretrain_defaults, clm_pretrain_equal, prepare, prepare_memory (peak RSS of preparing a
generated corpus at two sizes). sft_variable_length and lora_vs_full need the SFT objective and the
LoRA method, which lmforge does not have yet.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = REPO / "runs" / "bench"
SHARED_BROWN = REPO.parent / "shared" / "data" / "brown.jsonl.gz"
EXCERPT = REPO / "assets" / "corpora" / "brown_excerpt.jsonl.gz"
# The reference model: GPT-2, 8 layers, 512 wide, vocab 8192, seq 256, batch 8 (29.6M).
GPT2 = {"n_layer": 8, "n_embd": 512, "n_head": 8}
SEQ, BATCH, VOCAB = 256, 8, 8192


def corpus_path() -> Path:
    return SHARED_BROWN if SHARED_BROWN.is_file() else EXCERPT


def texts() -> list[str]:
    with gzip.open(corpus_path(), "rt") as handle:
        return [json.loads(line)["text"] for line in handle]


def tokenizer_dir() -> Path:
    out = WORK / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from lmforge.data.tokenizer import train_tokenizer

        train_tokenizer(texts(), out, "bpe", vocab_size=VOCAB)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peaks() -> dict[str, float]:
    """Best measured fp32 and bf16 matmul GFLOP/s on this machine, over the model's own GEMM shapes
    (the MFU denominators; a peak that the model's steps exceed would be no peak)."""
    import torch

    shapes = [(BATCH * SEQ, GPT2["n_embd"], 4 * GPT2["n_embd"]), (BATCH * SEQ, 4 * GPT2["n_embd"], GPT2["n_embd"]),
              (BATCH * SEQ, GPT2["n_embd"], VOCAB), (2048, 2048, 2048)]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            for _ in range(10):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
        out[name] = best
    return out


# ------------------------------------------------------------------ workers (run in subprocesses)
def worker_hf_clm(steps: int, dropout: float, precision: str, activation: str = "gelu_new") -> dict:
    """The canonical `run_clm` recipe under `Trainer`: texts concatenated and chunked, its defaults."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    ids = tok(texts(), add_special_tokens=False).input_ids
    stream = [t for doc in ids for t in [*doc, tok.eos_token_id]]
    chunks = [stream[i : i + SEQ] for i in range(0, len(stream) - SEQ, SEQ)]
    data = Dataset.from_dict({"input_ids": chunks, "labels": chunks})
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, **GPT2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     activation_function=activation)
    model = GPT2LMHeadModel(cfg)
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=str(WORK / "hf_out"), per_device_train_batch_size=BATCH, max_steps=steps,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    step_times = [b - a for a, b in zip(times[2:], times[3:], strict=False)]  # the first steps warm up
    return {"tokens_per_s": BATCH * SEQ / statistics.median(step_times), "first_loss": losses[0],
            "last_loss": losses[-1], "peak_rss_mb": peak_rss_mb(), "params": model.num_parameters(),
            "padding_fraction": 0.0}


def worker_lmforge_clm(steps: int, dropout: float, precision: str) -> dict:
    """lmforge's own loop with its defaults: packed shards, fused AdamW, dropout 0, precision auto."""
    from lmforge.config import TrainerConfig
    from lmforge.data.packing import PackedRows, iterate_batches
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.loop import train
    from lmforge.engine.metrics import read_metrics
    from lmforge.engine.optimizer import decay_groups
    from lmforge.engine.runtime import seed_everything
    from lmforge.models.factory import build_model, flops_per_token, preset_config
    from lmforge.objectives.clm import CausalLM

    seed_everything(0)
    tok = load_tokenizer(tokenizer_dir())
    corpus = prepare_corpus([str(corpus_path())], tok, WORK / "prepared", val_fraction=0.0, progress=False)
    overrides = {**GPT2, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    model = build_model(preset_config("gpt2", "tiny", VOCAB, 1024, **overrides), "causal_lm", tok)
    rows = PackedRows(corpus.split("train"), SEQ)
    cfg = TrainerConfig(max_steps=steps, batch_size=BATCH, lr=5e-4, warmup_steps=0, precision=precision,
                        log_every=1, progress=False, eval_every=10**6)
    out = WORK / "lmforge_out"
    train(model, CausalLM(), decay_groups(model.named_parameters(), 0.1), cfg, out,
          batches=lambda start: iterate_batches(rows, BATCH, 0, start), batches_per_epoch=len(rows) // BATCH,
          tokens_per_batch=BATCH * SEQ, log=lambda s: None)
    records = read_metrics(out / "metrics.jsonl", "train")
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]), "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "peak_rss_mb": peak_rss_mb(),
            "flops_per_token": flops_per_token(model, SEQ), "padding_fraction": 0.0}


def worker_lmforge_prepare() -> dict:
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    out = WORK / f"prep_{os.getpid()}"
    start = time.perf_counter()
    corpus = prepare_corpus([str(corpus_path())], tok, out, val_fraction=0.01, progress=False)
    seconds = time.perf_counter() - start
    tokens = corpus.tokens("train") + corpus.tokens("val")
    shutil.rmtree(out)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def worker_datasets_prepare() -> dict:
    """The `datasets` path: load JSONL, `.map` the tokenizer with num_proc=2, write a uint16 memmap."""
    import numpy as np
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    start = time.perf_counter()
    ds = load_dataset("json", data_files=str(corpus_path()), split="train", cache_dir=str(WORK / f"hf_cache_{os.getpid()}"))
    ds = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False).input_ids}, batched=True, num_proc=2,
                remove_columns=ds.column_names)
    lengths = [len(x) for x in ds["ids"]]
    total = sum(lengths) + len(lengths)
    arr = np.memmap(WORK / f"hf_tokens_{os.getpid()}.bin", dtype=np.uint16, mode="w+", shape=(total,))
    pos = 0
    for ids in ds["ids"]:
        arr[pos : pos + len(ids)] = ids
        arr[pos + len(ids)] = tok.eos_token_id
        pos += len(ids) + 1
    arr.flush()
    seconds = time.perf_counter() - start
    shutil.rmtree(WORK / f"hf_cache_{os.getpid()}", ignore_errors=True)
    os.remove(WORK / f"hf_tokens_{os.getpid()}.bin")
    return {"tokens_per_s": total / seconds, "tokens": total, "peak_rss_mb": peak_rss_mb()}


def worker_lmforge_prepare_size(megabytes: int) -> dict:
    """Prepare a generated corpus of `megabytes` of text (Brown documents repeated, each tagged with
    a counter so no two are equal); the corpus is written, streamed through, and deleted."""
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    docs, path = texts(), WORK / f"generated_{os.getpid()}.jsonl"
    written, i = 0, 0
    with open(path, "w") as handle:
        while written < megabytes * 2**20:
            line = json.dumps({"text": f"{i} " + docs[i % len(docs)]}) + "\n"
            handle.write(line)
            written += len(line)
            i += 1
    tok, out = load_tokenizer(tokenizer_dir()), WORK / f"prep_gen_{os.getpid()}"
    start = time.perf_counter()
    corpus = prepare_corpus([str(path)], tok, out, val_fraction=0.01, progress=False, shard_tokens=50_000_000)
    seconds = time.perf_counter() - start
    tokens = corpus.tokens("train") + corpus.tokens("val")
    shutil.rmtree(out)
    path.unlink()
    return {"megabytes": megabytes, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"hf_clm": worker_hf_clm, "lmforge_clm": worker_lmforge_clm,
           "lmforge_prepare": worker_lmforge_prepare, "datasets_prepare": worker_datasets_prepare,
           "lmforge_prepare_size": worker_lmforge_prepare_size}


# ------------------------------------------------------------------ driver
def run_worker(name: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "true"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) if isinstance(results[0][k], (int, float)) else results[0][k]
            for k in results[0]}


def alternate(jobs: dict[str, tuple[str, dict]], repeats: int) -> dict[str, dict]:
    """Run each job (label -> worker, kwargs) `repeats` times, alternating the order; medians per label."""
    runs: dict[str, list[dict]] = {label: [] for label in jobs}
    labels = list(jobs)
    for i in range(repeats):
        for label in labels if i % 2 == 0 else labels[::-1]:
            worker, kwargs = jobs[label]
            runs[label].append(run_worker(worker, **kwargs))
    return {label: _median(results) for label, results in runs.items()}


def clm_case(repeats: int, steps: int, peaks: dict, lm_kwargs: dict, hf_kwargs: dict) -> dict:
    medians = alternate({"lmforge": ("lmforge_clm", {"steps": steps, **lm_kwargs}),
                         "baseline": ("hf_clm", {"steps": steps, **hf_kwargs})}, repeats)
    ours, theirs = medians["lmforge"], medians["baseline"]
    peak = peaks["bf16" if lm_kwargs["precision"] == "bf16" else "fp32"] * 1e9
    return {
        "lmforge_tokens_per_s": ours["tokens_per_s"], "baseline_tokens_per_s": theirs["tokens_per_s"],
        "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "mfu": ours["tokens_per_s"] * ours["flops_per_token"] / peak,
        "baseline_mfu": theirs["tokens_per_s"] * ours["flops_per_token"] / peak,
        "peak_rss_mb": ours["peak_rss_mb"], "baseline_peak_rss_mb": theirs["peak_rss_mb"],
        "padding_fraction": 0.0, "baseline_padding_fraction": 0.0,
        "loss_first_last": [ours["first_loss"], ours["last_loss"]],
        "baseline_loss_first_last": [theirs["first_loss"], theirs["last_loss"]],
        "losses_fall": ours["last_loss"] < ours["first_loss"] and theirs["last_loss"] < theirs["first_loss"],
        "settings": {"lmforge": lm_kwargs, "baseline": hf_kwargs, "steps": steps, "repeats": repeats,
                     "model": {**GPT2, "vocab": VOCAB, "seq_len": SEQ, "batch": BATCH}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--kwargs", default="{}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cases", default="clm_pretrain_defaults,clm_pretrain_equal,prepare,prepare_memory")
    parser.add_argument("--prepare-megabytes", default="50,500", help="corpus sizes for prepare_memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return

    import torch

    from lmforge.engine.runtime import pick_device, resolve_precision

    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer_dir()
    peaks = matmul_peaks()
    auto = resolve_precision("auto", pick_device())
    best = "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"
    cases: dict[str, dict] = {}
    wanted = args.cases.split(",")
    if "clm_pretrain_defaults" in wanted:
        # Trainer as a user runs it: GPT-2's default dropout 0.1, fp32; lmforge as its recipe defaults.
        cases["clm_pretrain_defaults"] = clm_case(args.repeats, args.steps, peaks,
                                                  {"dropout": 0.0, "precision": auto}, {"dropout": 0.1, "precision": "fp32"})
    if "clm_pretrain_equal" in wanted:
        # both at their best on the identical config: dropout 0, fused tanh-GELU, the faster precision here
        cases["clm_pretrain_equal"] = clm_case(args.repeats, args.steps, peaks, {"dropout": 0.0, "precision": best},
                                               {"dropout": 0.0, "precision": best, "activation": "gelu_pytorch_tanh"})
    if "prepare" in wanted:
        medians = alternate({"lmforge": ("lmforge_prepare", {}), "baseline": ("datasets_prepare", {})}, args.repeats)
        ours, theirs = medians["lmforge"], medians["baseline"]
        cases["prepare"] = {"lmforge_tokens_per_s": ours["tokens_per_s"], "baseline_tokens_per_s": theirs["tokens_per_s"],
                            "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"], "tokens": ours["tokens"],
                            "peak_rss_mb": ours["peak_rss_mb"], "baseline_peak_rss_mb": theirs["peak_rss_mb"]}
    if "prepare_memory" in wanted:
        # streaming: peak RSS must not grow with the corpus (10x the text, about the same memory)
        sizes = [int(x) for x in args.prepare_megabytes.split(",")]
        runs = [run_worker("lmforge_prepare_size", megabytes=mb) for mb in sizes]
        cases["prepare_memory"] = {"runs": runs, "rss_growth_mb": runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "matmul_gflops": peaks, "auto_precision": auto,
                    "corpus": str(corpus_path().name), "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "cases": cases,
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    latest = out_dir / "latest.json"
    if latest.is_file():  # a run of some cases keeps the others' last results (each case records its own run)
        previous = json.loads(latest.read_text()).get("cases", {})
        result["cases"] = {**previous, **cases}
    text = json.dumps(result, indent=2)
    (out_dir / "latest.json").write_text(text)
    (out_dir / f"{datetime.date.today().isoformat()}.json").write_text(text)
    print(f"machine: {result['machine']}")
    for name, case in cases.items():
        if name == "prepare_memory":
            print(f"{name}: " + "; ".join(f"{r['megabytes']} MB text, {r['tokens']:,} tokens at {r['tokens_per_s']:,.0f} tok/s, "
                                          f"peak RSS {r['peak_rss_mb']:,.0f} MB" for r in case["runs"]))
            continue
        extra = f", mfu {case['mfu']:.2f} (baseline {case['baseline_mfu']:.2f})" if "mfu" in case else ""
        print(f"{name}: lmforge {case['lmforge_tokens_per_s']:,.0f} tok/s vs baseline {case['baseline_tokens_per_s']:,.0f} "
              f"tok/s = {case['ratio']:.2f}x{extra}; peak RSS {case['peak_rss_mb']:,.0f} vs {case['baseline_peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
