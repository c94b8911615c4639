"""Supervised fine-tuning (instruction tuning): next-token loss on the assistant's answers only.

Batches come from `data/instructions.py`: conversations rendered with a chat template, labels -100
on everything but assistant turns (prompts, system text, role markers, padding), shifted by one.
The loss is the mean over answer tokens, and only answer positions go through the output layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase, causal_lm_loss


class SupervisedFineTuning(ObjectiveBase):
    name = "sft"
    head = "causal_lm"
    data_kind = "instructions"
    long_inputs = "handled as data.long_examples says (drop, truncate or error)"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, count = causal_lm_loss(model, batch, labelled_only=True)
        return loss, {"tokens": count}
