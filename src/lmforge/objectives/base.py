"""What the loop needs from an objective: a head to train and a loss."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Objective(Protocol):
    name: str
    head: str  # the model head it trains: "causal_lm", "masked_lm" or "seq2seq"

    def row_length(self, seq_len: int) -> int:
        """Raw tokens per packed row that produce model inputs of `seq_len` (span corruption shrinks rows)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss (mean over target tokens) and counts: "tokens" (targets), optionally "correct"."""
        ...


class ObjectiveBase:
    """Defaults most objectives share: built from (cfg, tokenizer), trained on packed rows as long as
    the model's input. Objectives override what differs (span corruption's longer raw rows, ...)."""

    data_kind = "packed"

    def __init__(self, cfg=None, tokenizer=None):
        self.cfg = cfg

    def row_length(self, seq_len: int) -> int:
        return seq_len


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled positions, in fp32 whatever the autocast dtype; and their count."""
    flat = labels.reshape(-1)
    loss = nn.functional.cross_entropy(logits.reshape(flat.numel(), -1).float(), flat, ignore_index=ignore_index)
    return loss, (flat != ignore_index).sum()
