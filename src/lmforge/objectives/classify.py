"""Sequence classification: one label per text, through the model's sequence-classification head."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ObjectiveConfig


class SequenceClassification:
    name = "classify"
    head = "classifier"
    data_kind = "labeled"

    def __init__(self, cfg: ObjectiveConfig, tokenizer=None):
        self.cfg = cfg

    def row_length(self, seq_len: int) -> int:
        return seq_len

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss, {"tokens": torch.tensor(len(logits)), "correct": correct}
