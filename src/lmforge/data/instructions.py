"""Instruction data for supervised fine-tuning: rows -> chat messages -> token ids with prompt-masked labels.

A row is either a conversation (`data.messages_column`: a list of {"role", "content"}) or a prompt
built from its columns (`data.prompt_template`, e.g. "{instruction}\\n\\n{input}") with the answer in
`data.response_column`. Every conversation is rendered with one chat template: the tokenizer's own,
`data.chat_template`, or the built-in one below (which the trained model's tokenizer then carries,
so `apply_chat_template` at inference writes exactly what training saw).

Only assistant turns are learned. Each turn's characters are found by rendering the conversation up
to the turn (with the generation prompt) and through it; the tokens that start inside that span get
labels, everything else gets -100. One tokenization of the whole text (with offsets) means no token
boundary differs from what the model sees at inference.

Batches: `grouped` sorts examples by length inside large shuffled chunks and right-pads each batch
(padding ~1%, no attention mask needed: with causal attention a real token never sees a pad to its
right); `packed` concatenates examples into rows of exactly seq_len (`document_mask` keeps them apart).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.data import chat_templates
from lmforge.data.formats import DataError, parse_rows
from lmforge.data.packing import document_positions
from lmforge.data.prepare import read_split

IGNORE = -100

# Plain-text role markers: works with any tokenizer (no new special tokens), ends each answer in EOS.
BUILTIN_CHAT_TEMPLATE = chat_templates.LMFORGE


@dataclass(frozen=True)
class InstructionFormat:
    """How a row becomes messages (from the recipe's data section)."""

    prompt_template: str = "{prompt}"
    response_column: str = "response"
    messages_column: str = "messages"
    system_prompt: str | None = None

    @classmethod
    def of(cls, data_cfg) -> InstructionFormat:
        """From the recipe's `data` section."""
        return cls(data_cfg.prompt_template, data_cfg.response_column, data_cfg.messages_column, data_cfg.system_prompt)

    def fields(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name]


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _text(where: str, what: str, value) -> str:
    """A row's text value; numbers are text too (a numeric answer), anything else is a bad row."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {what} is {type(value).__name__}, not text")


# ShareGPT's speakers (`{"from": ..., "value": ...}` turns) as chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "assistant"}


def _sharegpt_turns(where: str, turns: list[dict]) -> list[dict]:
    out = []
    for i, turn in enumerate(turns):
        speaker = str(turn["from"]).lower()
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{where}: turn {i} is from the unknown speaker {turn['from']!r} "
                            f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return out


def row_messages(path: str, lineno: int, row: dict, fmt: InstructionFormat) -> list[dict]:
    """The conversation in one row, or a DataError naming the file, line and what is wrong with it.
    Turns are `{"role", "content"}` (OpenAI / HF messages) or ShareGPT's `{"from", "value"}`."""
    where = f"{path}:{lineno}"
    column = fmt.messages_column if fmt.messages_column in row else (
        "conversations" if fmt.messages_column == "messages" and isinstance(row.get("conversations"), list) else None)
    if column is not None:
        messages = row[column]
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and {"from", "value"} <= m.keys() for m in messages):
            messages = _sharegpt_turns(where, messages)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            raise DataError(f"{where}: '{column}' must be a list of {{\"role\", \"content\"}} (or ShareGPT "
                            f"{{\"from\", \"value\"}}) objects")
        for i, message in enumerate(messages):
            if message["role"] not in CHAT_ROLES:
                raise DataError(f"{where}: message {i} has the unknown role {message['role']!r} "
                                f"(known: {', '.join(CHAT_ROLES)})")
            if not isinstance(message["content"], str):
                raise DataError(f"{where}: message {i} ({message['role']}) has content of type "
                                f"{type(message['content']).__name__}, not text")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn to learn")
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if not any(m["role"] in ("user", "tool") for m in messages[:first]):
            raise DataError(f"{where}: the conversation's first assistant turn answers no user turn (assistant-only "
                            "text is pretraining data: give it to a clm stage, or add the user's turn)")
        return messages
    missing = [c for c in [*fmt.fields(), fmt.response_column] if c not in row]
    if missing:
        raise DataError(f"{where}: no column {', '.join(repr(c) for c in missing)} for data.prompt_template / "
                        f"data.response_column, and no '{fmt.messages_column}' conversation (columns: {', '.join(row)})")
    fields = {k: _text(where, f"column '{k}'", row[k]) for k in fmt.fields()}
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    # rstrip: a template's optional last field left empty (alpaca's "{instruction}\n\n{input}") adds no blank tail
    messages.append({"role": "user", "content": fmt.prompt_template.format_map(fields).rstrip()})
    messages.append({"role": "assistant", "content": _text(where, f"column '{fmt.response_column}'", row[fmt.response_column])})
    return messages


