"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices) and an undecayed one (biases, norms)."""
    decay, no_decay = [], []
    for _, param in named_params:
        if not param.requires_grad:
            continue
        # Biases and norm gains are vectors; decaying them only shrinks scales the model needs.
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], eps: float, impl: str = "auto") -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (one kernel for the whole update), else foreach."""
    if not groups:
        raise ValueError("no trainable parameters: the method froze everything")
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, ValueError):
            if impl == "fused":
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_factor(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, num_cycles: int = 1) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each optimizer step (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            shape = 1.0 - progress
        elif schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == "cosine_with_restarts":
            shape = 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))) if progress < 1.0 else 0.0
        else:
            raise ValueError(f"unknown schedule '{schedule}'")
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return factor
