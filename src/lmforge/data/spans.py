"""Extractive question answering data: a question, a context, and answers that are spans of the
context, in SQuAD's layout (`answers: {"text": [...], "answer_start": [...]}`) or as plain answer
text (a string or a list of strings: each found at its first occurrence in the context).

Each (question, context) pair is tokenized as one input, question first, the context cut into
windows of at most seq_len tokens that overlap by `doc_stride` tokens (transformers' QA examples'
scheme: an answer near a window's edge is whole in the next one). A training window is labelled
with the token positions of the answer's first and last characters; a window that does not hold the
whole answer points at its first token (the CLS position, "no answer here"), as in those examples.
Windows keep each token's character offsets in the context, so held-out predictions map back to
the context's own text (eval/spans.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.data.formats import DataError, parse_rows
from lmforge.data.prepare import read_split


@dataclass
class SpanQuestion:
    where: str  # "file:line", for errors and reports
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, start character) each


@dataclass
class SpanSet:
    """Tokenized windows; `example[i]` is window i's question, `offsets[i]` its tokens' character
    spans in that question's context (None outside the context)."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    starts: list[int]
    ends: list[int]
    example: list[int]
    offsets: list[list[tuple[int, int] | None]]
    questions: list[SpanQuestion]
    pad_id: int
    windows_of: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for r, i in enumerate(indices):
            n = len(self.ids[i])
            ids[r, :n] = torch.tensor(self.ids[i])
            mask[r, :n] = 1
            if self.type_ids is not None:
                types[r, :n] = torch.tensor(self.type_ids[i])
        out = {"input_ids": ids, "attention_mask": mask,
               "start_positions": torch.tensor([self.starts[i] for i in indices]),
               "end_positions": torch.tensor([self.ends[i] for i in indices])}
        if self.type_ids is not None:
            out["token_type_ids"] = types
        return out


def _answers(where: str, value, context: str, column: str) -> list[tuple[str, int]]:
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # SQuAD: texts and their starts
        texts, starts = value["text"], value.get("answer_start")
        if starts is not None and (not isinstance(starts, list) or len(starts) != len(texts)):
            raise DataError(f"{where}: '{column}.answer_start' must list one start per answer text")
    elif isinstance(value, str):
        texts, starts = [value], None
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        texts, starts = value, None
    else:
        raise DataError(f"{where}: '{column}' must be an answer string, a list of them, or SQuAD's "
                        '{"text": [...], "answer_start": [...]}')
    if not texts:
        raise DataError(f"{where}: '{column}' has no answer (unanswerable questions are not supported)")
    out = []
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: answer {k + 1} in '{column}' is empty")
        start = starts[k] if starts is not None else context.find(text)
        if start < 0:
            raise DataError(f"{where}: the answer {text[:60]!r} is not in its context")
        if not isinstance(start, int) or context[start:start + len(text)] != text:
            raise DataError(f"{where}: the answer {text[:60]!r} is not at answer_start {start} of its context "
                            f"(found there: {context[start:start + len(text)][:60]!r})")
        out.append((text, start))
    return out


def iter_span_questions(files: list[str], question_column: str, context_column: str, answer_column: str,
                        max_rows: int | None = None) -> Iterator[SpanQuestion | DataError]:
    """One SpanQuestion per row; a bad row is yielded as its error."""

    def parse(path: str, lineno: int, row: dict) -> SpanQuestion:
        where = f"{path}:{lineno}"
        missing = [c for c in (question_column, context_column, answer_column) if c not in row]
        if missing:
            raise DataError(f"{where}: no column {', '.join(repr(c) for c in missing)} for data.question_column / "
                            f"data.context_column / data.answer_column (columns: {', '.join(row)})")
        question, context = row[question_column], row[context_column]
        if not isinstance(question, str) or not isinstance(context, str) or not context.strip():
            raise DataError(f"{where}: '{question_column}' and '{context_column}' must be non-empty text")
        return SpanQuestion(where, question, context, _answers(where, row[answer_column], context, answer_column))

    return parse_rows(files, parse, max_rows)


def encode_spans(tokenizer, questions: list[SpanQuestion], max_len: int, doc_stride: int) -> SpanSet:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("extractive question answering needs a fast tokenizer (one with character offsets)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = SpanSet([], [], [], [], [], [], questions, pad, [[] for _ in questions])
    if not questions:
        return out
    encoded = tokenizer([q.question for q in questions], [q.context for q in questions], truncation="only_second",
                        max_length=max_len, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    if "token_type_ids" not in encoded:
        out.type_ids = None
    for w, example in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence = encoded.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(encoded["offset_mapping"][w], sequence, strict=True)]
        if not any(o is not None for o in offsets):
            raise DataError(f"{questions[example].where}: the question leaves no room for the context in "
                            f"packing.seq_len {max_len} tokens")
        text, first = questions[example].answers[0]  # the first answer is the one trained on
        last = first + len(text)
        start = end = 0
        inside = [i for i, o in enumerate(offsets) if o is not None]
        if offsets[inside[0]][0] <= first and offsets[inside[-1]][1] >= last:  # the whole answer is in this window
            start = next(i for i in inside if offsets[i][1] > first)
            end = next(i for i in reversed(inside) if offsets[i][0] < last)
        out.ids.append(encoded["input_ids"][w])
        if out.type_ids is not None:
            out.type_ids.append(encoded["token_type_ids"][w])
        out.starts.append(start)
        out.ends.append(end)
        out.example.append(example)
        out.offsets.append(offsets)
        out.windows_of[example].append(w)
    return out


def load_spans(files: list[str], tokenizer, question_column: str, context_column: str, answer_column: str,
               max_len: int, doc_stride: int | None, val_fraction: float,
               val_files: list[str] | None = None) -> tuple[SpanSet, SpanSet]:
    rows, held_out = read_split(lambda group: iter_span_questions(group, question_column, context_column, answer_column),
                                files, val_files, val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no question rows")
    doc_stride = max_len // 4 if doc_stride is None else doc_stride
    train = encode_spans(tokenizer, [r for r, v in zip(rows, held_out, strict=True) if not v], max_len, doc_stride)
    val = encode_spans(tokenizer, [r for r, v in zip(rows, held_out, strict=True) if v], max_len, doc_stride)
    return train, val
