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


# Families whose causal-LM head is exactly `lm_head(hidden)` (no logit scaling or soft-capping), so
# logits may be computed for a subset of positions.
PLAIN_HEAD_FAMILIES = {"llama", "gpt2", "mistral", "qwen2", "qwen3"}


def _plain_decoder(model: nn.Module) -> nn.Module | None:
    """The model itself when its decoder and head can be called apart. Not through a DDP or compile
    wrapper: DDP only syncs gradients of what ran through its own forward."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_FAMILIES or not hasattr(model, "get_decoder"):
        return None
    return model


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on pre-shifted `labels` (-100 = not learned), and the target count.

    With `labelled_only` (instruction tuning: prompts are not learned), the output layer runs on the
    labelled positions alone: on short answers after long prompts most of the vocabulary-sized logits
    (and their fp32 softmax) are never computed. Same loss, less work (tested against the full path)."""
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    plain = _plain_decoder(model) if labelled_only else None
    if plain is None:
        return token_cross_entropy(model(**inputs, use_cache=False).logits, batch["labels"])
    hidden = plain.get_decoder()(**inputs, use_cache=False).last_hidden_state
    keep = batch["labels"] != -100
    logits = plain.get_output_embeddings()(hidden[keep])
    return nn.functional.cross_entropy(logits.float(), batch["labels"][keep]), keep.sum()
