"""Paired text for contrastive objectives: (query, positive) rows, or one text seen twice (SimCSE).

Pair sets are small next to pretraining corpora, so they are tokenized into memory once; batches
are padded to their longest row (truncated at `max_len`). The validation split uses the same
deterministic document hash as corpus preparation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.formats import DataError, expand_inputs, read_jsonl
from lmforge.data.prepare import is_validation


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
               val_fraction: float) -> tuple[PairSet, PairSet]:
    """(train, validation) pair sets; without `pair_column` each text is its own positive (SimCSE)."""
    first, second = [], []
    for path in expand_inputs(files):
        if not path.endswith((".jsonl", ".jsonl.gz", ".json")):
            raise DataError(f"{path}: paired data must be JSONL with columns '{column}' and '{pair_column}'")
        first += list(read_jsonl(path, column))
        second += list(read_jsonl(path, pair_column)) if pair_column else []
    if not first:
        raise DataError(f"{', '.join(files)}: no pairs")
    second = second or first
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(texts: list[str]) -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len).input_ids
        return [row or [pad] for row in ids]

    a, b = encode(first), encode(second)
    val = np.array([is_validation(i, val_fraction) for i in range(len(a))])
    split = {name: [i for i in range(len(a)) if val[i] == (name == "val")] for name in ("train", "val")}
    sets = tuple(PairSet([a[i] for i in split[s]], [b[i] for i in split[s]], pad) for s in ("train", "val"))
    return sets
