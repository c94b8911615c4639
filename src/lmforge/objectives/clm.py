"""Causal language modelling: predict every next token.

Batches come from packing (`data/packing.py`): `input_ids` and `labels` are the same packed rows
shifted by one, so the loss here needs no shifting and no padding mask. `position_ids`, when
present, restart at document starts and keep attention inside each document.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase, causal_lm_loss


class CausalLM(ObjectiveBase):
    name = "clm"
    head = "causal_lm"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, count = causal_lm_loss(model, batch)
        return loss, {"tokens": count}
