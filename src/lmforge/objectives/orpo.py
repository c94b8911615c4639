"""ORPO (Hong et al., 2024): supervised fine-tuning and preference in one loss, no reference model.

The loss is the chosen answer's next-token loss (SFT on the preferred answer) minus beta times
log sigmoid of the log odds ratio between the answers, where an answer's odds are p / (1 - p) of its
mean per-token probability p: the model learns the chosen answer and, at the same time, to find it
more likely than the rejected one. Same data and batches as DPO (data/preferences.py); this is
TRL's ORPOTrainer (`trl.experimental.orpo`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.instructions import IGNORE
from lmforge.objectives.base import ObjectiveBase, sequence_logprobs


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it (Maechler's split at -log 2)."""
    return torch.where(x > -0.6931472, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class OddsRatioPreference(ObjectiveBase):
    name = "orpo"
    head = "causal_lm"
    data_kind = "preferences"
    per_token_loss = False

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 0.1

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch["input_ids"]) % 2:
            raise ValueError("trainer.batch_size: each process must get whole (chosen, rejected) pairs")
        lengths = (batch["labels"] != IGNORE).sum(-1).clamp(min=1)
        sums = sequence_logprobs(model, batch)
        mean_logps = sums / lengths
        chosen, rejected = mean_logps[0::2], mean_logps[1::2]
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        nll = -sums[0::2].sum() / lengths[0::2].sum()  # the chosen answers' mean next-token loss
        loss = nll - self.beta * F.logsigmoid(log_odds).mean()
        return loss, {"tokens": torch.tensor(len(chosen)), "correct": (log_odds > 0).sum(), "ties": (log_odds == 0).sum(),
                      "likely_correct": (chosen.detach() > rejected.detach()).sum()}
