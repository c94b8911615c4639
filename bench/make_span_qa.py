"""Write assets/corpora/wordnet_qa.jsonl.gz: a small extractive (span) question-answering set built
from WordNet 3.0 glosses, SQuAD's format (`question`, `context`, `answers: {text, answer_start}`).

Each context is a short glossary: four nouns or verbs of the same lexical class (so they are near in
meaning: four animals, four artifacts), each as "word: definition; "example"." in a shuffled order.
Two kinds of question, half each:
- "What does the word W mean?": the answer is W's definition (its gloss up to the first ";", no
  example), found after W among three distractor entries of the same field;
- "Which word means D?" where D is one entry's definition: the answer is that entry's word.
The answer is always a span of the context and starts where `answer_start` says (asserted here).

    python bench/make_span_qa.py ../shared/data/wordnet_glosses.jsonl.gz assets/corpora/wordnet_qa.jsonl.gz --rows 2400
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import random


def entries(path: str) -> dict[str, list[tuple[str, str, str]]]:
    """(word, definition, rest of the gloss) per lexical class; words once each, glosses of 3 to 20 words."""
    by_class: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["pos"] not in ("noun", "verb"):
                continue
            word = row["words"][0].replace("_", " ")
            definition, _, rest = row["gloss"].partition(";")
            definition = definition.strip()
            if word.lower() in seen or not 3 <= len(definition.split()) <= 20 or word.lower() in definition.lower():
                continue
            seen.add(word.lower())
            by_class[row["lexname"]].append((word, definition, rest.strip()))
    return {k: v for k, v in by_class.items() if len(v) >= 50}


def questions(by_class: dict[str, list[tuple[str, str, str]]], rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    classes = sorted(by_class)
    out = []
    for r in range(rows):
        group = rng.sample(by_class[rng.choice(classes)], 4)
        parts, starts = [], []
        offset = 0
        for word, definition, rest in group:
            text = f"{word}: {definition}" + (f"; {rest}" if rest else "") + "."
            starts.append((offset, offset + len(word) + 2))  # where the word and its definition begin
            parts.append(text)
            offset += len(text) + 1
        context = " ".join(parts)
        pick = rng.randrange(4)
        word, definition, _ = group[pick]
        if r % 2 == 0:
            question, answer, start = f"What does the word {word} mean?", definition, starts[pick][1]
        else:
            question, answer, start = f"Which word means {definition}?", word, starts[pick][0]
        assert context[start:start + len(answer)] == answer
        out.append({"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("glosses")
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with gzip.GzipFile(args.out, "wb", compresslevel=9, mtime=0) as raw, io.TextIOWrapper(raw, "utf-8") as handle:
        for row in questions(entries(args.glosses), args.rows, args.seed):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
