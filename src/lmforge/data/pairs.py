"""Paired text for contrastive objectives: (query, positive) rows, or one text seen twice (SimCSE).

Pair sets are small next to pretraining corpora, so they are tokenized into memory once; batches
are padded to their longest row (truncated at `max_len`). The validation split uses the same
deterministic document hash as corpus preparation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.data.formats import DataError, parse_rows, text_field
from lmforge.data.prepare import read_split


@dataclass
class PairSet:
    a: list[list[int]]
    b: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.a)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for side, rows in (("", self.a), ("_b", self.b)):
            chosen = [rows[i] for i in indices]
            width = max(len(r) for r in chosen)
            ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chosen), width), dtype=torch.long)
            for r, row in enumerate(chosen):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            out[f"input_ids{side}"], out[f"attention_mask{side}"] = ids, mask
        return out


def load_pairs(files: list[str], tokenizer, column: str, pair_column: str | None, max_len: int,
               val_fraction: float, val_files: list[str] | None = None) -> tuple[PairSet, PairSet]:
    """(train, validation) pair sets (validation: the pairs of `val_files` when given); without
    `pair_column` each text is its own positive (SimCSE)."""

    def parse(path: str, lineno: int, row: dict) -> tuple[str, str]:
        text = text_field(path, lineno, row, column)
        return text, text_field(path, lineno, row, pair_column) if pair_column else text

    rows, held_out = read_split(lambda group: parse_rows(group, parse), files, val_files, val_fraction)  # JSONL, CSV, Parquet
    first, second = [text for text, _ in rows], [positive for _, positive in rows]
    if not first:
        raise DataError(f"{', '.join(files)}: no pairs")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(texts: list[str]) -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len).input_ids
        return [row or [pad] for row in ids]

    a, b = encode(first), encode(second)
    split = {name: [i for i in range(len(a)) if held_out[i] == (name == "val")] for name in ("train", "val")}
    sets = tuple(PairSet([a[i] for i in split[s]], [b[i] for i in split[s]], pad) for s in ("train", "val"))
    return sets
