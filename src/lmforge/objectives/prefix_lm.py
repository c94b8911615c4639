"""Prefix LM (decoder): bidirectional attention over a random-length prefix, causal prediction of the rest.

Each row draws a prefix length p; positions inside the prefix attend to the whole prefix (and
carry no loss), later positions attend causally. The mask is passed to the model as a 4-D boolean
attention mask, which `transformers` decoders use as given.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase, token_cross_entropy


def prefix_attention_mask(prefix_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, L, L) boolean: causal everywhere, plus full visibility inside each row's prefix."""
    positions = torch.arange(length, device=prefix_lengths.device)
    causal = positions[None, :] <= positions[:, None]
    in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]  # key j is in the prefix
    query_in_prefix = positions[None, :, None] < prefix_lengths[:, None, None]
    return (causal[None] | (in_prefix & query_in_prefix))[:, None]


class PrefixLM(ObjectiveBase):
    name = "prefix_lm"
    head = "causal_lm"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows, length = input_ids.shape
        low = max(1, int(self.cfg.prefix_min_fraction * length))
        high = max(low + 1, int(self.cfg.prefix_max_fraction * length))
        prefix = torch.randint(low, high, (rows,), device=input_ids.device)
        # labels[t] is token t+1: targets inside the prefix (t + 1 < p) carry no loss
        positions = torch.arange(length, device=input_ids.device)
        labels = labels.masked_fill(positions[None, :] + 1 < prefix[:, None], -100)
        mask = prefix_attention_mask(prefix, length)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        loss, count = token_cross_entropy(logits, labels)
        return loss, {"tokens": count}