def iter_conversations(files: list[str], fmt: InstructionFormat,
                       max_rows: int | None = None) -> Iterator[tuple[str, list[dict]] | DataError]:
    """("file:line", messages) for each row; a bad row is yielded as its error (a scan lists them all)."""
    return parse_rows(files, lambda path, lineno, row: (f"{path}:{lineno}", row_messages(path, lineno, row, fmt)), max_rows)


def ensure_chat_template(tokenizer, template: str | None) -> None:
    """The recipe's template (a Jinja template, or a name of data/chat_templates.py), else the tokenizer's
    own, else the built-in one; set on the tokenizer so it is saved."""
    if template is not None:
        problem = chat_templates.name_problem(template)
        if problem:
            raise DataError(f"data.chat_template: {problem}")
        if template == "chatml" and tokenizer.eos_token != "<|im_end|>":
            raise DataError(f"data.chat_template: chatml ends each turn with <|im_end|>, but this tokenizer's EOS is "
                            f"{tokenizer.eos_token!r}, so generation would not stop at a turn's end; use 'lmforge' "
                            "or a template of your own that ends assistant turns with {{ eos_token }}")
        tokenizer.chat_template = chat_templates.NAMED.get(template, template)
    elif not tokenizer.chat_template:
        tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE


def render(tokenizer, messages: list[dict], where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of every assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template renders the conversation's start differently once it "
                            "continues, so answers cannot be located; set data.chat_template to a prefix-stable template")
        spans.append((len(before), len(through)))
    return text, spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    learned = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        learned |= (starts >= lo) & (starts < hi)
    return np.where(learned, np.asarray(ids, dtype=np.int64), IGNORE)


