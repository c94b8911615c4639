"""Token classification: a tag per word (named entities, parts of speech), through the model's
token-classification head; the loss is the cross-entropy over the scored tokens (each word's first
sub-word, data/tagged.py), as transformers' own head computes it (compared in tests/test_tagging.py).
Held-out: per-word accuracy, and entity precision / recall / F1 from seqeval when the tags are BIO
(eval/tagging.py)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase, token_cross_entropy


class TokenClassification(ObjectiveBase):
    name = "token_classify"
    head = "token_classifier"
    data_kind = "tagged"
    long_inputs = "truncated: the words past seq_len are neither trained nor scored"
    per_token_loss = False  # a loss over tags, not a language model's: no perplexity

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, batch)
        loss, count = token_cross_entropy(logits, batch["labels"])
        scored = batch["labels"] != -100
        correct = ((logits.argmax(-1) == batch["labels"]) & scored).sum()
        return loss, {"tokens": count, "correct": correct}
