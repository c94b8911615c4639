"""Sequence classification: one label per text, through the model's sequence-classification head."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase


class SequenceClassification(ObjectiveBase):
    name = "classify"
    head = "classifier"
    data_kind = "labeled"
    long_inputs = "truncated: the text past seq_len is never seen"
    per_token_loss = False  # one loss per example (pair): no perplexity

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, batch)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss, {"tokens": torch.tensor(len(logits)), "correct": correct}
