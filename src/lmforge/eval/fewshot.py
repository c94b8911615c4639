"""The baseline a fine-tuned classifier must beat: the untuned model given k labelled examples.

- A causal LM gets them in its prompt (in-context learning): k shots, balanced over the classes,
  each "TEXT\\nLabel: NAME\\n\\n", then "TEXT\\nLabel:"; the prediction is the label whose continuation
  " NAME" has the highest log-likelihood (the sum over its tokens, encoded as lm-eval encodes a
  context/continuation pair, so the numbers equal lm-eval's `loglikelihood`).
- An encoder has no prompt to put examples in, so its k shots per class become class prototypes:
  the mean of their embeddings (mean-pooled last hidden states), and each text takes the label of
  the nearest prototype (cosine).

Either is scored on the same held-out rows as the fine-tuned model, with the same scikit-learn
metrics and intervals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from lmforge.config import Recipe
from lmforge.data.labeled import LabeledSet, encode_texts, labeled_split
from lmforge.data.tokenizer import load_tokenizer
from lmforge.engine.runtime import autocast, resolve_precision
from lmforge.eval.intervals import classification_intervals
from lmforge.models.factory import load_model, saved_head
from lmforge.objectives.contrastive import pooled_embedding

SHOT_CHARS = 400  # characters of a shot's text in the prompt: k long e-mails would not fit a context
SHOT_TOKENS = 96  # and tokens: 400 Chinese characters are 700 tokens to a byte-level English tokenizer
QUERY_CHARS = 1000


SHOT_SEED = 0  # the baseline's shots, the same for every seed of a run


def balanced_shots(labels: list[int], k: int, seed: int) -> list[int]:
    """Indices of k examples drawn round-robin over the classes (in a seeded random order)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(labels[i], []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(k, len(labels)):
        for c in sorted(by_class):
            if by_class[c] and len(chosen) < k:
                chosen.append(by_class[c].pop(0))
    return chosen


def shot_text(tokenizer, text: str) -> str:
    """A shot's text cut to SHOT_CHARS characters and SHOT_TOKENS tokens (at a whole character)."""
    text = text[:SHOT_CHARS]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= SHOT_TOKENS else tokenizer.decode(ids[:SHOT_TOKENS]).rstrip("\ufffd")


def in_context_prompt(shots: list[tuple[str, str]], text: str) -> str:
    """k labelled examples, then the text to label (the continuation is " LABEL")."""
    head = "".join(f"{t[:SHOT_CHARS].strip()}\nLabel: {label}\n\n" for t, label in shots)
    return f"{head}{text[:QUERY_CHARS].strip()}\nLabel:"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding of a (context, continuation) pair: trailing spaces of the context move to the
    continuation, the whole is encoded once and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    return head, whole[len(head):]


def _shared_prefix(seqs: list[list[int]], needed: list[int]) -> int:
    """Tokens every input starts with, short of the positions whose logits are read."""
    length = min(len(s) - n for s, n in zip(seqs, needed, strict=True))
    first = seqs[0]
    for s in seqs[1:]:
        length = min(length, next((i for i, (a, b) in enumerate(zip(first, s, strict=False)) if a != b), min(len(first), len(s))))
    return max(length, 0)


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The transformer body and the output layer of a plain causal LM (its logits are head(body)); (None, None)
    where they are not (an adapter-wrapped model, logits scaled or soft-capped): then the whole model runs."""
    config = getattr(model, "config", None)
    if hasattr(model, "peft_config") or config is None or any(
            getattr(config, key, None) is not None for key in ("final_logit_softcapping", "logit_scale")):
        return None, None
    body, head = getattr(model, getattr(model, "base_model_prefix", ""), None), model.get_output_embeddings()
    return (body, head) if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Linear) else (None, None)


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], device: torch.device,
                          max_length: int, batch_size: int = 8) -> list[float]:
    """The summed log-probability of each continuation given its context (left-truncated to `max_length`).

    The k shots open every prompt: their keys and values are computed once and reused by every pair
    (most of each prompt's tokens), unless a left-truncation made the prompts start differently."""
    model.eval()
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    seqs = [(head + cont)[-(max_length + 1):][:-1] for head, cont in encoded]  # inputs: all but the last token
    needed = [len(cont) for _, cont in encoded]
    shared = _shared_prefix(seqs, needed) if not hasattr(model, "peft_config") else 0
    prefix_cache = None
    if shared >= 8:
        prefix_cache = model(input_ids=torch.tensor([seqs[0][:shared]], device=device), use_cache=True).past_key_values
    else:
        shared = 0
    # pairs whose inputs are the same (a context and each one-token label) share one forward pass; rows of
    # like length are batched together (a long review padded every row of its batch); only the continuation's
    # positions go through the output layer (every position's logits over a 49k vocabulary were gigabytes)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(tuple(seq), []).append(i)
    unique = sorted(groups, key=len)
    body, head = _body_and_head(model)
    out = [0.0] * len(seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = range(0, len(unique), batch_size)  # minutes on a CPU for 1,000 rows: a bar with an ETA, on a terminal
    for start in tqdm(starts, desc="score continuations", unit="batch", leave=False, disable=True if len(starts) < 4 else None):
        batch = unique[start:start + batch_size]
        chunk = [list(seq[shared:]) for seq in batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, shared:shared + len(s)] = 1
        kwargs = {}
        if prefix_cache is not None:
            past = copy.deepcopy(prefix_cache)
            past.batch_repeat_interleave(len(chunk))
            kwargs = {"past_key_values": past, "use_cache": True}
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), **kwargs}
        hidden = body(**inputs).last_hidden_state if body is not None else None
        logits = model(**inputs).logits if body is None else None
        for r, (seq, s) in enumerate(zip(batch, chunk, strict=True)):
            for i in groups[seq]:
                n = needed[i]
                at = slice(len(s) - n, len(s))
                scores = (head(hidden[r, at]) if body is not None else logits[r, at]).float().log_softmax(-1)
                targets = torch.tensor(encoded[i][1][-n:], device=device)
                out[i] = float(scores[torch.arange(n, device=device), targets].sum())
    return out


def in_context_predictions(model: torch.nn.Module, tokenizer, shots: list[tuple[str, str]], texts: list[str],
                           names: list[str], device: torch.device, max_length: int) -> list[int]:
    """For each text, the index of the label the model finds most likely after the k shots."""
    shots = [(shot_text(tokenizer, t), label) for t, label in shots]
    pairs = [(in_context_prompt(shots, t), f" {name}") for t in texts for name in names]
    scores = torch.tensor(continuation_logprobs(model, tokenizer, pairs, device, max_length)).view(len(texts), len(names))
    return scores.argmax(-1).tolist()


@torch.no_grad()
def _embed(model: torch.nn.Module, rows: LabeledSet, indices: list[int], device: torch.device, batch_size: int = 32) -> torch.Tensor:
    out = []
    for start in range(0, len(indices), batch_size):
        batch = rows.batch(indices[start:start + batch_size])
        mask = batch["attention_mask"].to(device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        out.append(pooled_embedding(hidden, mask, "mean").float())
    return torch.cat(out)


def prototype_predictions(model: torch.nn.Module, tokenizer, shots: list[tuple[str, int]], texts: list[str],
                          classes: int, device: torch.device, max_len: int) -> list[int]:
    """For each text, the class whose mean shot embedding is nearest (cosine)."""
    def rows(items: list[str]) -> LabeledSet:
        return encode_texts(tokenizer, items, [0] * len(items), max_len)

    shot_rows = rows([t for t, _ in shots])
    prototypes = torch.stack([F.normalize(_embed(model, shot_rows, [i for i, (_, c) in enumerate(shots) if c == cls], device)
                                          .mean(0), dim=-1) for cls in range(classes)])
    return (_embed(model, rows(texts), list(range(len(texts))), device) @ prototypes.T).argmax(-1).tolist()


def few_shot_baseline(model_dir: Path, shots: list[tuple[str, int]], texts: list[str], labels: list[int],
                      names: list[str], device: torch.device, max_len: int, shots_per_class: int,
                      loaded: torch.nn.Module | None = None) -> dict:
    """The untuned model at `model_dir` on (texts, labels): in context if it is a causal LM, else by
    prototypes; scored with scikit-learn, with intervals. `shots` are (text, class index). `loaded`: that
    model already on `device` with the head this scoring uses (causal LM, or the bare encoder)."""
    head = saved_head(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if not texts or head != "causal_lm" and len({c for _, c in shots}) < len(names):
        return {}  # nothing to score, or a class without a prototype
    with autocast(device, resolve_precision("auto", device)):
        predicted, kind = _baseline_predictions(model_dir, head, tokenizer, shots, texts, names, device, max_len,
                                                shots_per_class, loaded)
    classes = list(range(len(names)))
    return {"kind": kind, "shots": len(shots) if head == "causal_lm" else shots_per_class,
            "accuracy": float(accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
            **classification_intervals(labels, predicted, classes), "examples": len(texts),
            "actual": labels, "predicted": predicted}


def _baseline_predictions(model_dir: Path, head: str, tokenizer, shots: list[tuple[str, int]], texts: list[str],
                          names: list[str], device: torch.device, max_len: int, shots_per_class: int,
                          loaded: torch.nn.Module | None) -> tuple[list[int], str]:
    if head == "causal_lm":
        model = loaded if loaded is not None else load_model(model_dir, "causal_lm").to(device).eval()
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
        predicted = in_context_predictions(model, tokenizer, [(t, names[c]) for t, c in shots], texts, names, device, limit)
        kind = f"in-context: {len(shots)} labelled examples in the prompt, the most likely label, untuned model"
    else:
        model = loaded if loaded is not None else load_model(model_dir, "encoder").to(device).eval()
        predicted = prototype_predictions(model, tokenizer, shots, texts, len(names), device, max_len)
        kind = f"nearest prototype of {shots_per_class} shots per class, untuned model"
    return predicted, kind


SHOT_POOL = 32  # the shots come from the first rows of the nested label sample: every budget of 32 or more has the same


def baseline_inputs(recipe: Recipe, model_dir: Path, shots: int = 8) -> dict:
    """What the few-shot baseline of the model at `model_dir` scores on a classification recipe: its shots,
    drawn from the training rows the stage had (k per class for prototypes, k in all in context), and the
    held-out split. The shots are drawn with a fixed seed, not the run's: every seed of a branch is compared
    with the same baseline (they ranged 0.25-0.50 across seeds when each drew its own); and from the first
    SHOT_POOL rows of the label budget's nested sample, so that every budget that large has the same one."""
    cfg = recipe.data
    pool = SHOT_POOL if cfg.max_docs is None else min(cfg.max_docs, SHOT_POOL)
    train, val, names = labeled_split(cfg.train_files, cfg.column, cfg.label_column, cfg.labels, cfg.val_fraction,
                                      cfg.val_files, pool)
    index = {n: i for i, n in enumerate(names)}
    train_labels = [index[label] for _, label in train]
    per_class = shots * len(names) if saved_head(model_dir) != "causal_lm" else shots
    chosen = balanced_shots(train_labels, per_class, SHOT_SEED)
    return {"shots": [(train[i][0], train_labels[i]) for i in chosen], "texts": [t for t, _ in val],
            "labels": [index[label] for _, label in val], "names": names, "max_len": recipe.packing.seq_len,
            "shots_per_class": shots}


def recipe_baseline(recipe: Recipe, model_dir: Path, device: torch.device, shots: int = 8,
                    inputs: dict | None = None) -> dict:
    """The few-shot baseline of the model at `model_dir` on a classification recipe's held-out split
    (`inputs`: baseline_inputs's, when the caller has them)."""
    given = inputs or baseline_inputs(recipe, model_dir, shots)
    result = few_shot_baseline(model_dir, given["shots"], given["texts"], given["labels"], given["names"], device,
                               given["max_len"], given["shots_per_class"])
    return {**result, "shot_seed": SHOT_SEED}
