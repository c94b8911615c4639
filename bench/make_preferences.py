"""Instruction rows {prompt, response} -> synthetic preference pairs {task, prompt, chosen, rejected}.

The chosen answer is the dataset's own; the rejected one is the same words in a shuffled order (answers
of at least four words, so the two always differ). A preference for fluent answers over word salad is
crude, but it is real signal that even a small model can learn and that held-out pairs can check
without a judge. Used for the bundled excerpt (assets/corpora/preferences_excerpt.jsonl.gz, from the
instruction excerpt) and by the DPO tests.

    python bench/make_preferences.py SRC.jsonl.gz OUT.jsonl.gz
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from collections.abc import Iterator


def shuffled_pairs(rows: Iterator[dict], seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    for row in rows:
        words = row["response"].split()
        if len(words) < 4 or len(set(words)) < 2:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        yield {"task": row.get("task"), "prompt": row["prompt"], "chosen": row["response"], "rejected": " ".join(shuffled)}


def main(src: str, out: str) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as fin, gzip.open(out, "wt", encoding="utf-8") as fout:
        for pair in shuffled_pairs(json.loads(line) for line in fin):
            fout.write(json.dumps(pair, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
