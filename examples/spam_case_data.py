"""Data for recipes/case_domain_adaptation.yaml from ../shared/data (see its README for provenance):

- general.jsonl: the Brown corpus (general English), one document per row;
- domain.jsonl:  SpamAssassin e-mails (subject and body, headers dropped) as unlabelled domain text;
- task.jsonl:    a few hundred other e-mails of the same corpus with their ham/spam label.

The e-mails are shuffled once (seed 0); the task's e-mails never appear in the domain text. Headers are
dropped because their routing lines give spam away without reading a word.

    python examples/spam_case_data.py [--shared ../shared/data] [--out runs/case_data] [--labelled 800]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def subject_and_body(raw: str, limit: int = 2000) -> str:
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    subject = next((line[8:].strip() for line in head.splitlines() if line.lower().startswith("subject:")), "")
    return (subject + "\n" + " ".join(body.split()))[:limit].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/case_data"))
    parser.add_argument("--labelled", type=int, default=800, help="labelled e-mails (half are held out)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with gzip.open(args.shared / "brown.jsonl.gz", "rt") as handle:
        general = [json.loads(line)["text"] for line in handle]
    with gzip.open(args.shared / "spamassassin.jsonl.gz", "rt") as handle:
        mails = [json.loads(line) for line in handle]
    random.Random(0).shuffle(mails)
    mails = [(subject_and_body(m["raw"]), m["label"]) for m in mails]
    mails = [(text, label) for text, label in mails if len(text) > 40]
    task, domain = mails[: args.labelled], mails[args.labelled:]

    def write(name: str, rows: list[dict]) -> None:
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("general.jsonl", [{"text": t} for t in general])
    write("domain.jsonl", [{"text": t} for t, _ in domain])
    write("task.jsonl", [{"text": t, "label": label} for t, label in task])
    spam = sum(label == "spam" for _, label in task)
    print(f"case data in {args.out}: {len(general)} general documents, {len(domain)} domain e-mails, "
          f"{len(task)} labelled ({spam} spam, {len(task) - spam} ham)")


if __name__ == "__main__":
    main()
