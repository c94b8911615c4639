"""Word-level tags for token classification (named entities, parts of speech): rows with a list of
words (`data.column`) and a list of tags of the same length (`data.label_column`), as CoNLL-style
datasets ship them.

Words are tokenized as pre-split words (a fast tokenizer's word ids); each word's first sub-word
token carries its tag and the rest are not scored (-100), the convention of transformers' token
classification examples, so a word counts once whatever its tokenization. Rows longer than seq_len
keep their first seq_len tokens (the cut words are not scored).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.data.formats import DataError, parse_rows
from lmforge.data.prepare import read_split

IGNORE = -100


@dataclass
class TaggedSet:
    ids: list[list[int]]
    labels: list[list[int]]  # per token: a tag index, or -100
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(indices):
            n = len(self.ids[i])
            ids[r, :n] = torch.tensor(self.ids[i])
            labels[r, :n] = torch.tensor(self.labels[i])
            mask[r, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_tagged(files: list[str], column: str, label_column: str, labels: list[str] | None,
                max_rows: int | None = None) -> Iterator[tuple[str, list[str], list[str]] | DataError]:
    """("file:line", words, tags) rows; a bad row is yielded as its error."""
    allowed = set(labels) if labels is not None else None

    def parse(path: str, lineno: int, row: dict) -> tuple[str, list[str], list[str]]:
        where = f"{path}:{lineno}"
        missing = [c for c in (column, label_column) if c not in row]
        if missing:
            raise DataError(f"{where}: no column {', '.join(repr(c) for c in missing)} for data.column / data.label_column "
                            f"(columns: {', '.join(row)})")
        words, tags = row[column], row[label_column]
        if not isinstance(words, list) or not isinstance(tags, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{where}: '{column}' must be a list of words and '{label_column}' a list of their tags")
        if len(words) != len(tags):
            raise DataError(f"{where}: {len(words)} words but {len(tags)} tags")
        tags = [str(t) for t in tags]
        unknown = sorted({t for t in tags if allowed is not None and t not in allowed})
        if unknown:
            raise DataError(f"{where}: tag {unknown[0]!r} is not in the tag set {sorted(allowed)} (data.labels)")
        return where, words, tags

    return parse_rows(files, parse, max_rows)


def encode_tagged(tokenizer, rows: list[tuple[str, list[str], list[str]]], index: dict[str, int], max_len: int) -> TaggedSet:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("token classification needs a fast tokenizer (one with word ids), not a slow one")
    encoded = tokenizer([words for _, words, _ in rows], is_split_into_words=True, truncation=True, max_length=max_len)
    out = TaggedSet([], [], pad)
    for r, (_, _, tags) in enumerate(rows):
        targets, previous = [], None
        for word in encoded.word_ids(r):
            targets.append(IGNORE if word is None or word == previous else index[tags[word]])
            previous = word
        out.ids.append(encoded.input_ids[r])
        out.labels.append(targets)
    return out


def load_tagged(files: list[str], tokenizer, column: str, label_column: str, labels: list[str] | None, max_len: int,
                val_fraction: float, val_files: list[str] | None = None) -> tuple[TaggedSet, TaggedSet, list[str]]:
    rows, held_out = read_split(lambda group: iter_tagged(group, column, label_column, labels), files, val_files,
                                val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no tagged rows")
    names = list(labels) if labels is not None else sorted({t for _, _, tags in rows for t in tags})
    index = {name: i for i, name in enumerate(names)}
    train = encode_tagged(tokenizer, [r for r, v in zip(rows, held_out, strict=True) if not v], index, max_len)
    val = encode_tagged(tokenizer, [r for r, v in zip(rows, held_out, strict=True) if v], index, max_len)
    return train, val, names
