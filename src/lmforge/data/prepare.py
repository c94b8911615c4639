"""Corpus preparation: stream documents, tokenize on all cores, write token shards and a manifest.

The output directory is written under a temporary name and renamed when complete, so a killed
preparation never leaves a half-written corpus that looks finished.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lmforge.data.formats import DataError, expand_inputs, file_fingerprints, read_documents
from lmforge.data.shards import Shard, ShardWriter, open_shards, token_dtype
from lmforge.data.tokenizer import tokenizer_fingerprint
from lmforge.outputs import (
    MANIFEST,
    ensure_replaceable,
    is_prepared_corpus,
    remove_stale_temporaries,
    replace_dir,
    temporaries_of,
    temporary_sibling,
)

FORMAT_VERSION = 1
BATCH_DOCS = 4096
# 1 MB of text: ~70 book-length documents (Brown's), enough for the encoder's threads to share the
# work evenly; at 256 KB (17 such documents) Brown prepared at 0.93M tok/s against 0.96M
# (medians of 5 alternating runs). Two batches are alive at a time (one encoding, one writing):
# ~25 MB more peak memory than at 256 KB.
BATCH_CHARS = 1 << 20


@dataclass
class PreparedCorpus:
    directory: Path
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    def split(self, name: str) -> list[Shard]:
        meta = self.manifest["splits"][name]
        return open_shards(self.directory, meta["shards"], self.manifest["dtype"], self.manifest["vocab_size"])

    def tokens(self, name: str) -> int:
        return self.manifest["splits"][name]["tokens"]


def _settings_hash(inputs: list[dict], tok_hash: str, settings: dict) -> str:
    blob = json.dumps({"inputs": inputs, "tokenizer": tok_hash, "settings": settings, "v": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt manifest ({exc.msg}); delete the folder and prepare again") from None


def load_prepared(directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> PreparedCorpus:
    """Open a prepared corpus; with `tokenizer`, refuse one prepared by a different tokenizer."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: not a prepared corpus (no {MANIFEST}); run `lmforge prepare` first")
    if tokenizer is not None and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise DataError(
            f"{directory}/{MANIFEST}: corpus was tokenized with tokenizer {manifest['tokenizer_fingerprint']}, "
            f"but the run uses {tokenizer_fingerprint(tokenizer)}; prepare the corpus again with this tokenizer"
        )
    return PreparedCorpus(directory, manifest)


def recorded_sources(manifest: dict) -> tuple[list[str], list[str]]:
    """(the source files a prepared corpus's manifest records, those of them that are gone)."""
    inputs = [i["path"] for i in manifest.get("inputs") or []]
    return inputs, [p for p in inputs if not p.startswith("hf:") and not Path(p).is_file()]


