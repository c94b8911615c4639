"""Prompts for RL objectives (grpo): each row's conversation up to the answer, rendered with the
training chat template and a generation prompt, and the row itself (its reference answer and other
columns reach the reward).

Rows have the same formats as SFT data (data.prompt_template over columns, or a conversation in
data.messages_column); the answer (data.response_column, or the conversation's last assistant turn)
is optional and becomes the reference that exact_match / numeric_match rewards compare with.
Batches hold the prompts left-padded (generation continues every row at the same position) and each
prompt's index, by which the objective finds its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.formats import DataError, parse_rows
from lmforge.data.instructions import InstructionFormat, row_messages
from lmforge.data.prepare import read_split
from lmforge.generation.prompt import prompt_ids


@dataclass
class Prompt:
    where: str  # file:line
    messages: list[dict]  # the conversation before the answer
    text: str  # rendered with the chat template and its generation prompt
    ids: np.ndarray
    row: dict  # the row's columns, the reference answer under data.response_column


def prompt_row(path: str, lineno: int, row: dict, fmt: InstructionFormat) -> tuple[str, list[dict], dict]:
    """("file:line", the messages before the answer, the row with its reference answer) of one row."""
    has_conversation = fmt.messages_column in row or isinstance(row.get("conversations"), list)
    if not has_conversation and fmt.response_column not in row:
        row = {**row, fmt.response_column: ""}  # a prompt without a reference answer: the template alone
        messages = row_messages(path, lineno, row, fmt)[:-1]
        return f"{path}:{lineno}", messages, dict(row, **{fmt.response_column: None})
    if has_conversation:
        column = fmt.messages_column if fmt.messages_column in row else "conversations"
        turns = row[column]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role", turns[-1].get("from")) in ("user", "human"):
            row = {**row, column: [*turns, {"role": "assistant", "content": ""}]}  # no answer given: prompt only
    messages = row_messages(path, lineno, row, fmt)
    reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    return f"{path}:{lineno}", messages[:-1], dict(row, **{fmt.response_column: reference or None})


class PromptSet:
    """Tokenized prompts; `batch(indices)` left-pads them."""

    def __init__(self, prompts: list[Prompt], pad_id: int):
        self.prompts, self.pad_id = prompts, pad_id

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.prompts[i].ids) for i in indices)
        input_ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(indices), width), dtype=np.int64)
        for r, i in enumerate(indices):
            ids = self.prompts[i].ids
            input_ids[r, width - len(ids):] = ids
            attention_mask[r, width - len(ids):] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "prompt_index": torch.tensor(indices), "num_tokens": torch.tensor(int(attention_mask.sum()))}


@dataclass
class PromptSets:
    train: PromptSet
    val: PromptSet
    dropped: int  # prompts that leave no room for max_new_tokens within seq_len


def load_prompts(files: list[str], tokenizer, fmt: InstructionFormat, max_prompt_tokens: int, val_fraction: float,
                 max_rows: int | None = None, val_files: list[str] | None = None) -> PromptSets:
    """Read and render every prompt (the first `max_rows` of each file); split off the held-out ones."""
    rows, held_out = read_split(lambda group: parse_rows(group, lambda p, n, r: prompt_row(p, n, r, fmt), max_rows),
                                files, val_files, val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no prompt rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets: dict[str, list[Prompt]] = {"train": [], "val": []}
    dropped = 0
    for (where, messages, row), is_val in zip(rows, held_out, strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = np.asarray(prompt_ids(tokenizer, text), dtype=np.int64)
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        sets["val" if is_val else "train"].append(Prompt(where, messages, text, ids, {**row, "_where": where}))
    if not sets["train"]:
        raise DataError(f"{', '.join(files)}: no prompt fits packing.seq_len minus rollout.max_new_tokens "
                        f"({max_prompt_tokens} tokens; {dropped} dropped)")
    return PromptSets(PromptSet(sets["train"], pad), PromptSet(sets["val"], pad), dropped)
