"""Direct preference optimization (Rafailov et al., 2023): learn from (chosen, rejected) answer pairs
without a reward model or sampling.

The policy's implicit reward of an answer is beta * (log pi(answer | prompt) - log ref(answer | prompt)),
summed over the answer's tokens; the loss is -log sigmoid(reward(chosen) - reward(rejected)). The
reference is the model as training starts (the base model under adapters): its log-probabilities are
computed once, before the first step (`attach_reference`), and travel with the batches, so no second
model sits in memory and a resumed run compares against the same reference. Batches interleave the
pair's rows (chosen, rejected, ...): data/preferences.py.

`objective.loss_type: ipo` (Azar et al., 2023) shares all of it but the last step: the log-ratios are
averaged over each answer's tokens, and their difference is pulled to 1 / (2 beta) by a squared loss
instead of pushed without bound (DPO's sigmoid saturates only as the margin grows to infinity), as
TRL's `loss_type="ipo"` does. The reference-free relatives live beside this file: simpo.py, orpo.py.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.instructions import IGNORE
from lmforge.data.preferences import PreferencePairs
from lmforge.engine.runtime import autocast
from lmforge.objectives.base import ObjectiveBase, sequence_logprobs


class DirectPreference(ObjectiveBase):
    name = "dpo"
    head = "causal_lm"
    data_kind = "preferences"
    per_token_loss = False  # one loss per example (pair): no perplexity
    needs_reference = True  # the data source runs attach_reference before training

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 0.1
        self.loss_type = cfg.loss_type if cfg is not None else "sigmoid"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "reference_logps" not in batch:
            raise ValueError("dpo: the batch carries no reference log-probabilities (attach_reference computes them)")
        if len(batch["input_ids"]) % 2:
            raise ValueError("trainer.batch_size: each process must get whole (chosen, rejected) pairs")
        logps = sequence_logprobs(model, batch)
        log_ratios = logps - batch["reference_logps"]
        margins = self.beta * (log_ratios[0::2] - log_ratios[1::2])
        lengths = (batch["labels"] != IGNORE).sum(-1).clamp(min=1)
        # per pair: "tokens" weighs evaluation means by pairs; "correct" = chosen rewarded above rejected,
        # "ties" = neither above the other (reported apart from the pairs lost; every pair at step 0,
        # where policy = reference); "likely_correct" = the policy itself finds the chosen answer more
        # likely per token than the rejected one: what the model would pick, measurable at step 0 too.
        per_token = logps.detach() / lengths
        if self.loss_type == "ipo":
            per_token_ratios = log_ratios / lengths
            loss = ((per_token_ratios[0::2] - per_token_ratios[1::2]) - 1 / (2 * self.beta)).pow(2).mean()
        else:
            loss = -F.logsigmoid(margins).mean()
        return loss, {"tokens": torch.tensor(len(margins)), "correct": (margins > 0).sum(),
                                            "ties": (margins == 0).sum(),
                                            "likely_correct": (per_token[0::2] > per_token[1::2]).sum()}


@torch.no_grad()
def attach_reference(model: nn.Module, pairs: PreferencePairs, batch_size: int, device: torch.device,
                     precision: str) -> None:
    """The reference's summed answer log-probabilities of every row, stored on `pairs`. The reference
    is `model` as it is now, with its adapters switched off (peft): the base the policy starts from.
    (The model is left on `device`, where training is about to put it anyway.)"""
    was_training = model.training
    model.to(device).eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()  # a PeftModel
    pairs.reference_logps = None
    out = np.zeros(2 * len(pairs), dtype=np.float32)
    with off:
        for b in range(math.ceil(len(pairs) / batch_size)):
            indices = list(range(b * batch_size, min((b + 1) * batch_size, len(pairs))))
            batch = pairs.batch(indices)
            with autocast(device, precision):
                logps = sequence_logprobs(model, {k: batch[k].to(device) for k in ("input_ids", "labels")})
            out[2 * indices[0] : 2 * indices[-1] + 2] = logps.float().cpu().numpy()
    pairs.reference_logps = out
    model.train(was_training)