def retokenized(directory: str | Path, tokenizer: PreTrainedTokenizerBase, out: Path, progress: bool = True,
                log=print) -> PreparedCorpus:
    """The corpus at `directory` as `tokenizer` reads it: itself if it was prepared with it, else prepared
    again from the source files its manifest records (same settings, so the same documents are held out)
    into `out`. A corpus knows its tokenizer: replaying a base's corpus after a vocabulary extension works."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: not a prepared corpus (no {MANIFEST}); run `lmforge prepare` first")
    new = tokenizer_fingerprint(tokenizer)
    if manifest["tokenizer_fingerprint"] == new:
        return PreparedCorpus(directory, manifest)
    inputs, gone = recorded_sources(manifest)
    if not inputs or gone:
        raise DataError(f"{directory}/{MANIFEST}: prepared with tokenizer {manifest['tokenizer_fingerprint']}, but the run "
                        f"uses {new}, and its source files are gone ({', '.join(gone) or 'none recorded'}); prepare the "
                        "corpus again with this tokenizer, or give its files as train_files")
    settings = manifest.get("settings") or {}
    val_files = [os.path.abspath(v) for v in settings.get("val_files") or []]
    train = [p for p in inputs if os.path.abspath(p) not in val_files]
    log(f"data: {directory} was tokenized with another tokenizer ({manifest['tokenizer_fingerprint']} -> {new}); "
        f"preparing it again from its {len(inputs)} source file(s) into {out}")
    return prepare_corpus(train, tokenizer, out, settings.get("column", "text"), settings.get("format", "auto"),
                          settings.get("val_fraction", 0.02), settings.get("max_docs"), progress=progress,
                          val_files=val_files or None)


def is_validation(doc_index: int, val_fraction: float) -> bool:
    # Knuth multiplicative hash: a deterministic, evenly spread choice that needs no RNG state.
    # Document 0 always goes to validation so that even a tiny corpus has a validation split.
    if val_fraction <= 0:
        return False
    return doc_index == 0 or ((doc_index * 2654435761) % 2**32) / 2**32 < val_fraction


T = TypeVar("T")


def split_items(read: Callable[[list[str]], Iterable[T]], files: list[str], val_files: list[str] | None,
                val_fraction: float) -> Iterator[tuple[bool, T]]:
    """(held out?, item) of every item `read` yields from the training files, then from `val_files`.
    With val_files (the user's own held-out set) those rows are the held-out split and every training
    row trains; without, a hashed `val_fraction` of the training rows is held out (is_validation)."""
    for i, item in enumerate(read(files)):
        yield (not val_files and is_validation(i, val_fraction)), item
    for item in read(val_files) if val_files else ():
        yield True, item


def read_split(read: Callable[[list[str]], Iterable[T | DataError]], files: list[str], val_files: list[str] | None,
               val_fraction: float) -> tuple[list[T], list[bool]]:
    """Every item of split_items and whether it is held out; the first bad row raises its DataError."""
    rows: list[T] = []
    held_out: list[bool] = []
    for is_val, item in split_items(read, files, val_files, val_fraction):
        if isinstance(item, DataError):
            raise item
        rows.append(item)
        held_out.append(is_val)
    return rows, held_out


def _batches(files: list[str], column: str, fmt: str, max_docs: int | None) -> Iterator[list[str]]:
    """Documents in batches of BATCH_DOCS or BATCH_CHARS, whichever comes first: small enough that
    reading and writing overlap the encoding of the next batch, big enough to keep all cores busy."""
    batch: list[str] = []
    count = chars = 0
    for path in files:
        for doc in read_documents(path, column, fmt):
            batch.append(doc)
            count += 1
            chars += len(doc)
            if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
            if max_docs is not None and count >= max_docs:
                break
        if max_docs is not None and count >= max_docs:
            break
    if batch:
        yield batch


def _encoder(tokenizer: PreTrainedTokenizerBase):
    """The fastest batch encoder available: the Rust tokenizer, parallel across cores. A copy, with no
    truncation or padding: a tokenizer.json may carry them (MiniLM's truncates at 128 and pads to 128,
    which cut every Brown document to 128 tokens and padded short ones), and a `truncation=True` call
    elsewhere switches them on in the shared backend."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: encode(texts, add_special_tokens=False)


def _encoded(batches: Iterator[list[str]], encode) -> Iterator[list]:
    """`encode` over `batches` in order, one batch ahead on a worker thread: the Rust encoder
    releases the GIL, so reading, converting and writing run while the next batch is encoded."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for texts in batches:
            ahead = pool.submit(encode, texts)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while tokenizing: the containers this creates hold no cycles,
    and a full collection over the interpreter's heap (torch, transformers) costs ~0.1 s each time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def prepare_corpus(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    column: str = "text",
    fmt: str = "auto",
    val_fraction: float = 0.02,
    max_docs: int | None = None,
    shard_tokens: int = 100_000_000,
    progress: bool = True,
    val_files: list[str] | None = None,
) -> PreparedCorpus:
    """Tokenize `files` into `out_dir`; a no-op when inputs, tokenizer and settings are unchanged.
    `val_files`: the validation split's own documents (then no training document is held out)."""
    out_dir = Path(out_dir).absolute()  # `-o .` has a parent to write beside
    files = expand_inputs(files)
    val_files = expand_inputs(val_files) if val_files else []
    tok_hash = tokenizer_fingerprint(tokenizer)
    inputs = file_fingerprints(files + val_files)
    settings = {"column": column, "format": fmt, "val_fraction": val_fraction, "max_docs": max_docs}
    if val_files:  # only then: corpora prepared before val_files existed keep their fingerprint
        settings["val_files"] = val_files
    fingerprint = _settings_hash(inputs, tok_hash, settings)

    existing = read_manifest(out_dir)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return PreparedCorpus(out_dir, existing)
    if existing is not None and existing.get("tokenizer_fingerprint") != tok_hash:
        print(f"prepare: tokenizer changed ({existing.get('tokenizer_fingerprint')} -> {tok_hash}); re-preparing")
    ensure_replaceable(out_dir, is_prepared_corpus, "a corpus lmforge prepared")

    # documents end with EOS; an encoder's tokenizer (BERT, MiniLM) has none, and its [SEP] does that job
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos_id is None:
        raise DataError("the tokenizer has neither an EOS nor a SEP token; documents cannot be separated")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    remove_stale_temporaries(out_dir.parent, temporaries_of(out_dir))
    tmp_dir = temporary_sibling(out_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        manifest = _write_shards(files, val_files, tokenizer, tmp_dir, column, fmt, val_fraction, max_docs, shard_tokens,
                                  dtype, eos_id, progress)
        manifest.update(
            writer="lmforge",
            version=FORMAT_VERSION,
            fingerprint=fingerprint,
            tokenizer_fingerprint=tok_hash,
            vocab_size=vocab_size,
            eos_id=eos_id,
            dtype=dtype.name,
            inputs=inputs,
            settings=settings,
        )
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp_dir, out_dir)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot write the prepared corpus ({exc.strerror or exc}); "
                        "the previous contents are untouched") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return PreparedCorpus(out_dir, manifest)


