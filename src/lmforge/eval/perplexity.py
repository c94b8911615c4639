"""Validation loss and perplexity over packed rows, token-weighted."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.data.packing import PackedRows
from lmforge.data.sentence_pairs import SentencePairs
from lmforge.engine.runtime import autocast


@torch.no_grad()
def evaluate_loss(model: nn.Module, objective, rows: PackedRows | SentencePairs, batch_size: int, max_batches: int | None,
                  device: torch.device, precision: str, seed: int = 1234, parts: list | None = None,
                  desc: str | None = None) -> dict[str, float]:
    """Token-weighted mean loss (and accuracy, where the objective counts it) over the first `max_batches`
    batches of `rows` (in order, so every eval sees the same data). `parts` gets each batch's
    (loss sum, token count): what a bootstrap interval resamples. `desc`: a progress bar with an ETA."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    counts: dict[str, int] = {}
    batches = math.ceil(len(rows) / batch_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    # Objectives that draw masks use the torch RNG: evaluate with fixed draws (comparable across
    # evals) and leave the training RNG exactly where it was (resumed runs stay identical).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for b in tqdm(range(batches), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                      disable=desc is None or batches < 4):
            indices = list(range(b * batch_size, min((b + 1) * batch_size, len(rows))))
            batch = {k: v.to(device) for k, v in rows.batch(indices).items()}
            with autocast(device, precision):
                loss, metrics = objective.loss(model, batch)
            count = int(metrics["tokens"])
            total_loss += float(loss) * count
            total_tokens += count
            if parts is not None:
                parts.append((float(loss) * count, count))
            for key, value in metrics.items():
                if key not in getattr(objective, "train_metrics", ()):  # counts; not the logged training measures
                    counts[key] = counts.get(key, 0) + int(value)
    mean = total_loss / max(total_tokens, 1)
    result = {"loss": mean, "tokens": total_tokens}
    if getattr(objective, "per_token_loss", True):  # a perplexity only where the loss is per token
        result["ppl"] = math.exp(min(mean, 50.0))
    if "correct" in counts:
        result["accuracy"] = counts["correct"] / max(total_tokens, 1)
    if "ties" in counts:  # pairs scored equal: neither won (all of them at step 0 of DPO, policy = reference)
        result["ties"] = counts["ties"] / max(total_tokens, 1)
    if "likely_correct" in counts:  # pairs whose chosen answer the model finds more likely per token (dpo)
        result["likelihood_accuracy"] = counts["likely_correct"] / max(total_tokens, 1)
    if "sentence_correct" in counts:
        result["sentence_accuracy"] = counts["sentence_correct"] / max(counts["sentences"], 1)
    return result


@torch.no_grad()
def pseudo_perplexity(model: nn.Module, rows: PackedRows, mask_id: int, special_ids: torch.Tensor,
                      device: torch.device, max_rows: int = 4) -> dict[str, float]:
    """Pseudo-perplexity of a masked LM (Salazar et al., 2020): mask each token alone, score it.

    Row r of length L becomes a batch of L copies, copy i with position i masked; the score is
    exp of the mean negative log-probability of every original (non-special) token.
    """
    model.eval()
    total, count = 0.0, 0
    for r in range(min(max_rows, len(rows))):
        tokens = rows.batch([r])["input_ids"][0].to(device)
        positions = torch.nonzero(~torch.isin(tokens, special_ids.to(device))).flatten()
        copies = tokens.repeat(len(positions), 1)
        copies[torch.arange(len(positions)), positions] = mask_id
        log_probs = model(input_ids=copies).logits.float().log_softmax(-1)
        total -= log_probs[torch.arange(len(positions)), positions, tokens[positions]].sum().item()
        count += len(positions)
    mean = total / max(count, 1)
    return {"pseudo_loss": mean, "pseudo_ppl": math.exp(min(mean, 50.0)), "pseudo_tokens": count}
