"""Rollouts for RL objectives: sample completions from the current policy and score them.

`Rollout.sample` takes a training batch (left-padded prompts and their indices), draws
`rollout.num_generations` completions per prompt with the one sampler (eval/generate.sample_batch, KV
cached) and returns them with the reward of each and of each reward part. The sampling seed comes from
the batch (its number in the run and the rank's rows), so a resumed run draws the same completions.
`Rollout.evaluate` is the held-out measure: one greedy completion per held-out prompt, its mean reward.

A rollout is costly and its samples serve several optimizer steps (PPO's epochs and minibatches, GRPO's
num_iterations): `RolloutBuffer` holds one rollout and hands it out a slice per loss call, so the loop
stays the one loop: the prompt source sends each prompt batch `parts` times, numbered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import RolloutConfig
from lmforge.data.prompts import PromptSet
from lmforge.engine.runtime import autocast
from lmforge.generation.hf import sample_batch
from lmforge.rewards import Reward


def unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile wrappers: what `generate` and the adapters live on."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # (B * G, P) left-padded, each prompt repeated G times
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B * G, C)
    completion_mask: torch.Tensor  # 1 up to and including EOS
    rewards: torch.Tensor  # (B * G,) the weighted total
    parts: dict[str, torch.Tensor]  # each reward part, (B * G,)
    completions: list[str]


class RolloutBuffer:
    """One rollout's samples, used for `epochs` passes, each a fresh seeded shuffle cut into `slices`
    equal parts (rollout.minibatches x trainer.grad_accum), one part per loss call. Its state goes into
    checkpoints, so a run resumed in the middle of a rollout goes on with the same samples."""

    def __init__(self, epochs: int = 1, slices: int = 1):
        self.epochs, self.slices = epochs, slices
        self.seed: int | None = None
        self.rows: dict[str, torch.Tensor] = {}  # one entry per sample
        self.stats: dict[str, torch.Tensor] = {}  # the rollout's own measures (mean reward, ...), logged with every part

    @property
    def parts(self) -> int:
        return self.epochs * self.slices

    def fill(self, seed: int, rows: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        count = len(next(iter(rows.values())))
        if count % self.slices:
            raise ValueError(f"rollout.minibatches x trainer.grad_accum = {self.slices} slices do not divide the "
                             f"{count} completions of a rollout (per process: trainer.batch_size / processes x "
                             "rollout.num_generations)")
        self.seed, self.rows, self.stats = seed, rows, {k: v.detach() for k, v in stats.items()}

    def part(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The samples of loss call `index` (0 .. parts - 1) of this rollout, on `device` (a buffer restored
        from a checkpoint comes back on the CPU)."""
        epoch, within = divmod(index, self.slices)
        count = len(next(iter(self.rows.values())))
        order = torch.arange(count)
        if self.slices > 1:  # a pass in one piece needs no shuffle (its loss is a mean over all of it)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        size = count // self.slices
        chosen = order[within * size : (within + 1) * size]
        return {k: v[chosen.to(v.device)].to(device) for k, v in self.rows.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.seed is None:
            return {}
        return {"buffer.seed": torch.tensor(self.seed), **{f"buffer.rows.{k}": v.cpu() for k, v in self.rows.items()},
                **{f"buffer.stats.{k}": v.cpu() for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "buffer.seed" not in state:
            return
        self.seed = int(state["buffer.seed"])
        self.rows = {k[len("buffer.rows."):]: v for k, v in state.items() if k.startswith("buffer.rows.")}
        self.stats = {k[len("buffer.stats."):]: v for k, v in state.items() if k.startswith("buffer.stats.")}


class Rollout:
    def __init__(self, cfg: RolloutConfig, tokenizer, reward: Reward, train: PromptSet, val: PromptSet,
                 grad_accum: int = 1):
        self.cfg, self.tokenizer, self.reward, self.train, self.val = cfg, tokenizer, reward, train, val
        self.grad_accum = grad_accum

    def buffer(self, default_epochs: int = 1) -> RolloutBuffer:
        """An empty buffer for this rollout's schedule: rollout.epochs passes (unset: the objective's
        default) of minibatches x grad_accum slices."""
        return RolloutBuffer(self.cfg.epochs or default_epochs, self.cfg.minibatches * self.grad_accum)

    def _score(self, prompts: PromptSet, indices: list[int], completion_ids: torch.Tensor,
               mask: torch.Tensor, repeats: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        texts = [self.tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
                 for ids, m in zip(completion_ids.tolist(), mask, strict=True)]
        rows = [prompts.prompts[i] for i in indices for _ in range(repeats)]
        total, parts = self.reward.score([p.text for p in rows], texts, [p.row for p in rows], [p.messages for p in rows])
        return total, parts, texts

    def sample(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> RolloutBatch:
        policy = unwrapped(model)
        was_training = policy.training
        indices = batch["prompt_index"].tolist()
        seed = int(batch["rollout_seed"][0]) if "rollout_seed" in batch else 0
        cfg = self.cfg
        completion_ids, mask = sample_batch(policy, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                            cfg.num_generations, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                            cfg.top_p, seed)
        policy.train(was_training)
        rewards, parts, texts = self._score(self.train, indices, completion_ids, mask, cfg.num_generations)
        device = completion_ids.device
        return RolloutBatch(batch["input_ids"].repeat_interleave(cfg.num_generations, 0),
                            batch["attention_mask"].repeat_interleave(cfg.num_generations, 0),
                            completion_ids, mask, rewards.to(device), {k: v.to(device) for k, v in parts.items()}, texts)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device, precision: str) -> dict:
        """Mean reward (and each part, and completion length) of one greedy completion per held-out prompt."""
        policy = unwrapped(model)
        was_training = policy.training
        totals, lengths, parts_sum = [], [], {}
        for b in range(math.ceil(len(self.val) / batch_size)):
            indices = list(range(b * batch_size, min((b + 1) * batch_size, len(self.val))))
            batch = self.val.batch(indices)
            with autocast(device, precision):
                ids, mask = sample_batch(policy, self.tokenizer, batch["input_ids"].to(device),
                                         batch["attention_mask"].to(device), 1, self.cfg.max_new_tokens, temperature=0.0)
            total, parts, _ = self._score(self.val, indices, ids.cpu(), mask.cpu(), 1)
            totals.append(total)
            lengths.append(mask.sum(1).float().cpu())
            for k, v in parts.items():
                parts_sum.setdefault(k, []).append(v)
        policy.train(was_training)
        out = {"reward": float(torch.cat(totals).mean()), "completion_length": float(torch.cat(lengths).mean())}
        if len(parts_sum) > 1:
            out.update({f"reward_{k}": float(torch.cat(v).nanmean()) for k, v in parts_sum.items()})
        return out
