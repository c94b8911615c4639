"""Retrieval accuracy of an embedding model: for each held-out query, where does its positive rank?"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.data.pairs import PairSet
from lmforge.engine.runtime import autocast


@torch.no_grad()
def retrieval_metrics(model: nn.Module, objective, pairs: PairSet, batch_size: int, device: torch.device,
                      precision: str, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """recall@k over all held-out pairs: the positive must rank in the top k of all positives."""
    model.eval()
    queries, positives = [], []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in pairs.batch(list(range(start, min(start + batch_size, len(pairs))))).items()}
        with autocast(device, precision):
            queries.append(objective.embed(model, batch["input_ids"], batch["attention_mask"]))
            positives.append(objective.embed(model, batch["input_ids_b"], batch["attention_mask_b"]))
    similarity = torch.cat(queries) @ torch.cat(positives).T
    rank = (similarity > similarity.diagonal()[:, None]).sum(1)  # 0 = the positive scored highest
    out = {f"recall@{k}": (rank < k).float().mean().item() for k in ks}
    out["chance@1"] = 1.0 / len(pairs)
    out["pairs"] = len(pairs)
    return out
