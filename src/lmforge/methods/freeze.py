"""Partial fine-tuning: freeze everything except parameters whose names contain one of `method.trainable`."""

from __future__ import annotations

from torch import nn

from lmforge.config import MethodConfig
from lmforge.engine.optimizer import decay_groups


def apply(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    if not cfg.trainable:
        raise ValueError("method.trainable: the freeze method needs at least one parameter-name pattern to train")
    matched = 0
    for name, param in model.named_parameters():
        keep = any(pattern in name for pattern in cfg.trainable)
        param.requires_grad_(keep)
        matched += keep
    if matched == 0:
        names = [n for n, _ in model.named_parameters()][:5]
        raise ValueError(f"method.trainable: {cfg.trainable} matches no parameter (names look like {names})")
    return model, decay_groups(model.named_parameters(), weight_decay)
