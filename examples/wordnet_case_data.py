"""A second domain for recipes/case_domain_adaptation.yaml, from ../shared/data (see its README):
dictionary definitions (WordNet 3.0 glosses) and their lexical class.

- general.jsonl: the Brown corpus (general English), one document per row (as for the spam case);
- domain.jsonl:  unlabelled dictionary text: other glosses, each "word, synonym: definition; examples",
                 joined 20 to a row (so masked-LM rows are full);
- task.jsonl:    glosses labelled with their lexical class, `--per-class` of each of the six largest
                 noun classes with distinct topics (animal, artifact, person, plant, act, food); the
                 word itself is left out of the text, so the class has to be read from the definition.

The glosses are shuffled once (seed 0); no task gloss appears in the domain text. Run the case study on
it by changing the recipe's vars only:

    python examples/wordnet_case_data.py
    lmforge run recipes/case_domain_adaptation.yaml output_dir=runs/case_wordnet \\
        vars.general_text=runs/wordnet_case_data/general.jsonl vars.domain_text=runs/wordnet_case_data/domain.jsonl \\
        vars.task=runs/wordnet_case_data/task.jsonl
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
from pathlib import Path

CLASSES = ("noun.animal", "noun.artifact", "noun.person", "noun.plant", "noun.act", "noun.food")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/wordnet_case_data"))
    parser.add_argument("--per-class", type=int, default=100, help="labelled glosses per class (half are held out)")
    parser.add_argument("--domain-rows", type=int, default=1500, help="rows of 20 unlabelled glosses")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with gzip.open(args.shared / "brown.jsonl.gz", "rt") as handle:
        general = [json.loads(line)["text"] for line in handle]
    with gzip.open(args.shared / "wordnet_glosses.jsonl.gz", "rt") as handle:
        glosses = [json.loads(line) for line in handle]
    random.Random(0).shuffle(glosses)
    taken: collections.Counter = collections.Counter()
    task, rest = [], []
    for g in glosses:
        if g["lexname"] in CLASSES and taken[g["lexname"]] < args.per_class and len(g["gloss"].split()) >= 4:
            taken[g["lexname"]] += 1
            task.append({"text": g["gloss"], "label": g["lexname"].split(".")[1]})
        else:
            rest.append(f"{', '.join(w.replace('_', ' ') for w in g['words'])}: {g['gloss']}")
    domain = [" ".join(rest[i:i + 20]) for i in range(0, min(len(rest), 20 * args.domain_rows), 20)]

    def write(name: str, rows: list[dict]) -> None:
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("general.jsonl", [{"text": t} for t in general])
    write("domain.jsonl", [{"text": t} for t in domain])
    write("task.jsonl", task)
    print(f"case data in {args.out}: {len(general)} general documents, {len(domain)} domain rows "
          f"({len(domain) * 20} glosses), {len(task)} labelled ({', '.join(f'{k.split(chr(46))[1]} {v}' for k, v in sorted(taken.items()))})")


if __name__ == "__main__":
    main()
