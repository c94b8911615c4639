"""Regularizers that keep what the starting model knew: a term added to any objective's training loss.

`Regularized(objective, penalty)` is the objective with `penalty(model)` added while the model trains
(evaluation reports the objective's own loss); everything else (head, data, extra parameters) is the
wrapped objective's, so the loop and the data sources see no difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
    start = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        if start and start[0].device != params[0].device:  # train() moved the model after the snapshot
            start[:] = [s.to(p.device) for p, s in zip(params, start, strict=True)]
        return 0.5 * strength * sum(((p - s).float() ** 2).sum() for p, s in zip(params, start, strict=True))

    return penalty
