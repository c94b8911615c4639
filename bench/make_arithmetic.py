"""Write the arithmetic prompts of assets/corpora/arithmetic.jsonl.gz: a verifiable task for RL
(grpo) demos and tests, generated (no licence question), reproducible from the seed.

    python bench/make_arithmetic.py assets/corpora/arithmetic.jsonl.gz --rows 600 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random


def problems(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if op == "-" and b > a:
                a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"prompt": f"What is {a} {op} {b}? Reply with the number only.", "response": str(answer)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with gzip.GzipFile(args.out, "wb", compresslevel=9, mtime=0) as raw, io.TextIOWrapper(raw, "utf-8") as handle:
        for row in problems(args.rows, args.seed):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
