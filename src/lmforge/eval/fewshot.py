"""The baseline a fine-tuned classifier must beat: the untuned model given k labelled examples per class.

For an encoder there is no prompt to put examples in, so the k shots become class prototypes: the
mean of their embeddings (mean-pooled last hidden states of the untuned model), and each held-out
text takes the label of the nearest prototype (cosine). It is scored on the same held-out split as
the fine-tuned model, with the same scikit-learn metrics and intervals.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from lmforge.config import Recipe
from lmforge.data.labeled import load_labeled
from lmforge.data.tokenizer import load_tokenizer
from lmforge.eval.intervals import classification_intervals
from lmforge.models.factory import load_model
from lmforge.objectives.contrastive import pooled_embedding


@torch.no_grad()
def _embed(model: torch.nn.Module, rows, indices: list[int], device: torch.device, batch_size: int = 32) -> torch.Tensor:
    out = []
    for start in range(0, len(indices), batch_size):
        batch = rows.batch(indices[start:start + batch_size])
        mask = batch["attention_mask"].to(device)
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        out.append(pooled_embedding(hidden, mask, "mean"))
    return torch.cat(out)


def prototype_baseline(recipe: Recipe, model_dir: Path, device: torch.device, shots: int = 8) -> dict:
    """k-shot nearest-prototype accuracy and macro-F1 of the model at `model_dir` on the recipe's held-out split."""
    cfg = recipe.data
    tokenizer = load_tokenizer(model_dir)
    train, val, names = load_labeled(cfg.train_files, tokenizer, cfg.column, cfg.label_column, cfg.labels,
                                     recipe.packing.seq_len, cfg.val_fraction)
    if not len(val):
        return {}
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    chosen = {c: [i for i in order if train.labels[i] == c][:shots] for c in range(len(names))}
    if any(not v for v in chosen.values()):
        return {}
    model = load_model(model_dir, "encoder").to(device).eval()
    prototypes = torch.stack([F.normalize(_embed(model, train, chosen[c], device).mean(0), dim=-1)
                              for c in range(len(names))])
    predicted = (_embed(model, val, list(range(len(val))), device) @ prototypes.T).argmax(-1).tolist()
    classes = list(range(len(names)))
    return {"kind": "nearest prototype of k shots per class, untuned model", "shots": shots,
            "accuracy": float(accuracy_score(val.labels, predicted)),
            "macro_f1": float(f1_score(val.labels, predicted, labels=classes, average="macro", zero_division=0)),
            **classification_intervals(val.labels, predicted, classes), "examples": len(val)}
