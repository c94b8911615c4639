"""Preference accuracy on held-out (prompt, chosen, rejected) pairs: does the model rank the chosen
answer above the rejected one?

- a reward model (a one-output score head) ranks by its score of prompt + answer;
- a causal LM ranks by its own mean log-probability per answer token (length-normalised, so a short
  wrong answer does not win by being short): the answer it would rather give.

Ties (both answers scored the same) are counted apart, neither won nor lost. The pairs are rendered
and labelled exactly as for DPO and reward-model training (data/preferences.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lmforge.data.instructions import IGNORE, InstructionFormat, ensure_chat_template
from lmforge.data.preferences import load_preferences
from lmforge.engine.runtime import autocast
from lmforge.eval.intervals import bootstrap_interval
from lmforge.objectives.base import sequence_logprobs


@torch.no_grad()
def preference_accuracy(model: nn.Module, head: str, tokenizer, files: list[str], fmt: InstructionFormat,
                        chosen_column: str, rejected_column: str, seq_len: int, batch_size: int,
                        device: torch.device, precision: str, limit: int | None = None,
                        chat_template: str | None = None) -> dict:
    """Accuracy (with a bootstrap 95% interval), ties and the mean margin over every pair of `files`."""
    reward = head == "classifier"
    if not reward and head != "causal_lm":
        return {"skipped": f"a {head} model neither scores answers nor gives them a likelihood"}
    if reward and model.config.num_labels != 1:
        return {"skipped": f"a classifier of {model.config.num_labels} labels is no reward model (one score)"}
    ensure_chat_template(tokenizer, chat_template)
    # whole answers or none: a cut answer's likelihood compares nothing. Pairs are read as long as the
    # model can read them (its context, when longer than the suite's seq_len); longer ones are counted.
    context = max(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)
    sets = load_preferences(files, tokenizer, fmt, chosen_column, rejected_column, context, 0.0, "drop",
                            max_rows=limit, whole_rows=reward)
    pairs = sets.train
    model.eval()
    scores = np.zeros(2 * len(pairs), dtype=np.float64)
    for b in range(math.ceil(len(pairs) / batch_size)):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, len(pairs))))
        batch = {k: v.to(device) for k, v in pairs.batch(indices).items()}
        with autocast(device, precision):
            if reward:  # right padding: the head reads each row's last real token
                row = model(input_ids=batch["input_ids"], use_cache=False).logits.squeeze(-1).float()
            else:
                row = sequence_logprobs(model, batch) / (batch["labels"] != IGNORE).sum(-1).clamp(min=1)
        scores[2 * indices[0]: 2 * indices[-1] + 2] = row.float().cpu().numpy()
    margins = scores[0::2] - scores[1::2]
    won = (margins > 0).astype(float)
    return {"accuracy": float(won.mean()), "accuracy_ci": bootstrap_interval((won,), lambda w: float(np.mean(w))),
            "ties": float(np.mean(margins == 0)), "mean_margin": float(margins.mean()), "pairs": len(margins),
            "dropped": sets.dropped,
            "scored_by": "reward score" if reward else "mean log-probability per answer token"}
