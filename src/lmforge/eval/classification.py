"""Classification on a held-out set: every row, scored with scikit-learn (accuracy, macro-F1,
per-class precision and recall, the confusion matrix), so a classifier that never predicts the
smallest class shows it."""

from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn
from tqdm.auto import tqdm

from lmforge.engine.runtime import autocast
from lmforge.eval.intervals import classification_intervals


@torch.no_grad()
def classification_metrics(model: nn.Module, objective, rows, batch_size: int, device: torch.device, precision: str,
                           names: list[str], detail: bool = False, progress: bool = True) -> dict:
    """The mean loss and scikit-learn's metrics over all of `rows` (labels indexed as `names`); with
    `detail`, bootstrap intervals of accuracy and macro-F1 and each example's label and prediction; `progress`:
    a bar with an ETA where there are many batches (a run's trainer.progress)."""
    model.eval()
    # rows of like length batched together (a batch pads to its longest row), results put back in row order
    lengths = [len(r) for r in rows.ids] if hasattr(rows, "ids") else [0] * len(rows)
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    predicted, actual, loss_sum = [0] * len(rows), [0] * len(rows), 0.0
    starts = range(0, len(rows), batch_size)  # 1,000 rows ran silent for a minute: a bar with an ETA
    for start in tqdm(starts, desc="classify held-out rows", unit="batch", leave=False, disable=not progress or len(starts) < 4):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in rows.batch(indices).items()}
        with autocast(device, precision):
            logits = objective.logits(model, batch)
        loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        for i, guess, truth in zip(indices, logits.argmax(-1).tolist(), batch["labels"].tolist(), strict=True):
            predicted[i], actual[i] = guess, truth
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


def one_class_verdict(metrics: dict, names: list[str]) -> str | None:
    """A run-health verdict: the classifier gives one class to every held-out row of several classes (it
    learned the majority class, not the task), else None."""
    predicted, actual = metrics.get("predicted") or [], metrics.get("actual") or []
    if len(set(predicted)) != 1 or len(set(actual)) < 2:
        return None
    only = names[predicted[0]] if predicted[0] < len(names) else str(predicted[0])
    return (f"predicts '{only}' for every one of the {len(predicted)} held-out rows ({len(set(actual))} classes): "
            "it learned the majority class, not the task (too few steps, a warm-up over most of them, or a "
            "learning rate too high or too low)")
