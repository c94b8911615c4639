"""Masked language modelling (BERT / RoBERTa): 15% of tokens selected, 80% masked / 10% random / 10% kept.

Rows come from packing, like CLM; the masking is drawn here, on the training thread, from the
global torch RNG, which checkpoints save, so a resumed run masks exactly as an uninterrupted one.
The loss covers only the selected positions.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ObjectiveConfig
from lmforge.data.masking import mask_tokens, word_start_table
from lmforge.objectives.base import token_cross_entropy


class MaskedLM:
    name = "mlm"
    head = "masked_lm"

    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        if tokenizer.mask_token_id is None:
            raise ValueError("objective mlm: the tokenizer has no mask token")
        self.cfg = cfg
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.word_starts = word_start_table(tokenizer) if cfg.whole_word_masking else None

    def row_length(self, seq_len: int) -> int:
        return seq_len

    def corrupt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return mask_tokens(input_ids, self.special_ids, self.mask_id, self.vocab_size, c.mlm_probability,
                           c.mask_replace_prob, c.random_replace_prob, self.word_starts)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.masked_loss(model, *self.corrupt(batch["input_ids"]))

    def masked_loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=inputs).logits
        loss, count = token_cross_entropy(logits, labels)
        correct = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
        return loss, {"tokens": count, "correct": correct}
