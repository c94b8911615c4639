"""Natural Instructions rows -> {task, prompt, response}: the task's short "Prompt:" line plus the input.

The full task definitions run to hundreds of tokens; the short prompt keeps examples at instruction-
tuning lengths (tens to a few hundred tokens) with a varied length mix. Used for the bundled excerpt
(assets/corpora/instructions_excerpt.jsonl.gz) and for the sft benchmark.

    python bench/make_instructions.py SRC.jsonl.gz OUT.jsonl.gz [--every N]
"""

from __future__ import annotations

import gzip
import json
import sys


def convert(row: dict) -> dict:
    short = row["instruction"].rsplit("Prompt:", 1)[-1].strip()
    return {"task": row["task"], "prompt": f"{short}\n\n{row['input'].strip()}", "response": row["output"].strip()}


def main(src: str, out: str, every: int = 1) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as fin, gzip.open(out, "wt", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i % every == 0:
                fout.write(json.dumps(convert(json.loads(line)), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    every = int(args[args.index("--every") + 1]) if "--every" in args else 1
    main(args[0], args[1], every)
