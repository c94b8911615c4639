"""SimPO (Meng et al., 2024): preference pairs without a reference model.

An answer's reward is beta times its mean per-token log-probability under the policy (the length
normalisation keeps long answers from winning by their length); the loss is
-log sigmoid(reward(chosen) - reward(rejected) - gamma), gamma a target margin. No reference
log-probabilities are computed or held: the cheapest of the preference objectives. Same data and
batches as DPO (data/preferences.py); this is TRL's CPOTrainer with `loss_type="simpo"` and
`cpo_alpha=0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.instructions import IGNORE
from lmforge.objectives.base import ObjectiveBase, sequence_logprobs


def mean_answer_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean log-probability per labelled (answer) token."""
    return sequence_logprobs(model, batch) / (batch["labels"] != IGNORE).sum(-1).clamp(min=1)


class SimplePreference(ObjectiveBase):
    name = "simpo"
    head = "causal_lm"
    data_kind = "preferences"
    per_token_loss = False

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 2.0
        self.gamma = cfg.simpo_gamma if cfg is not None else 0.5

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch["input_ids"]) % 2:
            raise ValueError("trainer.batch_size: each process must get whole (chosen, rejected) pairs")
        mean_logps = mean_answer_logprobs(model, batch)
        margins = self.beta * (mean_logps[0::2] - mean_logps[1::2])
        # "correct": the chosen answer is rewarded above the rejected one (here the same as "likely")
        return -F.logsigmoid(margins - self.gamma).mean(), {
            "tokens": torch.tensor(len(margins)), "correct": (margins > 0).sum(), "ties": (margins == 0).sum(),
            "likely_correct": (margins.detach() > 0).sum()}
