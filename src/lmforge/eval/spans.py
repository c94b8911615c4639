"""Held-out metrics of extractive question answering, SQuAD v1.1's: for each question the best span
over all its windows (start <= end, both in the context, at most `max_answer_tokens` tokens; the
score is start logit + end logit, the top 20 of each tried, as transformers' QA examples do), mapped
back to the context's characters, then exact match and token F1 against the best-matching gold
answer, after SQuAD's normalisation (lower case, no punctuation, no articles, single spaces)."""

from __future__ import annotations

import collections
import math
import re
import string

import torch
from torch import nn

from lmforge.data.spans import SpanSet
from lmforge.engine.runtime import autocast
from lmforge.objectives.extractive_qa import boundary_loss

CANDIDATES = 20  # start and end positions tried per window


def normalize_answer(text: str) -> str:
    """SQuAD's evaluation script's normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, F1), each the best over the gold answers."""
    return (max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers),
            max(token_f1(prediction, a) for a in answers))


def best_span(start_logits: list[list[float]], end_logits: list[list[float]],
              offsets: list[list[tuple[int, int] | None]], max_tokens: int) -> tuple[int, int] | None:
    """The best (start char, end char) over a question's windows, or None when no span is allowed."""
    best, best_score = None, -math.inf
    for starts, ends, window in zip(start_logits, end_logits, offsets, strict=True):
        top_starts = sorted(range(len(starts)), key=starts.__getitem__, reverse=True)[:CANDIDATES]
        top_ends = sorted(range(len(ends)), key=ends.__getitem__, reverse=True)[:CANDIDATES]
        for s in top_starts:
            for e in top_ends:
                if window[s] is None or window[e] is None or e < s or e - s + 1 > max_tokens:
                    continue
                if starts[s] + ends[e] > best_score:
                    best, best_score = (window[s][0], window[e][1]), starts[s] + ends[e]
    return best


@torch.no_grad()
def span_metrics(model: nn.Module, objective, windows: SpanSet, batch_size: int, device: torch.device,
                 precision: str, max_answer_tokens: int) -> dict[str, float]:
    """exact_match and f1 (in %, as SQuAD reports them) over every held-out question, and the loss."""
    model.eval()
    starts: list[list[float]] = []
    ends: list[list[float]] = []
    total_loss = 0.0
    for b in range(math.ceil(len(windows) / batch_size)):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, len(windows))))
        batch = {k: v.to(device) for k, v in windows.batch(indices).items()}
        with autocast(device, precision):
            start_logits, end_logits = objective.logits(model, batch)
        loss = boundary_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
        total_loss += float(loss) * len(indices)
        for r, i in enumerate(indices):
            n = len(windows.ids[i])
            starts.append(start_logits[r, :n].tolist())
            ends.append(end_logits[r, :n].tolist())
    exact = f1 = 0.0
    for q, question in enumerate(windows.questions):
        ws = windows.windows_of[q]
        span = best_span([starts[w] for w in ws], [ends[w] for w in ws], [windows.offsets[w] for w in ws],
                         max_answer_tokens)
        # strip: a byte-level BPE token's offsets include the space before its word
        prediction = question.context[span[0]:span[1]].strip() if span else ""
        em, score = squad_scores(prediction, [text for text, _ in question.answers])
        exact, f1 = exact + em, f1 + score
    count = max(len(windows.questions), 1)
    return {"loss": total_loss / max(len(windows), 1), "tokens": len(windows.questions),
            "exact_match": 100 * exact / count, "f1": 100 * f1 / count}
