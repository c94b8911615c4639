"""Regularizers that keep what the starting model knew: a term added to any objective's training loss.

L2-SP pulls every trained parameter toward its starting value; EWC weighs that pull by how much the
old data's likelihood depends on the parameter (its diagonal Fisher information).

`Regularized(objective, penalty)` is the objective with `penalty(model)` added while the model trains
(evaluation reports the objective's own loss); everything else (head, data, extra parameters) is the
wrapped objective's, so the loop and the data sources see no difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmforge.objectives.base import causal_lm_loss


class Regularized:
    def __init__(self, objective, penalty: Callable[[], torch.Tensor]):
        self.objective, self.penalty = objective, penalty

    def __getattr__(self, name: str):  # name, head, data_kind, row_length, extra_parameters, ...
        return getattr(self.objective, name)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.objective.loss(model, batch)
        if model.training and torch.is_grad_enabled():
            loss = loss + self.penalty()
        return loss, metrics


def l2sp_penalty(params: list[nn.Parameter], strength: float) -> Callable[[], torch.Tensor]:
    """strength/2 * sum ||p - p_start||^2 over `params`, with p_start their values now (L2-SP)."""
    return _anchored_penalty(params, strength, None)


def ewc_penalty(params: list[nn.Parameter], strength: float, fisher: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """strength/2 * sum F * (p - p_start)^2 over `params`, with p_start their values now (EWC)."""
    return _anchored_penalty(params, strength, fisher)


def _anchored_penalty(params: list[nn.Parameter], strength: float,
                      weights: list[torch.Tensor] | None) -> Callable[[], torch.Tensor]:
    start = [p.detach().clone() for p in params]
    weights = weights or [None] * len(params)

    def penalty() -> torch.Tensor:
        if start and start[0].device != params[0].device:  # train() moved the model after the snapshot
            start[:] = [s.to(p.device) for p, s in zip(params, start, strict=True)]
            weights[:] = [w if w is None else w.to(p.device) for p, w in zip(params, weights, strict=True)]
        total = 0.0
        for p, s, w in zip(params, start, weights, strict=True):
            squared = (p - s).float() ** 2
            total = total + (squared if w is None else w * squared).sum()
        return 0.5 * strength * total

    return penalty


def diagonal_fisher(model: nn.Module, params: list[nn.Parameter], batches: Iterable[dict[str, torch.Tensor]],
                    device: torch.device) -> list[torch.Tensor]:
    """The mean squared gradient of the causal-LM loss, one row at a time (the empirical diagonal
    Fisher), scaled to mean 1 over all `params`."""
    was_training = model.training
    model.to(device).eval()  # no dropout: the model as it is
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    rows = 0
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            model.zero_grad(set_to_none=True)
            loss, _ = causal_lm_loss(model, {k: v[row : row + 1].to(device) for k, v in batch.items() if k != "num_tokens"})
            loss.backward()
            for f, p in zip(fisher, params, strict=True):
                if p.grad is not None:
                    f += p.grad.float() ** 2
            rows += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if rows == 0:
        raise ValueError("regularize.fisher_data: no rows to estimate the Fisher information on")
    mean = sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)
    return [f / mean.clamp(min=1e-30) for f in fisher]  # the 1/rows of the mean cancels
