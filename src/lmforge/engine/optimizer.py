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


def warmup_steps_of(warmup_steps: int, warmup_fraction: float | None, total_steps: int) -> tuple[int, str | None]:
    """The warm-up of a run of `total_steps` (trainer.warmup_fraction of them, or trainer.warmup_steps), and a
    warning when a fixed warm-up takes more than half the run: a model that spends most of a short run at a
    rising learning rate learns little (a classifier so trained once predicted the majority class, silently)."""
    if warmup_fraction is not None:
        return round(warmup_fraction * total_steps), None
    if warmup_steps > 1 and 2 * warmup_steps > total_steps:
        return warmup_steps, (f"trainer.warmup_steps {warmup_steps} is {warmup_steps / total_steps:.0%} of the run's "
                              f"{total_steps} steps: most of the run trains below trainer.lr; give trainer.warmup_fraction "
                              "(e.g. 0.1), which follows the run's length")
    return warmup_steps, None


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
