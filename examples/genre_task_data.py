"""A labelled task nobody tuned lmforge's recipes on, for recipes/lora_vs_full.yaml: Brown corpus paragraphs
(../shared/data/brown.jsonl.gz, see its README for provenance) labelled with their genre's group:

- press:      news, editorial, reviews
- fiction:    fiction, mystery, science_fiction, adventure, romance, humor
- nonfiction: religion, hobbies, lore, belles_lettres, government, learned

Paragraphs of 200+ characters, at most 12 per document (so no document dominates), shuffled once (seed 0)
and balanced: --per-class of each.

    python examples/genre_task_data.py [--shared ../shared/data] [--out runs/genre_data] [--per-class 200]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

GROUPS = {"news": "press", "editorial": "press", "reviews": "press",
          "fiction": "fiction", "mystery": "fiction", "science_fiction": "fiction", "adventure": "fiction",
          "romance": "fiction", "humor": "fiction",
          "religion": "nonfiction", "hobbies": "nonfiction", "lore": "nonfiction", "belles_lettres": "nonfiction",
          "government": "nonfiction", "learned": "nonfiction"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/genre_data"))
    parser.add_argument("--per-class", type=int, default=200, help="paragraphs per genre group (half are held out)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    by_group: dict[str, list[str]] = {}
    with gzip.open(args.shared / "brown.jsonl.gz", "rt") as handle:
        for line in handle:
            doc = json.loads(line)
            group = GROUPS.get(doc["genre"])
            if group:
                by_group.setdefault(group, []).extend([p for p in doc["text"].split("\n") if len(p) >= 200][:12])
    rng = random.Random(0)
    rows = []
    for group in sorted(by_group):
        paragraphs = by_group[group]
        rng.shuffle(paragraphs)
        rows += [{"text": p, "label": group} for p in paragraphs[: args.per_class]]
    rng.shuffle(rows)
    (args.out / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {g: sum(r["label"] == g for r in rows) for g in sorted(by_group)}
    print(f"genre task in {args.out / 'task.jsonl'}: {len(rows)} paragraphs, {counts}")


if __name__ == "__main__":
    main()
