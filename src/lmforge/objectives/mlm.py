"""Masked language modelling (BERT / RoBERTa): 15% of tokens selected, 80% masked / 10% random / 10% kept.

Optionally with a sentence-level companion loss on document-aware sentence pairs
(`data/sentence_pairs.py`): next-sentence prediction (BERT) or sentence-order prediction (ALBERT),
through the model's pretraining head (`BertForPreTraining`).

Rows come from packing, like CLM; the masking is drawn here, on the training thread, from the
global torch RNG, which checkpoints save, so a resumed run masks exactly as an uninterrupted one.
The loss covers only the selected positions.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ObjectiveConfig
from lmforge.data.masking import mask_tokens, word_start_table
from lmforge.objectives.base import ObjectiveBase, token_cross_entropy


class MaskedLM(ObjectiveBase):
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
        self.sentence_task = None if cfg.sentence_task == "none" else cfg.sentence_task
        self.head = "pretraining" if self.sentence_task else "masked_lm"
        self.data_kind = "sentence_pairs" if self.sentence_task else "packed"

    def corrupt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return mask_tokens(input_ids, self.special_ids, self.mask_id, self.vocab_size, c.mlm_probability,
                           c.mask_replace_prob, c.random_replace_prob, self.word_starts)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.masked_loss(model, *self.corrupt(batch["input_ids"]), batch)

    def masked_loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    batch: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = batch or {}
        extra = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
        split = None if self.sentence_task else _body_and_head(model)
        if split is not None:  # the vocabulary head on the selected positions only (~15% of them)
            body, head = split
            selected = labels != -100
            logits = head(body(input_ids=inputs, **extra).last_hidden_state[selected])
            labels = labels[selected]
            out = None
        else:
            out = model(input_ids=inputs, **extra)
            logits = out.prediction_logits if self.sentence_task else out.logits
        loss, count = token_cross_entropy(logits, labels)
        metrics = {"tokens": count, "correct": ((logits.argmax(-1) == labels) & (labels != -100)).sum()}
        if self.sentence_task:
            sentence_logits = out.seq_relationship_logits.float()
            target = batch["next_sentence_label"]
            loss = loss + nn.functional.cross_entropy(sentence_logits, target)
            metrics["sentence_correct"] = (sentence_logits.argmax(-1) == target).sum()
            metrics["sentences"] = torch.tensor(len(target))
        return loss, metrics


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(encoder, vocabulary head) of a plain `...ForMaskedLM` (BERT: bert + cls, RoBERTa: roberta + lm_head),
    so the head's vocabulary-wide matmul runs on the selected positions alone: on MiniLM (30,522 tokens)
    it is most of a step otherwise. Wrapped models (DDP, FSDP, peft, compiled) take the full path: their
    hooks run on the whole model's call."""
    name = type(model).__name__
    if not name.endswith("ForMaskedLM") or name.startswith("FSDP"):
        return None
    children = dict(model.named_children())
    body = children.pop(getattr(model, "base_model_prefix", ""), None)
    if body is None or len(children) != 1:
        return None
    return body, next(iter(children.values()))
