"""Extractive question answering: the answer is a span of the context, found by a start and an end
logit per token (the model's question-answering head, `qa_outputs`). The loss is the mean of the
start and end cross-entropies, as transformers' own QA heads compute it (compared in
tests/test_spans.py). Held-out: SQuAD's exact match and token F1 of the best span of at most
`objective.max_answer_tokens` tokens over each question's windows (eval/spans.py)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class ExtractiveQA(ObjectiveBase):
    name = "extractive_qa"
    head = "question_answering"
    data_kind = "spans"
    long_inputs = "cut into overlapping windows (objective.doc_stride)"
    per_token_loss = False  # a loss over span boundaries, not a language model's: no perplexity

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch})
        return out.start_logits.float(), out.end_logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        start_logits, end_logits = self.logits(model, batch)
        starts, ends = batch["start_positions"], batch["end_positions"]
        loss = boundary_loss(start_logits, end_logits, starts, ends)
        correct = ((start_logits.argmax(-1) == starts) & (end_logits.argmax(-1) == ends)).sum()
        return loss, {"tokens": torch.tensor(len(starts)), "correct": correct}


def boundary_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, starts: torch.Tensor,
                  ends: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end positions' cross-entropies (each window's labels: data/spans.py)."""
    return (nn.functional.cross_entropy(start_logits, starts) + nn.functional.cross_entropy(end_logits, ends)) / 2
