"""T5 span corruption (encoder-decoder): noise spans become sentinels in the input, the target lists them.

Following the T5 paper and its reference preprocessing: of a row of `tokens_length` tokens,
`noise_density` are noise, in spans of mean length `mean_span_length`. The input keeps the other
tokens, each noise span replaced by one sentinel (<extra_id_0>, <extra_id_1>, ...), then EOS; the
target is each sentinel followed by its span, then EOS. `tokens_length` is chosen so that the
input is exactly `packing.seq_len` long, so packed rows fill the encoder with no padding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmforge.config import ObjectiveConfig
from lmforge.objectives.base import ObjectiveBase, token_cross_entropy


def _span_counts(tokens_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    noise = min(max(int(round(tokens_length * noise_density)), 1), tokens_length - 1)
    return noise, max(int(round(noise / mean_span_length)), 1)


def input_and_target_lengths(inputs_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(raw tokens per row, target length) so that the corrupted input is `inputs_length` long."""

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise, spans = _span_counts(tokens_length, noise_density, mean_span_length)
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask with alternating non-noise / noise spans, starting with non-noise (T5)."""
    noise, spans = _span_counts(length, noise_density, mean_span_length)

    def segment(num_items: int, num_segments: int) -> np.ndarray:
        first = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(first)
        return np.bincount(np.cumsum(np.concatenate([[0], first])), minlength=num_segments)

    interleaved = np.stack([segment(length - noise, spans), segment(noise, spans)], axis=1).reshape(-1)
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


def corrupt_row(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    span_start = noise & ~np.concatenate([[False], noise[:-1]])
    span_index = np.cumsum(span_start) - 1
    if span_start.sum() > len(sentinels):
        raise ValueError(f"objective span: {span_start.sum()} noise spans but the tokenizer has only "
                         f"{len(sentinels)} sentinel tokens; train it with tokenizer.num_sentinels >= {span_start.sum()}")
    keep_input = ~noise | span_start
    inputs = np.where(span_start, sentinels[np.clip(span_index, 0, None)], tokens)[keep_input]
    # the target is each span's sentinel followed by the span: noise tokens with a sentinel before each span
    order = np.flatnonzero(noise)
    with_sentinels = np.insert(tokens[order], np.flatnonzero(span_start[order]), sentinels[: int(span_start.sum())])
    targets = np.concatenate([with_sentinels, [eos_id]])
    return np.concatenate([inputs, [eos_id]]), targets


class SpanCorruption(ObjectiveBase):
    name = "span"
    head = "seq2seq"

    def __init__(self, cfg: ObjectiveConfig, tokenizer):
        self.cfg = cfg
        self.eos_id = tokenizer.eos_token_id
        ids, i = [], 0
        while (token_id := tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")) not in (None, tokenizer.unk_token_id):
            ids.append(token_id)
            i += 1
        if not ids:
            raise ValueError("objective span: the tokenizer has no <extra_id_N> sentinels; set tokenizer.num_sentinels")
        self.sentinels = np.array(ids, dtype=np.int64)

    def row_length(self, seq_len: int) -> int:
        return input_and_target_lengths(seq_len, self.cfg.noise_density, self.cfg.mean_span_length)[0]

    def corrupt(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy draws seeded from the torch RNG: checkpoints restore it, so resumed runs corrupt alike
        rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        tokens = rows.cpu().numpy()
        pairs = [corrupt_row(row, random_spans_noise_mask(len(row), self.cfg.noise_density, self.cfg.mean_span_length, rng),
                             self.sentinels, self.eos_id) for row in tokens]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs])).to(rows.device)
        targets = torch.from_numpy(np.stack([p[1] for p in pairs])).to(rows.device)
        return inputs, targets

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = self.corrupt(batch["input_ids"])
        logits = model(input_ids=inputs, labels=targets, use_cache=False).logits
        loss, count = token_cross_entropy(logits, targets)
        return loss, {"tokens": count}
