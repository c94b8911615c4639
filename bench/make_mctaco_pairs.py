"""Natural Instructions' MC-TACO tasks -> real preference pairs {task, prompt, chosen, rejected}.

MC-TACO (temporal commonsense: how long, how often, when, in what order, whether a state lasts)
comes in Natural Instructions as twin tasks over the same sentences and questions: "answer
generation" holds a crowd-written correct answer, "wrong answer generation" a crowd-written
plausible but wrong one ("a few years." vs "a few weeks."). Joining the twins on their input gives
pairs where both answers are human-written, short and on topic, so preferring the right one takes
temporal common sense, not fluency. The prompt is the answer task's short "Prompt:" line plus the
input, as in bench/make_instructions.py. Used for assets/corpora/mctaco_preferences.jsonl.gz.

    python bench/make_mctaco_pairs.py natural_instructions_sample.jsonl.gz OUT.jsonl.gz
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict

# (answer task, wrong-answer task) twins of the Natural Instructions sample
TWINS = [("subtask004_mctaco_answer_generation_event_duration", "subtask005_mctaco_wrong_answer_generation_event_duration"),
         ("subtask007_mctaco_answer_generation_transient_stationary",
          "subtask008_mctaco_wrong_answer_generation_transient_stationary"),
         ("subtask010_mctaco_answer_generation_event_ordering", "subtask011_mctaco_wrong_answer_generation_event_ordering"),
         ("subtask013_mctaco_answer_generation_absolute_timepoint",
          "subtask014_mctaco_wrong_answer_generation_absolute_timepoint"),
         ("subtask016_mctaco_answer_generation_frequency", "subtask017_mctaco_wrong_answer_generation_frequency")]


def twin_pairs(rows: list[dict]) -> list[dict]:
    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_task[row["task"]].setdefault(row["input"].strip(), row)  # the first answer of an input
    pairs = []
    for right_task, wrong_task in TWINS:
        wrong = by_task[wrong_task]
        for key, row in by_task[right_task].items():
            chosen = row["output"].strip()
            rejected = wrong[key]["output"].strip() if key in wrong else None
            if rejected is None or rejected.lower() == chosen.lower():
                continue
            short = row["instruction"].rsplit("Prompt:", 1)[-1].strip()
            pairs.append({"task": right_task, "prompt": f"{short}\n\n{key}", "chosen": chosen, "rejected": rejected})
    return pairs


def main(src: str, out: str) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as fin:
        rows = [json.loads(line) for line in fin]
    with gzip.open(out, "wt", encoding="utf-8") as fout:
        for pair in twin_pairs(rows):
            fout.write(json.dumps(pair, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
