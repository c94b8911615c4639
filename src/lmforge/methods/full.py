"""Full fine-tuning (and pretraining): every parameter trains at the base learning rate."""

from __future__ import annotations

from torch import nn

from lmforge.config import MethodConfig
from lmforge.engine.optimizer import decay_groups


def apply(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    for param in model.parameters():
        param.requires_grad_(True)
    return model, decay_groups(model.named_parameters(), weight_decay)
