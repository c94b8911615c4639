"""Packing: documents back to back (each ends in EOS) cut into fixed-length rows, no padding.

Row i of a shard covers tokens [i*L, i*L + L] (L+1 tokens: inputs are the first L, next-token
labels the last L), so no token is wasted and no position is padding.

With `document_mask`, each row also carries position ids that restart at every document start.
`transformers` decoders turn restarting position ids into a block-diagonal causal mask, so a
token never attends to another document; without it, rows attend across the EOS separators, the
usual choice for pretraining (and the fast attention path).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data.shards import Shard


class PackedRows:
    """Random access to the packed rows of a list of shards."""

    def __init__(self, shards: list[Shard], seq_len: int, document_mask: bool = False):
        self.shards = shards
        self.seq_len = seq_len
        self.document_mask = document_mask
        rows = [max(0, (len(s.tokens) - 1) // seq_len) for s in shards]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        if self._offsets[-1] == 0:
            tokens = sum(len(s.tokens) for s in shards)
            raise ValueError(f"corpus split has {tokens} tokens, too few for one row of seq_len={seq_len} (+1)")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The L+1 tokens of row `index`, and position ids for its first L tokens (or None)."""
        shard_idx = int(np.searchsorted(self._offsets, index, side="right") - 1)
        shard = self.shards[shard_idx]
        start = (index - int(self._offsets[shard_idx])) * self.seq_len
        tokens = np.asarray(shard.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        shard.check_ids(tokens, start)
        if not self.document_mask:
            return tokens, None
        return tokens, document_positions(shard.doc_ends, start, self.seq_len)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.row(i) for i in indices]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        if self.document_mask:
            batch["position_ids"] = torch.from_numpy(np.stack([r[1] for r in rows]))
        return batch


def document_positions(doc_ends: np.ndarray, start: int, length: int) -> np.ndarray:
    """Position of each token of [start, start+length) within its own document."""
    offsets = np.arange(start, start + length, dtype=np.int64)
    ends = np.asarray(doc_ends, dtype=np.int64)
    doc = np.searchsorted(ends, offsets, side="right")
    doc_starts = np.where(doc > 0, ends[np.maximum(doc - 1, 0)], 0)
    return offsets - doc_starts


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation fixed by (seed, epoch), so resuming needs only a position."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def epoch_batches(rows, batch_size: int, seed: int, epoch: int) -> list:
    """The batches (lists of row indices) of one epoch: the rows' own grouping when they have one
    (variable-length examples batched by length), else consecutive slices of the epoch's permutation."""
    if hasattr(rows, "epoch_batches"):
        return rows.epoch_batches(batch_size, seed, epoch)
    order = epoch_order(len(rows), seed, epoch)
    return [order[b * batch_size : (b + 1) * batch_size] for b in range(len(rows) // batch_size)]


def iterate_batches(rows, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[dict]:
    """Endless stream of shuffled batches from anything with `len()` and `batch(indices)` (packed rows,
    text pairs, sentence pairs, instruction examples); batch number `start_batch` comes first (for resuming)."""
    per_epoch = len(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} training rows cannot fill one batch of {batch_size}; lower batch_size or seq_len")
    batch_number = start_batch
    while True:
        epoch, within = divmod(batch_number, per_epoch)
        for indices in epoch_batches(rows, batch_size, seed, epoch)[within:]:
            yield rows.batch(list(map(int, indices)))
        batch_number = (epoch + 1) * per_epoch
