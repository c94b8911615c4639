"""Contrastive sentence embeddings (InfoNCE) with in-batch negatives.

Each batch holds B pairs (a_i, b_i); every b_j with j != i is a negative for a_i. The loss is the
cross-entropy of the scaled cosine-similarity matrix against its diagonal. Two data modes: paired
text (query / positive columns), or one text twice, where the two dropout masks make the two
views (SimCSE; the model needs dropout > 0). The temperature is fixed or learned (as log-scale).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ObjectiveConfig
from lmforge.objectives.base import ObjectiveBase


class Contrastive(ObjectiveBase):
    name = "contrastive"
    head = "encoder"
    data_kind = "pairs"

    def __init__(self, cfg: ObjectiveConfig, tokenizer=None):
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.logit_scale] if self.cfg.learn_temperature else []

    def state_dict(self) -> dict:
        return {"logit_scale": float(self.logit_scale.detach())}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(state["logit_scale"])

    def embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return nn.functional.normalize(pooled.float(), dim=-1)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.embed(model, batch["input_ids"], batch["attention_mask"])
        b = self.embed(model, batch["input_ids_b"], batch["attention_mask_b"])
        scale = self.logit_scale.to(a.device).exp().clamp(max=100.0)  # CLIP's cap keeps it stable
        logits = scale * a @ b.T
        labels = torch.arange(len(a), device=a.device)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.cfg.symmetric:
            loss = (loss + nn.functional.cross_entropy(logits.T, labels)) / 2
        correct = (logits.argmax(1) == labels).sum()
        return loss, {"tokens": torch.tensor(len(a)), "correct": correct}
