"""Reward model (Bradley-Terry, as in InstructGPT): a scalar score per answer, trained so the chosen
answer of each preference pair scores above the rejected one.

The model is a sequence classifier with one output (`transformers`' head reads the last real token
of each row); the loss is -log sigmoid(score(chosen) - score(rejected)). Its data are DPO's
preference pairs (data/preferences.py: prompt + answer rows, chosen and rejected interleaved); the
trained folder loads with `AutoModelForSequenceClassification` and scores any prompt + answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.objectives.base import ObjectiveBase


class RewardModel(ObjectiveBase):
    name = "reward"
    head = "classifier"
    data_kind = "preferences"
    per_token_loss = False  # one loss per example (pair): no perplexity
    head_config = {"num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0}}
    scores_whole_rows = True  # the answer's last token (its EOS) included: batches are not shifted

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch["input_ids"]) % 2:
            raise ValueError("trainer.batch_size: each process must get whole (chosen, rejected) pairs")
        # right padding under a causal mask: no attention mask needed; the head finds each row's last real token
        scores = model(input_ids=batch["input_ids"], use_cache=False).logits.squeeze(-1).float()
        margins = scores[0::2] - scores[1::2]
        # per pair: "tokens" weighs evaluation means by pairs; "correct" = chosen scored above rejected,
        # "ties" = neither above the other (reported apart from the pairs lost)
        return -F.logsigmoid(margins).mean(), {"tokens": torch.tensor(len(margins)), "correct": (margins > 0).sum(),
                                            "ties": (margins == 0).sum()}