def _write_shards(files, val_files, tokenizer, directory, column, fmt, val_fraction, max_docs, shard_tokens, dtype, eos_id,
                  progress) -> dict:
    encode = _encoder(tokenizer)
    writers = {s: ShardWriter(directory, s, dtype, shard_tokens) for s in ("train", "val")}
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    start = time.perf_counter()
    bar = tqdm(desc="prepare", unit="tok", unit_scale=True, disable=not progress)
    # with val_files, the training files' documents all train and the validation files' are all held out;
    # without, a hashed val_fraction of the documents is (None: by the hash)
    groups = [(files, False), (val_files, True)] if val_files else [(files, None)]

    def encoded_batches() -> Iterator[tuple[list, bool | None]]:
        for group, held_out in groups:
            for encodings in _encoded(_batches(group, column, fmt, max_docs), encode):
                yield encodings, held_out

    doc_index = 0
    try:
        for encodings, held_out in encoded_batches():
            by_split: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for enc in encodings:
                ids = enc.ids
                ids.append(eos_id)
                val = held_out if held_out is not None else is_validation(doc_index, val_fraction)
                by_split["val" if val else "train"].append(np.array(ids, dtype=dtype))
                doc_index += 1
            for split, docs in by_split.items():
                writers[split].add(docs)
            if by_split["train"]:
                counts += np.bincount(np.concatenate(by_split["train"]), minlength=len(counts))
            bar.update(sum(len(d) for docs in by_split.values() for d in docs))
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    if writers["train"].total_tokens == 0:
        raise DataError(f"{', '.join(files)}: no training documents (empty input, or all of it went to validation)")
    elapsed = time.perf_counter() - start
    total = sum(w.total_tokens for w in writers.values())
    probs = counts[counts > 0] / counts.sum()
    return {
        "splits": {s: {"tokens": w.total_tokens, "docs": w.total_docs, "shards": w.shards} for s, w in writers.items()},
        "unigram_entropy_nats": float(-(probs * np.log(probs)).sum()),
        "prepare_seconds": round(elapsed, 3),
        "tokens_per_second": round(total / max(elapsed, 1e-9)),
    }
