"""Kahneman-Tversky optimization (Ethayarajh et al., 2024): learn from unpaired feedback, answers
marked good or bad one by one, without a second answer to the same prompt.

An answer's implicit reward is DPO's, beta * (log pi(answer | prompt) - log ref(answer | prompt)). It
is judged against a reference point z0, an estimate of KL(pi || ref): the batch's mean log-ratio of
mismatched pairs (each prompt with another example's answer), clamped at 0 and not differentiated.
A desirable answer's loss is 1 - sigmoid(beta * (log-ratio - z0)), an undesirable one's
1 - sigmoid(beta * (z0 - log-ratio)), weighted by `objective.desirable_weight` /
`undesirable_weight` (to balance unequal counts; the paper's rule of thumb keeps
desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]). As TRL's
KTOTrainer (loss_type "kto") computes it, compared in tests/test_preferences.py.

Batches come from data/preferences.py's UnpairedExamples: row 2i the example, row 2i + 1 its
mismatched pair, with the reference's log-probabilities of both computed once before training
(attach_reference, shared with dpo.py). The mismatched rows are scored without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.engine.rollout import unwrapped
from lmforge.objectives.base import ObjectiveBase, sequence_logprobs


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
               desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's weighted loss (desirable ones first, as TRL orders them), the rewards in the
    examples' own order, and the reference point z0."""
    z0 = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    log_ratios = logps - ref_logps
    good, bad = log_ratios[desirable], log_ratios[~desirable]
    losses = torch.cat([desirable_weight * (1 - F.sigmoid(beta * (good - z0))),
                        undesirable_weight * (1 - F.sigmoid(beta * (z0 - bad)))])
    return losses, beta * log_ratios.detach(), z0


class KahnemanTversky(ObjectiveBase):
    name = "kto"
    head = "causal_lm"
    data_kind = "preferences"
    per_token_loss = False
    needs_reference = True  # the data source runs attach_reference before training
    unpaired = True  # the data source reads unpaired examples (UnpairedExamples), not pairs
    train_metrics = ("kl",)  # the reference point z0, logged beside the loss

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 0.1
        self.desirable_weight = (cfg.desirable_weight if cfg is not None else None) or 1.0
        self.undesirable_weight = (cfg.undesirable_weight if cfg is not None else None) or 1.0

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "reference_logps" not in batch:
            raise ValueError("kto: the batch carries no reference log-probabilities (attach_reference computes them)")
        rows = {k: batch[k][0::2] for k in ("input_ids", "labels")}
        logps = sequence_logprobs(model, rows)
        with torch.no_grad():  # the reference point: mismatched pairs, no gradient (as in the paper and TRL)
            kl_logps = sequence_logprobs(unwrapped(model), {k: batch[k][1::2] for k in ("input_ids", "labels")})
        desirable = batch["desirable"][0::2].bool()
        losses, rewards, z0 = kto_losses(logps, batch["reference_logps"][0::2], kl_logps, batch["reference_logps"][1::2],
                                         desirable, self.beta, self.desirable_weight, self.undesirable_weight)
        sign = torch.where(desirable, 1.0, -1.0)
        # per example: "correct" = the implicit reward's sign agrees with the label, "ties" = reward 0
        # (every example at step 0, where policy = reference), reported apart from the ones it gets wrong
        return losses.mean(), {"tokens": torch.tensor(len(losses)), "correct": (sign * rewards > 0).sum(),
                               "ties": (rewards == 0).sum(), "kl": z0}
