"""Held-out rows found in training text. A held-out task sentence that some stage trained on (word for
word, or a long stretch of it) measures memory, not skill: a continual-pretraining corpus drawn from the
same source as the task's test rows once held 30% of them, and nothing said so.

Matching is by characters, not words, so it works where words are not separated by spaces (Chinese):
texts are lower-cased and their whitespace collapsed; a row counts as seen when the training text
holds it whole, or holds any WINDOW-character stretch of it (a long shared n-gram, as GPT-3's and
later contamination checks count 13-word ones). Training text is read once and scanned window by
window against the held-out windows, so memory follows the held-out rows, not the corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lmforge.config import Recipe
from lmforge.data.formats import iter_corpus
from lmforge.data.labeled import labeled_split
from lmforge.data.prepare import read_manifest, recorded_sources
from lmforge.objectives import objective_data

WINDOW = 50  # characters: about 10 English words, about 30 Chinese words; shorter rows must match whole
CHUNK = 1 << 20


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _windows(text: str) -> Iterable[str]:
    return (text[i:i + WINDOW] for i in range(0, len(text) - WINDOW + 1))


def seen_rows(held_out: list[str], training_texts: Iterable[str]) -> list[int]:
    """Indices of the held-out rows that the training texts hold whole or by a WINDOW-character stretch."""
    rows = [normalize(t) for t in held_out]
    by_window: dict[str, list[int]] = {}
    short: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if len(row) < WINDOW:
            if row:
                short.setdefault(row, []).append(i)
            continue
        for piece in _windows(row):
            by_window.setdefault(piece, []).append(i)
    found: set[int] = set()

    def scan(text: str) -> None:
        for piece in _windows(text):
            hit = by_window.get(piece)
            if hit:
                found.update(hit)
        for row, where in short.items():
            if row in text:
                found.update(where)

    # documents joined in chunks of about a megabyte (a NUL apart, which no normalized row holds, so no
    # match spans two documents): the whole-row search then runs once per chunk, not once per document
    chunk: list[str] = []
    size = 0
    for text in training_texts:
        chunk.append(normalize(text))
        size += len(chunk[-1])
        if size >= CHUNK:
            scan("\0".join(chunk))
            chunk, size = [], 0
    if chunk:
        scan("\0".join(chunk))
    return sorted(found)


def leakage_note(held_out: list[str], sources: dict[str, Iterable[str]]) -> dict:
    """Per training source (a name -> its texts): how many held-out rows it holds, with a few of them."""
    out: dict = {"held_out": len(held_out), "window": WINDOW, "sources": {}}
    for name, texts in sources.items():
        seen = seen_rows(held_out, texts)
        out["sources"][name] = {"rows": len(seen), "share": len(seen) / max(len(held_out), 1),
                                "examples": [held_out[i][:160] for i in seen[:3]]}
    return out


def describe(note: dict) -> list[str]:
    """One line per source that holds held-out rows (nothing when none does)."""
    return [f"{s['rows']:,} of {note['held_out']:,} held-out rows ({s['share']:.0%}) appear in {name} (whole, or "
            f"a {note['window']}-character stretch): their scores measure memory, not skill; hold out other rows "
            "or drop them from that text" for name, s in note.get("sources", {}).items() if s["rows"]]


def training_texts(recipe: Recipe) -> dict[str, Iterable[str]]:
    """What a stage's weights trained on, by source, read lazily: its data files (a classifier's: its
    training rows only), each mixture source, a prepared corpus's recorded source files. Data of other
    kinds (conversations, pairs) is not read as text here."""
    cfg = recipe.data
    kind = objective_data(recipe.objective)
    if kind == "labeled":
        if not cfg.train_files or not cfg.label_column:
            return {}
        rows = labeled_split(cfg.train_files, cfg.column, cfg.label_column, cfg.labels, cfg.val_fraction,
                             cfg.val_files, cfg.max_docs)[0]
        return {"its own training rows": (text for text, _ in rows)}
    if kind != "packed":
        return {}
    out: dict[str, Iterable[str]] = {}
    if cfg.train_files:
        out[", ".join(cfg.train_files)] = iter_corpus(cfg.train_files, cfg.column, cfg.format, cfg.max_docs)
    if cfg.prepared_dir and not cfg.train_files:
        out.update(_prepared_texts(cfg.prepared_dir))
    for source in cfg.mixture:
        if source.train_files:
            out[f"mixture '{source.name}'"] = iter_corpus(source.train_files, source.column)
        elif source.prepared_dir:
            out.update({f"mixture '{source.name}'": texts for texts in _prepared_texts(source.prepared_dir).values()})
    return out


def _prepared_texts(directory: str) -> dict[str, Iterable[str]]:
    manifest = read_manifest(directory)
    if manifest is None:  # not prepared yet (a parent stage's corpus): its recipe names the files
        return {}
    files, gone = recorded_sources(manifest)
    files = [f for f in files if f not in gone and not f.startswith("hf:")]
    settings = manifest.get("settings") or {}
    return {", ".join(files): iter_corpus(files, settings.get("column", "text"), settings.get("format", "auto"),
                                          settings.get("max_docs"))} if files else {}


def held_out_texts(recipe: Recipe) -> list[str]:
    """A classifier's held-out texts (the rows its task metrics score); none for other data."""
    cfg = recipe.data
    if objective_data(recipe.objective) != "labeled" or not cfg.label_column or not cfg.train_files:
        return []
    return [text for text, _ in labeled_split(cfg.train_files, cfg.column, cfg.label_column, cfg.labels,
                                              cfg.val_fraction, cfg.val_files, cfg.max_docs)[1]]


def stage_leakage(recipe: Recipe, lineage: list[tuple[str, Recipe]]) -> dict:
    """A classifier stage's held-out rows against the training text of every stage behind it and its own
    (`lineage`: (stage name, recipe), the stage itself among them); {} for a stage without held-out rows."""
    held_out = held_out_texts(recipe)
    if not held_out:
        return {}
    sources = {f"stage {name}: {source}" if name else source: texts
               for name, stage_recipe in lineage for source, texts in training_texts(stage_recipe).items()}
    return leakage_note(held_out, sources)
