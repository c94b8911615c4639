"""Strategy: one process, or data parallel across processes started by `torchrun`: DDP, or FSDP2.

Every rank builds the same global batch (same seed, same data position) and keeps its own slice of
rows, so the data order, resuming and the effective batch size do not depend on the world size;
the gradients are averaged over ranks, which equals the single-process gradient of the whole
batch. DDP keeps the whole model, its gradients and optimizer states on every rank; FSDP
(`trainer.strategy: fsdp`, PyTorch's `fully_shard`) keeps a 1/world slice of each, gathering one
block's parameters while it runs. Checkpoints hold the whole model either way (gathered to rank 0),
so they are `from_pretrained` folders like any other. Only rank 0 writes metrics, checkpoints and
the final model. Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from lmforge.engine.runtime import repeated_blocks


class SharedFolderError(ValueError):
    """The ranks of a run do not see one output folder (several nodes without a shared file system)."""


@dataclass
class Strategy:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    kind: str = "ddp"  # ddp | fsdp, when distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.distributed and self.kind == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_model(self, model: nn.Module, param_groups: list[dict]) -> list[dict]:
        """FSDP: shard each transformer block, then the rest (embeddings, output layer: tied weights
        stay in one unit), in place; the parameters become DTensors, so the optimizer's groups are
        pointed at them by name. Before the optimizer is built. Otherwise nothing changes."""
        if not self.sharded:
            return param_groups
        from torch.distributed.fsdp import fully_shard

        if self.device.type == "cpu":
            _unmap_big_frees()
        names = {id(p): n for n, p in model.named_parameters()}
        for block in repeated_blocks(model):
            fully_shard(block)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        # parameters outside the model (an objective's learned temperature) stay as they are
        return [{**g, "params": [sharded[names[id(p)]] if id(p) in names else p for p in g["params"]]} for g in param_groups]

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed or self.sharded:  # FSDP's hooks are in the model already
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """FSDP: the whole model's and optimizer's state, gathered on rank 0 (in CPU memory; the other
        ranks get empty dicts). A collective: every rank calls it. None when not sharded."""
        if not self.sharded:
            return None
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_weights(self, model: nn.Module) -> dict | None:
        """FSDP: the whole model's weights on rank 0 (for `save_pretrained`); None when not sharded."""
        if not self.sharded:
            return None
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict) -> None:
        """FSDP: every rank takes its shards of a whole (checkpointed) state; `weights` may hold only
        the trained parameters (LoRA), the frozen ones then stay as loaded from the base model."""
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))

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

    def clip_gradients(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm; that norm as a plain tensor (sharded, it is a DTensor)."""
        norm = nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def same_on_all(self, value):
        """Rank 0's value everywhere (for choices that are measured, like `auto` precision)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's `value` (a picklable object), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

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

    def ensure_shared_folder(self, folder: Path) -> None:
        """Rank 0 alone writes the data, checkpoints and models that every rank then reads, so every rank
        must see the same `folder`: on several nodes, a file system they all mount. Checked once, before
        anything is written into it: rank 0 leaves a file of a random name, every rank looks for it, all
        fail together (no rank left waiting) naming the ranks and hosts that did not find it."""
        if not self.distributed:
            return
        folder = Path(folder)
        marker = folder / f".lmforge-shared-{self.same_on_all(secrets.token_hex(8))}"
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            marker.touch()
        self.barrier()
        seen = [None] * self.world_size
        dist.all_gather_object(seen, (self.rank, socket.gethostname(), marker.is_file()))
        self.barrier()
        if self.is_main:
            marker.unlink()
        blind = [f"rank {rank} on {host}" for rank, host, found in seen if not found]
        if blind:
            raise SharedFolderError(
                f"output_dir: {folder} is not the same folder on every rank ({', '.join(blind)} cannot see what rank 0 "
                f"writes there). Rank 0 alone writes the prepared data, checkpoints and models the others read: "
                f"on several nodes, put output_dir on a file system every node mounts (docs/distributed.md)")


def _unmap_big_frees() -> None:
    """glibc's malloc: blocks of 4 MB and more mapped on their own and given back when freed. By
    default glibc raises this threshold to the size of every block freed, so FSDP's per-block gather
    buffers (tens of MB, allocated and freed each block, each step) stay in the heap: measured on
    a 91M Llama, 2 CPU processes, peak RSS per rank 2,911 MB with glibc's default, 1,948 MB with this,
    against DDP's 2,662 MB."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator's rules
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD


def init_strategy(kind: str = "ddp") -> Strategy:
    """Single process, or `kind` (ddp | fsdp) when launched by torchrun (WORLD_SIZE > 1)."""
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
    return Strategy(rank=rank, world_size=world, device=device, kind=kind)


def mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook for parameters that live outside the model (an objective's learned temperature, PPO's
    value head): DDP averages only the model's gradients, so these are averaged over the ranks here."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return grad
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def say(message: str) -> None:
    """Print once per run: under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message)
