"""Preference data (DPO): a prompt with a chosen and a rejected answer.

A row has the prompt's columns (`data.prompt_template`, as for SFT) and the two answers in
`data.chosen_column` and `data.rejected_column`. Each answer becomes a conversation rendered with the
same chat template as SFT and labelled on the answer only, so both rows of a pair share the prompt's
tokens exactly. A batch of B pairs is 2B rows with chosen and rejected interleaved (row 2k chosen,
2k + 1 its rejected twin): a split of the rows across processes never separates a pair. Pairs are
batched by the length of their longer row, like SFT examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data.formats import DataError, parse_rows
from lmforge.data.instructions import (
    Examples,
    InstructionFormat,
    encode_conversations,
    fit_length,
    grouped_batches,
    row_messages,
)
from lmforge.data.prepare import read_split


def iter_preference_rows(files: list[str], fmt: InstructionFormat, chosen_column: str, rejected_column: str,
                         max_rows: int | None = None) -> Iterator[tuple[str, list[dict], list[dict]] | DataError]:
    """("file:line", chosen conversation, rejected conversation) per row; a bad row is yielded as its error."""
    answers = [dataclasses.replace(fmt, response_column=c) for c in (chosen_column, rejected_column)]

    def parse(path: str, lineno: int, row: dict) -> tuple[str, list[dict], list[dict]]:
        missing = [c for c in (chosen_column, rejected_column) if c not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: no column {', '.join(repr(c) for c in missing)} for data.chosen_column / "
                            f"data.rejected_column (columns: {', '.join(row)})")
        chosen, rejected = (row_messages(path, lineno, row, answer) for answer in answers)
        if chosen == rejected:
            raise DataError(f"{path}:{lineno}: the chosen and the rejected answer are the same; the pair says "
                            "nothing to learn from")
        return f"{path}:{lineno}", chosen, rejected

    return parse_rows(files, parse, max_rows)


class PreferencePairs:
    """Tokenized (chosen, rejected) pairs in memory, and the reference model's log-probabilities of
    each row once `reference_logps` is set (DPO compares the policy against them)."""

    def __init__(self, rows: Examples, whole_rows: bool = False):
        self.rows = rows  # 2N examples, interleaved: chosen, rejected, chosen, ...
        self.whole_rows = whole_rows  # unshifted rows, for objectives that score rows, not next tokens
        self.lengths = np.maximum(rows.lengths[0::2], rows.lengths[1::2])
        self.reference_logps: np.ndarray | None = None  # (2N,), in the rows' order

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [r for i in indices for r in (2 * i, 2 * i + 1)]
        batch = self.rows.batch(rows, shift=not self.whole_rows)
        if self.reference_logps is not None:
            batch["reference_logps"] = torch.from_numpy(self.reference_logps[rows])
        return batch

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
        return grouped_batches(self.lengths, batch_size, self.rows.group_size, seed, epoch)


@dataclasses.dataclass
class PreferenceSets:
    train: PreferencePairs
    val: PreferencePairs
    dropped: int  # pairs with a row longer than seq_len (long_examples: drop) or nothing to learn
    # the held-out pairs behind `val`, as (chosen, rejected) conversations: what answer scoring asks the
    # model and scores against (the same rows as the held-out preference metrics)
    val_pairs: list[tuple[list[dict], list[dict]]] = dataclasses.field(default_factory=list)


def load_preferences(files: list[str], tokenizer, fmt: InstructionFormat, chosen_column: str, rejected_column: str,
                     seq_len: int, val_fraction: float, long_examples: str = "drop", group_size: int = 128,
                     max_rows: int | None = None, whole_rows: bool = False,
                     val_files: list[str] | None = None) -> PreferenceSets:
    """Read, render, tokenize and label every pair; split off the validation pairs (those of `val_files`
    when given). `whole_rows`: batches hold unshifted rows (a reward model scores each row at its last token)."""
    pairs, held_out = read_split(lambda group: iter_preference_rows(group, fmt, chosen_column, rejected_column, max_rows),
                                 files, val_files, val_fraction)
    if not pairs:
        raise DataError(f"{', '.join(files)}: no preference rows")
    encoded = encode_conversations(tokenizer, [(where, m) for where, chosen, rejected in pairs for m in (chosen, rejected)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    dropped = 0
    val_pairs = []
    for i, (where, chosen, rejected) in enumerate(pairs):
        fitted = [fit_length(*encoded[2 * i + side], seq_len, long_examples, where) for side in (0, 1)]
        if fitted[0] is None or fitted[1] is None:
            dropped += 1
            continue
        if held_out[i]:
            val_pairs.append((chosen, rejected))
        ids, labels = sets["val" if held_out[i] else "train"]
        for row_ids, row_labels in fitted:
            ids.append(row_ids)
            labels.append(row_labels)
    if not sets["train"][0]:
        raise DataError(f"{', '.join(files)}: no preference pair fits packing.seq_len={seq_len} ({dropped} dropped)")
    train, val = (PreferencePairs(Examples(*sets[s], pad, group_size), whole_rows) for s in ("train", "val"))
    return PreferenceSets(train, val, dropped, val_pairs)


# ------------------------------------------------------------------ unpaired feedback (KTO)
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "1", "good", "desirable"}, {"false", "no", "0", "bad", "undesirable"}


def _desirable(where: str, column: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise DataError(f"{where}: '{column}' is {value!r}; a desirable flag is true / false (or 1 / 0, yes / no)")


class UnpairedExamples(PreferencePairs):
    """KTO's examples as pairs of rows: row 2i is example i (its prompt and answer), row 2i + 1 the same
    prompt with another example's answer (a mismatched pair, whose log-ratio estimates the KL term).
    The partner is fixed when the data is read, so the reference's log-probabilities of both rows are
    computed once (attach_reference, as for DPO) and batches may be shuffled freely."""

    def __init__(self, rows: Examples, desirable: np.ndarray):
        super().__init__(rows)
        self.desirable = desirable

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = super().batch(indices)
        batch["desirable"] = torch.from_numpy(np.repeat(self.desirable[indices], 2))  # one flag per row
        return batch


def iter_unpaired_rows(files: list[str], fmt: InstructionFormat, label_column: str,
                       max_rows: int | None = None) -> Iterator[tuple[str, list[dict], bool] | DataError]:
    """("file:line", the conversation, whether its answer is desirable) per row; a bad row is yielded as its error."""
    def parse(path: str, lineno: int, row: dict) -> tuple[str, list[dict], bool]:
        if label_column not in row:
            raise DataError(f"{path}:{lineno}: no column '{label_column}' (data.label_column: whether the answer is "
                            f"desirable; columns: {', '.join(row)})")
        return f"{path}:{lineno}", row_messages(path, lineno, row, fmt), _desirable(f"{path}:{lineno}", label_column, row[label_column])

    return parse_rows(files, parse, max_rows)


def load_unpaired(files: list[str], tokenizer, fmt: InstructionFormat, label_column: str, seq_len: int,
                  val_fraction: float, long_examples: str = "drop", group_size: int = 128, max_rows: int | None = None,
                  val_files: list[str] | None = None) -> PreferenceSets:
    """Rows of a prompt, an answer and whether the answer is desirable (`label_column`); each split's
    examples with their mismatched partners (example i's prompt with another example's answer)."""
    rows, held_out = read_split(lambda group: iter_unpaired_rows(group, fmt, label_column, max_rows), files, val_files,
                                val_fraction)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets, dropped = {}, 0
    for split, wanted in (("train", False), ("val", True)):
        examples = [r for r, is_val in zip(rows, held_out, strict=True) if is_val == wanted]
        if split == "train" and len(examples) < 2:
            raise DataError(f"{', '.join(files)}: kto needs at least 2 training examples (each is compared with "
                            "another's answer)")
        # partners along one seeded random cycle over the split: every answer is borrowed exactly once (the
        # mismatched answers are the matched ones, as the paper's estimate wants), and rows written next to
        # each other (one prompt's good and bad answer) are not paired with each other's prompt
        order = np.random.default_rng(0).permutation(len(examples))
        partner = np.empty(len(examples), dtype=np.int64)
        partner[order] = np.roll(order, 1)
        conversations = []
        for i, (where, messages, _) in enumerate(examples):
            borrowed = examples[partner[i]][1][-1]["content"]
            conversations += [(where, messages), (where, [*messages[:-1], {"role": "assistant", "content": borrowed}])]
        encoded = encode_conversations(tokenizer, conversations) if conversations else []
        ids, labels, flags = [], [], []
        for i, (where, _, desirable) in enumerate(examples):
            fitted = [fit_length(*encoded[2 * i + k], seq_len, long_examples, where) for k in (0, 1)]
            if fitted[0] is None or fitted[1] is None:
                dropped += 1
                continue
            for row_ids, row_labels in fitted:
                ids.append(row_ids)
                labels.append(row_labels)
            flags.append(desirable)
        if split == "train" and not flags:
            raise DataError(f"{', '.join(files)}: no kto example fits packing.seq_len={seq_len} ({dropped} dropped)")
        sets[split] = UnpairedExamples(Examples(ids, labels, pad, group_size), np.asarray(flags, dtype=bool))
    return PreferenceSets(sets["train"], sets["val"], dropped)
