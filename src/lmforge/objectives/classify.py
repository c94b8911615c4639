"""Sequence classification: one label per text, through the model's sequence-classification head.

With `objective.label_prompt`, a decoder's new head starts from the label names (prompt-based
fine-tuning, Schick & Schuetze's PET, Gao et al.'s LM-BFF): each text ends with the prompt, and the head's
row of a label is the output-embedding row of the label name's first token, so that the classifier's logits
at step 0 are the language model's own logits for " NAME" after "TEXT PROMPT".
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import ObjectiveBase

PROMPT_KEY = "lmforge_label_prompt"  # in the model's config.json: eval and predict follow each text with it


def label_prompt(model: nn.Module) -> str:
    """The prompt a classifier was trained with ("" for none)."""
    return getattr(model.config, PROMPT_KEY, None) or ""


@torch.no_grad()
def label_word_head(model: nn.Module, tokenizer, names: list[str], prompt: str, output_rows: torch.Tensor) -> list[int]:
    """Start the classifier head of a decoder from `output_rows` (its language model's output embedding) at
    " NAME"'s first token, one row per label, and keep `prompt` in its config; returns those token ids."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"objective.label_prompt: needs a decoder whose classifier reads the last token "
                         f"({type(model).__name__} has no such head); leave it unset for this model")
    ids = [tokenizer(f" {name}", add_special_tokens=False).input_ids[0] for name in names]
    if len(set(ids)) < len(ids):
        same = [n for n, i in zip(names, ids, strict=True) if ids.count(i) > 1]
        raise ValueError(f"objective.label_prompt: labels {', '.join(same)} begin with the same token; "
                         "rename them in the data (data.labels) so that each starts differently")
    head.weight.copy_(output_rows[ids].to(head.weight.dtype))
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()
    setattr(model.config, PROMPT_KEY, prompt)
    return ids


class SequenceClassification(ObjectiveBase):
    name = "classify"
    head = "classifier"
    data_kind = "labeled"
    long_inputs = "truncated: the text past seq_len is never seen"
    per_token_loss = False  # one loss per example (pair): no perplexity

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, batch)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss, {"tokens": torch.tensor(len(logits)), "correct": correct}
