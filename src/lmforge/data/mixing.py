"""Deterministic sampling from several packed corpora by weight (e.g. domain 0.8, general 0.2 replay).

Batch b is drawn from an RNG seeded by (seed, b): which source each row comes from, and which row
of that source. Resuming therefore needs only the batch number, and two runs see the same mix.
Each batch carries a `source` tensor so the loop can log the mix actually seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data.packing import PackedRows


def iterate_mixture(sources: list[PackedRows], weights: list[float], batch_size: int, seed: int,
                    start_batch: int = 0) -> Iterator[dict]:
    if len(sources) != len(weights) or not sources:
        raise ValueError("data.mixture: one weight per source is needed")
    probs = np.asarray(weights, dtype=np.float64) / sum(weights)
    batch_number = start_batch
    while True:
        rng = np.random.default_rng([seed, batch_number])
        picks = rng.choice(len(sources), size=batch_size, p=probs)
        parts = []
        for s in np.unique(picks):
            rows = rng.integers(0, len(sources[s]), size=int((picks == s).sum()))
            part = sources[s].batch(rows.tolist())
            part["source"] = torch.full((len(rows),), int(s), dtype=torch.long)
            parts.append(part)
        yield {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        batch_number += 1
