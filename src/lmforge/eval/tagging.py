"""Held-out metrics of a token classifier: per-word accuracy over every held-out row, and, when the
tags follow the BIO scheme (B-X / I-X / O), entity-level precision, recall and F1 from seqeval (the
CoNLL evaluation's definition: an entity counts only when its type and its whole span are right)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.data.tagged import IGNORE, TaggedSet
from lmforge.engine.runtime import autocast
from lmforge.objectives.base import token_cross_entropy


@torch.no_grad()
def tagging_metrics(model: nn.Module, objective, rows: TaggedSet, batch_size: int, device: torch.device,
                    precision: str, names: list[str]) -> dict[str, float]:
    model.eval()
    truth, predicted = [], []
    total_loss, total = 0.0, 0
    for b in range(math.ceil(len(rows) / batch_size)):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, len(rows))))
        batch = {k: v.to(device) for k, v in rows.batch(indices).items()}
        with autocast(device, precision):
            logits = objective.logits(model, batch)
        loss, count = token_cross_entropy(logits, batch["labels"])
        total_loss += float(loss) * int(count)
        total += int(count)
        for labels, guesses in zip(batch["labels"].tolist(), logits.argmax(-1).tolist(), strict=True):
            kept = [(t, g) for t, g in zip(labels, guesses, strict=True) if t != IGNORE]
            truth.append([names[t] for t, _ in kept])
            predicted.append([names[g] for _, g in kept])
    words = sum(len(t) for t in truth)
    out = {"loss": total_loss / max(total, 1), "tokens": words,
           "accuracy": sum(a == b for t, p in zip(truth, predicted, strict=True) for a, b in zip(t, p, strict=True)) / max(words, 1)}
    if any(n.startswith(("B-", "I-")) for n in names):
        from seqeval.metrics import f1_score, precision_score, recall_score

        out.update(entity_f1=f1_score(truth, predicted, zero_division=0),
                   entity_precision=precision_score(truth, predicted, zero_division=0),
                   entity_recall=recall_score(truth, predicted, zero_division=0))
    return out
