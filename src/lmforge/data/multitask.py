"""Multi-task instruction tuning (`data.multitask`): rows of several tasks in one run.

Each row names its task (`multitask.column`). A task's prompt is built with its own template
(`multitask.templates[task]`, over the row's columns) or the recipe's `prompt_template`, optionally
behind a T5-style prefix (`multitask.prefix`, e.g. "{task}: "). Batches draw each row's task at
random with probability
- proportional: n_t / sum(n)             (every example equally likely: big tasks dominate),
- temperature:  n_t^(1/T) / sum(n^(1/T))  (T5's and mT5's scaling: T = 1 is proportional, large T
                                          tends to equal),
- equal:        1 / K,
then one of that task's training rows uniformly; the RNG of batch b is seeded by (seed, b), so a
resumed run sees the same batches (as data/mixing.py does for corpora). Held out: every evaluation
reports the answer loss of each trained task's held-out rows (`task/<name>/loss`) and of every row of
the `held_out_tasks`, which never train (`heldout/<name>/loss`): how far the run generalises to a
task it never saw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.formats import DataError, parse_rows
from lmforge.data.instructions import (
    Examples,
    InstructionFormat,
    encode_conversations,
    fit_length,
    row_messages,
)
from lmforge.data.prepare import read_split


def task_probabilities(counts: list[int], sampling: str, temperature: float) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    if sampling == "equal":
        weights = np.ones_like(n)
    elif sampling == "temperature":
        weights = n ** (1.0 / temperature)
    else:
        weights = n
    return weights / weights.sum()


def iter_task_conversations(files: list[str], fmt: InstructionFormat, cfg,
                            max_rows: int | None = None) -> Iterator[tuple[str, str, list[dict]] | DataError]:
    """("file:line", task, messages) per row: the task's template (or the recipe's), then the prefix."""
    def parse(path: str, lineno: int, row: dict) -> tuple[str, str, list[dict]]:
        where = f"{path}:{lineno}"
        if cfg.column not in row:
            raise DataError(f"{where}: no task column '{cfg.column}' (data.multitask.column; columns: {', '.join(row)})")
        task = str(row[cfg.column])
        template = cfg.templates.get(task, fmt.prompt_template)
        messages = row_messages(path, lineno, row, InstructionFormat(template, fmt.response_column, fmt.messages_column,
                                                                     fmt.system_prompt))
        if cfg.prefix:
            user = next(m for m in messages if m["role"] == "user")
            user["content"] = cfg.prefix.format(task=task) + user["content"]
        return where, task, messages

    return parse_rows(files, parse, max_rows)


@dataclass
class TaskSets:
    names: list[str]                 # the trained tasks, in order (a batch's `source` indexes them)
    train: Examples                  # every trained task's training rows, task by task
    train_task: np.ndarray           # each training row's task index
    val: dict[str, Examples]         # held-out rows of each trained task
    unseen: dict[str, Examples]      # every row of each held-out task
    probabilities: np.ndarray        # sampling probability of each trained task
    dropped: int
    skipped: list[str]               # tasks of the data with no example that fits seq_len (not trained)


def load_tasks(files: list[str], tokenizer, fmt: InstructionFormat, cfg, seq_len: int, val_fraction: float,
               long_examples: str, max_rows: int | None = None, val_files: list[str] | None = None) -> TaskSets:
    rows, held_out = read_split(lambda group: iter_task_conversations(group, fmt, cfg, max_rows), files, val_files,
                                val_fraction)
    if not rows:
        raise DataError(f"{', '.join(files)}: no instruction rows")
    present = Counter(task for _, task, _ in rows)
    for key, names in (("tasks", cfg.tasks or []), ("held_out_tasks", cfg.held_out_tasks), ("templates", list(cfg.templates))):
        missing = [n for n in names if n not in present]
        if missing:
            shown = ", ".join(sorted(present)[:8]) + (f", ... ({len(present)} in all)" if len(present) > 8 else "")
            raise DataError(f"data.multitask.{key}: {missing[0]!r} is not a task of the data (its '{cfg.column}' "
                            f"column has: {shown})")
    unseen_names = list(cfg.held_out_tasks)
    trained = [n for n in (cfg.tasks or sorted(present)) if n not in unseen_names]
    if not trained:
        raise DataError("data.multitask: no task left to train (every task is in held_out_tasks)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_conversations(tokenizer, [(where, messages) for where, _, messages in rows])
    train: dict[str, tuple[list, list]] = {n: ([], []) for n in trained}
    val: dict[str, tuple[list, list]] = {n: ([], []) for n in trained}
    unseen: dict[str, tuple[list, list]] = {n: ([], []) for n in unseen_names}
    dropped = 0
    for (where, task, _), (ids, labels), is_val in zip(rows, encoded, held_out, strict=True):
        split = unseen.get(task) if task in unseen else (val if is_val else train).get(task)
        if split is None:  # a task the recipe does not train
            continue
        fitted = fit_length(ids, labels, seq_len, long_examples, where)
        if fitted is None:
            dropped += 1
            continue
        split[0].append(fitted[0])
        split[1].append(fitted[1])
    empty = [n for n in trained if not train[n][0]]
    if empty and cfg.tasks is not None:  # a task the recipe names must train
        raise DataError(f"data.multitask.tasks: task {empty[0]!r} has no training example that fits packing.seq_len={seq_len}")
    trained = [n for n in trained if train[n][0]]  # of "every task": those with examples that fit
    if not trained:
        raise DataError(f"data.multitask: no task has a training example that fits packing.seq_len={seq_len}")
    counts = [len(train[n][0]) for n in trained]
    all_ids = [x for n in trained for x in train[n][0]]
    all_labels = [x for n in trained for x in train[n][1]]
    return TaskSets(trained, Examples(all_ids, all_labels, pad), np.repeat(np.arange(len(trained)), counts),
                    {n: Examples(*val[n], pad) for n in trained if val[n][0]},
                    {n: Examples(*unseen[n], pad) for n in unseen_names if unseen[n][0]},
                    task_probabilities(counts, cfg.sampling, cfg.temperature), dropped, empty)


def iterate_tasks(sets: TaskSets, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[dict]:
    """Endless batches: each row's task drawn by the sampling probabilities, then a row of that task."""
    rows_of = [np.flatnonzero(sets.train_task == t) for t in range(len(sets.names))]
    batch_number = start_batch
    while True:
        rng = np.random.default_rng([seed, batch_number])
        tasks = rng.choice(len(sets.names), size=batch_size, p=sets.probabilities)
        indices = [int(rows_of[t][rng.integers(len(rows_of[t]))]) for t in tasks]
        batch = sets.train.batch(indices)
        batch["source"] = torch.from_numpy(tasks.astype(np.int64))
        yield batch
        batch_number += 1
