"""Labelled text for sequence classification: JSONL rows with a text column and a label column.

Labelled sets are small, so they are tokenized into memory once. With `data.labels` given, a row
whose label is not in that set is an error naming the file and line; without it, the label set is
the sorted set of labels found in the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.formats import DataError, parse_rows, text_field
from lmforge.data.prepare import read_split


@dataclass
class LabeledSet:
    ids: list[list[int]]
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([self.labels[i] for i in indices])}


def iter_labeled(files: list[str], column: str, label_column: str, labels: list[str] | None,
                 max_rows: int | None = None) -> Iterator[tuple[str, str] | DataError]:
    """(text, label) rows; a bad row is yielded as its error (so a scan can list them all)."""
    allowed = set(labels) if labels is not None else None

    def parse(path: str, lineno: int, row: dict) -> tuple[str, str]:
        text = text_field(path, lineno, row, column)
        if not text.strip():
            raise DataError(f"{path}:{lineno}: column '{column}' is empty; a labelled row needs its text (drop the row)")
        if label_column not in row:
            raise DataError(f"{path}:{lineno}: no label column '{label_column}' (columns: {', '.join(row)})")
        if row[label_column] is None or row[label_column] == "":
            raise DataError(f"{path}:{lineno}: label column '{label_column}' is empty")
        label = str(row[label_column])
        if allowed is not None and label not in allowed:
            raise DataError(f"{path}:{lineno}: label '{label}' is not in the label set {sorted(allowed)} (data.labels)")
        return text, label

    return parse_rows(files, parse, max_rows)


def labeled_split(files: list[str], column: str, label_column: str, labels: list[str] | None, val_fraction: float,
                  val_files: list[str] | None = None,
                  max_rows: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(train rows, held-out rows, label names): the one split training, its held-out evaluation and the
    few-shot baseline all read. `max_rows` (data.max_docs) is a label budget: that many training rows, a
    sample of fixed seed (so 64 of them are among the 256 of a larger budget), the held-out rows unchanged,
    so the runs of a label-budget curve are scored on the same rows."""
    rows, held_out = read_split(lambda group: iter_labeled(group, column, label_column, labels), files, val_files,
                                val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no labelled rows")
    names = list(labels) if labels is not None else sorted({label for _, label in rows})
    train = [row for row, is_val in zip(rows, held_out, strict=True) if not is_val]
    val = [row for row, is_val in zip(rows, held_out, strict=True) if is_val]
    if max_rows is not None and max_rows < len(train):
        kept = np.sort(np.random.default_rng(0).permutation(len(train))[:max_rows])
        train = [train[i] for i in kept]
    return train, val, names


def load_labeled(files: list[str], tokenizer, column: str, label_column: str, labels: list[str] | None,
                 max_len: int, val_fraction: float, val_files: list[str] | None = None,
                 max_rows: int | None = None, prompt: str = "") -> tuple[LabeledSet, LabeledSet, list[str]]:
    """labeled_split's rows tokenized (cut at `max_len` tokens, `prompt` included)."""
    train, val, names = labeled_split(files, column, label_column, labels, val_fraction, val_files, max_rows)
    index = {name: i for i, name in enumerate(names)}
    return (*(encode_texts(tokenizer, [t for t, _ in part], [index[label] for _, label in part], max_len, prompt)
              for part in (train, val)), names)


def encode_texts(tokenizer, texts: list[str], labels: list[int], max_len: int, prompt: str = "") -> LabeledSet:
    """Texts tokenized (cut at `max_len` tokens; an empty one becomes a lone pad) with their class indices.
    A `prompt` (objective.label_prompt, e.g. "\nLabel:") follows every text whole: the text is cut, not it,
    since the classifier reads the last token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tail = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    if len(tail) >= max_len:
        raise ValueError(f"objective.label_prompt is {len(tail)} tokens, not shorter than the {max_len} of a row "
                         "(packing.seq_len): no text would be left")
    ids = tokenizer(texts, truncation=True, max_length=max_len - len(tail)).input_ids if texts else []
    return LabeledSet([row + tail if row else [pad] for row in ids], list(labels), pad)
