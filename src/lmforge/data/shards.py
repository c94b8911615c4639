"""Memory-mapped token shards.

A split is a list of shards; a shard is two flat files:
  NAME.bin   the token ids (uint16 when the vocabulary fits, else uint32), documents back to back
  NAME.docs  uint64 end offsets of each document inside NAME.bin (document boundaries)
Both are append-only while writing, so memory does not grow with corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.formats import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class ShardWriter:
    """Appends documents to `<dir>/<split>_NNN.bin`, rolling to a new shard after `shard_tokens`."""

    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int = 100_000_000
    shards: list[dict] = field(default_factory=list)
    _bin: object = None
    _docs: object = None
    _shard_len: int = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}"
        self._bin = open(self.directory / f"{name}.bin", "wb")  # noqa: SIM115
        self._docs = open(self.directory / f"{name}.docs", "wb")  # noqa: SIM115
        self._shard_len = 0
        self.shards.append({"name": name, "tokens": 0, "docs": 0})

    def add(self, docs: list[np.ndarray]) -> None:
        """Append whole documents (each already ending in EOS); a document never spans two shards."""
        while docs:
            if self._bin is None or self._shard_len >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self._shard_len
            lengths = np.fromiter((len(d) for d in docs), dtype=np.uint64, count=len(docs))
            # documents that fit in this shard; at least one, so an oversized document still lands
            take = max(1, int(np.searchsorted(np.cumsum(lengths), room, side="right")))
            ends = self._shard_len + np.cumsum(lengths[:take], dtype=np.uint64)
            self._bin.write(np.concatenate(docs[:take]).astype(self.dtype, copy=False).tobytes())
            self._docs.write(ends.tobytes())
            self._shard_len = int(ends[-1])
            self.shards[-1]["tokens"] = self._shard_len
            self.shards[-1]["docs"] += take
            docs = docs[take:]

    @property
    def total_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def total_docs(self) -> int:
        return sum(s["docs"] for s in self.shards)

    def close(self) -> None:
        for handle in (self._bin, self._docs):
            if handle is not None:
                handle.flush()
                handle.close()
        self._bin = self._docs = None


@dataclass
class Shard:
    tokens: np.ndarray  # memmap, dtype uint16/uint32
    doc_ends: np.ndarray  # memmap, uint64
    vocab_size: int | None = None  # ids at or above it are corruption (checked per row as rows are read)
    path: Path | None = None

    def check_ids(self, ids: np.ndarray, start: int) -> None:
        if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:
            bad = int(np.argmax(ids >= self.vocab_size))
            raise DataError(f"{self.path}: token id {int(ids[bad])} at token {start + bad} is beyond the tokenizer's "
                            f"{self.vocab_size} ids; the shard is corrupt, prepare the corpus again")


def _check_doc_ends(path: Path, ends: np.ndarray, meta: dict) -> None:
    """The .docs file: one end offset per document, rising, the last one at the shard's end."""
    if len(ends) != meta["docs"]:
        raise DataError(f"{path}: {len(ends)} document ends, manifest says {meta['docs']}; the shard is truncated or "
                        "corrupt, prepare the corpus again")
    if len(ends) and (int(ends[-1]) != meta["tokens"] or bool((np.diff(ends.astype(np.int64)) <= 0).any())):
        raise DataError(f"{path}: document ends are not rising to the shard's {meta['tokens']} tokens; the shard is "
                        "corrupt, prepare the corpus again")


def open_shards(directory: Path, shards: list[dict], dtype: str, vocab_size: int | None = None) -> list[Shard]:
    out = []
    for meta in shards:
        bin_path = directory / f"{meta['name']}.bin"
        docs_path = directory / f"{meta['name']}.docs"
        for path in (bin_path, docs_path):
            if not path.is_file():
                raise DataError(f"{path}: shard file missing; prepare the corpus again")
        expected = meta["tokens"] * np.dtype(dtype).itemsize
        if bin_path.stat().st_size != expected:
            raise DataError(
                f"{bin_path}: {bin_path.stat().st_size} bytes, manifest says {expected}; "
                "the shard is truncated or corrupt, prepare the corpus again"
            )
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if meta["tokens"] else np.zeros(0, dtype)
        if docs_path.stat().st_size % 8:
            raise DataError(f"{docs_path}: {docs_path.stat().st_size} bytes, not whole uint64 document ends; the "
                            "shard is corrupt, prepare the corpus again")
        ends = np.memmap(docs_path, dtype=np.uint64, mode="r") if docs_path.stat().st_size else np.zeros(0, np.uint64)
        _check_doc_ends(docs_path, ends, meta)
        out.append(Shard(tokens, ends, vocab_size, bin_path))
    return out
