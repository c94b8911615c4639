"""Strategy: one process, or data parallel (DDP) across processes started by `torchrun`.

Every rank builds the same global batch (same seed, same data position) and keeps its own slice of
rows, so the data order, resuming and the effective batch size do not depend on the world size;
DDP averages the gradients, which equals the single-process gradient of the whole batch. Only
rank 0 writes metrics, checkpoints and the final model. Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Strategy:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous slice of the global batch's rows."""
        if not self.distributed:
            return batch
        rows = len(next(iter(batch.values())))
        if rows % self.world_size:
            raise ValueError(f"trainer.batch_size: {rows} rows do not split evenly over {self.world_size} processes")
        per = rows // self.world_size
        return {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def same_on_all(self, value):
        """Rank 0's value everywhere (for choices that are measured, like `auto` precision)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop_requested(self, local: bool) -> bool:
        """True when any rank got SIGTERM/SIGINT, so that all ranks checkpoint and stop together."""
        if not self.distributed:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def main_first(self, fn):
        """Run `fn` on rank 0 first, then on the others (which then find its outputs up to date)."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_strategy() -> Strategy:
    """Single process, or DDP when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Strategy(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Strategy(rank=rank, world_size=world, device=device)


def say(message: str) -> None:
    """Print once per run: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message)
