"""Classification on a held-out set: every row, scored with scikit-learn (accuracy, macro-F1,
per-class precision and recall, the confusion matrix), so a classifier that never predicts the
smallest class shows it."""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn

from lmforge.engine.runtime import autocast
from lmforge.eval.intervals import classification_intervals


@torch.no_grad()
def classification_metrics(model: nn.Module, objective, rows, batch_size: int, device: torch.device, precision: str,
                           names: list[str], detail: bool = False) -> dict:
    """The mean loss and scikit-learn's metrics over all of `rows` (labels indexed as `names`); with
    `detail`, bootstrap intervals of accuracy and macro-F1 and each example's label and prediction."""
    model.eval()
    predicted, actual, loss_sum = [], [], 0.0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in rows.batch(list(range(start, min(start + batch_size, len(rows))))).items()}
        with autocast(device, precision):
            logits = objective.logits(model, batch)
        loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        predicted += logits.argmax(-1).tolist()
        actual += batch["labels"].tolist()
    classes = list(range(len(names)))
    per_precision, per_recall, _, support = precision_recall_fscore_support(
        actual, predicted, labels=classes, zero_division=0)
    out = {"loss": loss_sum / max(len(actual), 1), "tokens": len(actual), "examples": len(actual),
           "accuracy": float(accuracy_score(actual, predicted)),
           "macro_f1": float(f1_score(actual, predicted, labels=classes, average="macro", zero_division=0))}
    for name, p, r, n in zip(names, per_precision, per_recall, support, strict=True):
        out[f"precision_{name}"], out[f"recall_{name}"], out[f"support_{name}"] = float(p), float(r), int(n)
    out["confusion"] = confusion_matrix(actual, predicted, labels=classes).tolist()  # rows: true, columns: predicted
    if detail:
        out.update(classification_intervals(actual, predicted, classes))
        out["actual"], out["predicted"] = actual, predicted
    return out