def grouped_batches(lengths: np.ndarray, batch_size: int, group_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Batches of similar length: shuffle, sort inside chunks of `group_size` batches, shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    per_epoch = len(lengths) // batch_size
    order = rng.permutation(len(lengths))[: per_epoch * batch_size]
    chunk = batch_size * group_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class Examples:
    """Tokenized examples (ids, labels) in memory; batches are right-padded and shifted by one."""

    def __init__(self, ids: list[np.ndarray], targets: list[np.ndarray], pad_id: int, group_size: int = 128):
        self.ids, self.targets, self.pad_id, self.group_size = ids, targets, pad_id, group_size
        self.lengths = np.array([len(i) - 1 for i in ids], dtype=np.int64)  # model inputs per example

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], shift: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded rows; `shift`: inputs without the last token, labels without the first (next-token
        targets), else whole rows (what a reward model scores)."""
        cut = int(shift)
        width = int(self.lengths[indices].max()) + 1 - cut
        input_ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(indices), width), IGNORE, dtype=np.int64)
        for r, i in enumerate(indices):
            n = self.lengths[i] + 1 - cut
            input_ids[r, :n] = self.ids[i][: len(self.ids[i]) - cut]
            labels[r, :n] = self.targets[i][cut:]
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "num_tokens": torch.tensor(int(self.lengths[indices].sum()) + len(indices) * (1 - cut))}

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
        return grouped_batches(self.lengths, batch_size, self.group_size, seed, epoch)

    def padding_fraction(self, batch_size: int, seed: int) -> float:
        """Share of pad positions in one epoch of grouped batches."""
        batches = self.epoch_batches(batch_size, seed, 0)
        real = sum(int(self.lengths[b].sum()) for b in batches)
        padded = sum(int(self.lengths[b].max()) * len(b) for b in batches)
        return 1 - real / max(padded, 1)


class PackedExamples:
    """Examples back to back (in a seeded order) cut into rows of seq_len: no padding at all."""

    def __init__(self, examples: Examples, seq_len: int, document_mask: bool, seed: int):
        order = np.random.default_rng(seed).permutation(len(examples))
        self.tokens = np.concatenate([examples.ids[i] for i in order])
        self.targets = np.concatenate([examples.targets[i] for i in order])
        self.doc_ends = np.cumsum([len(examples.ids[i]) for i in order])
        self.seq_len, self.document_mask = seq_len, document_mask
        # an example's first token is never a target of the previous example's last token
        self.targets[self.doc_ends[:-1]] = IGNORE

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        L = self.seq_len
        ids = np.stack([self.tokens[i * L : i * L + L] for i in indices])
        labels = np.stack([self.targets[i * L + 1 : i * L + L + 1] for i in indices])
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.document_mask:
            batch["position_ids"] = torch.from_numpy(np.stack([document_positions(self.doc_ends, i * L, L) for i in indices]))
        return batch


@dataclass
class InstructionSets:
    train: Examples
    val: Examples
    dropped: int  # examples longer than seq_len (long_examples: drop)
    truncated: int
    # the held-out rows behind `val`, as conversations: what answer scoring asks the model (the same rows
    # the held-out loss is computed on, after max_docs, seq_len and long_examples)
    val_conversations: list[list[dict]] = field(default_factory=list)


def load_instructions(files: list[str], tokenizer, fmt: InstructionFormat, seq_len: int, val_fraction: float,
                      long_examples: str = "drop", group_size: int = 128, max_rows: int | None = None,
                      val_files: list[str] | None = None) -> InstructionSets:
    """Read, render, tokenize and label every example (the first `max_rows` of each file); split off the
    validation rows (those of `val_files` when given)."""
    rows, held_out = read_split(lambda group: iter_conversations(group, fmt, max_rows), files, val_files, val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no instruction rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets = {"train": ([], []), "val": ([], [])}
    dropped = truncated = 0
    val_conversations = []
    for i, (ids, labels) in enumerate(encode_conversations(tokenizer, rows)):
        fitted = fit_length(ids, labels, seq_len, long_examples, rows[i][0])
        if fitted is None:
            dropped += 1
            continue
        truncated += len(fitted[0]) < len(ids)
        split = sets["val" if held_out[i] else "train"]
        split[0].append(fitted[0])
        split[1].append(fitted[1])
        if held_out[i] and len(fitted[0]) == len(ids) and rows[i][1][-1]["role"] == "assistant":
            val_conversations.append(rows[i][1])  # whole (not truncated) and ending in the answer to score
    if not sets["train"][0]:
        raise DataError(f"{', '.join(files)}: no training example fits packing.seq_len={seq_len} ({dropped} dropped)")
    return InstructionSets(Examples(*sets["train"], pad, group_size), Examples(*sets["val"], pad, group_size), dropped,
                           truncated, val_conversations)


def encode_conversations(tokenizer, rows: list[tuple[str, list[dict]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, labels: the ids on assistant answers, -100 elsewhere) of each ("file:line", messages)."""
    rendered = [render(tokenizer, messages, where) for where, messages in rows]
    encoded = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int64), _labels(ids, offsets, spans))
            for ids, offsets, (_, spans) in zip(encoded.input_ids, encoded.offset_mapping, rendered, strict=True)]


def fit_length(ids: np.ndarray, labels: np.ndarray, seq_len: int, long_examples: str,
               where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The example within seq_len (`data.long_examples`: drop -> None, truncate, or error); None also when
    nothing is left to learn (an answer cut off entirely)."""
    if len(ids) > seq_len:
        if long_examples == "error":
            raise DataError(f"{where}: the example has {len(ids)} tokens, more than packing.seq_len={seq_len} "
                            "(data.long_examples: drop or truncate to go on)")
        if long_examples == "drop":
            return None
        ids, labels = ids[:seq_len], labels[:seq_len]
    return None if (labels[1:] == IGNORE).all() else (ids, labels)
