"""Group relative policy optimization (Shao et al., 2024, DeepSeekMath): reinforcement learning from a
reward without a value model.

Each training batch is a set of prompts. The objective rolls out `rollout.num_generations` completions
of every prompt from the current policy (engine/rollout.py), scores them with the recipe's reward
(rewards.py), and turns each completion's reward into an advantage relative to its own group: reward
minus the group's mean, divided by the group's standard deviation (`scale_rewards: group`; `batch`:
the batch's; `none`: not divided, as Dr. GRPO argues). The loss is the clipped importance-ratio
objective of PPO on every completion token plus beta times the k3 estimate of the per-token KL to the
reference, exp(ref - logp) - (ref - logp) - 1 (times the ratio: an unbiased gradient). The clipping
range [1 - epsilon, 1 + epsilon_high] is DAPO's clip-higher when epsilon_high > epsilon.

A rollout serves `rollout.epochs` x `rollout.minibatches` optimizer steps (TRL's num_iterations and
steps_per_generation). With one, the ratio is 1 in value but carries the policy gradient; with more, the
log-probabilities of the policy that sampled are kept from the rollout, the ratio moves, and the share of
tokens whose ratio was clipped is logged (clip_fraction; clip_low / clip_high by side).

The loss variants differ only in how per-token losses are averaged (`objective.grpo_loss`):
grpo = per completion, then over completions (long completions weigh less per token); bnpo = over all
completion tokens of the micro-batch; dapo = over the rollout's completion tokens of every process, per
slice (TRL's num_items_in_batch: the same weight for a token wherever it lands); dr_grpo = over batch
size x rollout.max_new_tokens (a constant: no length bias). All follow TRL's GRPOTrainer and are
compared with it in tests/test_grpo.py.

The reference is the model as training starts: under adapters the same weights with the adapters
switched off (no second copy in memory), under full fine-tuning a frozen copy; with beta 0 there is none.
Completion log-probabilities use the sampling temperature (the distribution the completions came from).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.policy import (
    PolicyObjective,
    completion_logprobs,
    masked_mean_over_ranks,
    summed_over_ranks,
)

__all__ = ["GroupRelativePolicy", "clip_shares", "completion_logprobs", "group_advantages", "policy_loss"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward minus its group's mean, divided by the group's (or the batch's) sd + 1e-4 unless
    `scale` is none; and which rows belong to a group whose rewards are all equal (nothing to learn)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)
    group_sd = grouped.std(1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_sd + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages, torch.isclose(group_sd, torch.zeros_like(group_sd))


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
                max_completion_length: int, tokens_per_slice: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clipped surrogate plus beta x k3 KL per completion token, averaged as `loss_type` says;
    and the per-token KL (None without a reference). `tokens_per_slice`: dapo's normaliser, the
    completion tokens of a slice on average over the whole rollout of every process (unset: this
    slice's own, as bnpo)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = None
    if beta != 0.0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        # times the importance ratio (1 in value, not in gradient): the unbiased reverse-KL gradient of
        # DeepSeek-V3.2, as TRL does by default (use_bias_correction_kl); k3 alone biases it
        per_token = per_token + beta * kl * ratio
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo" or (loss_type == "dapo" and tokens_per_slice is None):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / tokens_per_slice.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"objective.grpo_loss: unknown '{loss_type}'")
    return loss, kl


@torch.no_grad()
def clip_shares(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                epsilon_low: float, epsilon_high: float) -> dict[str, torch.Tensor]:
    """The share of completion tokens (every process's) whose ratio the clip holds back: below 1 - epsilon
    with a negative advantage (clip_low), above 1 + epsilon_high with a positive one (clip_high), either
    (clip_fraction); TRL's clip_ratio/low_mean, high_mean and region_mean."""
    ratio = torch.exp(logps - old_logps)
    low = ((ratio < 1 - epsilon_low) & (advantages[:, None] < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages[:, None] > 0)).float()
    return {"clip_low": masked_mean_over_ranks(low, mask), "clip_high": masked_mean_over_ranks(high, mask),
            "clip_fraction": masked_mean_over_ranks(torch.maximum(low, high), mask)}


class GroupRelativePolicy(PolicyObjective):
    name = "grpo"
    # logged (window means) at every log step beside the loss
    train_metrics = ("reward", "reward_sd", "kl", "entropy", "completion_length", "zero_sd_groups", "clip_fraction",
                     "clip_low", "clip_high")

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.loss_type = (cfg.grpo_loss if cfg is not None else None) or "grpo"
        self.epsilon_low = (cfg.epsilon if cfg is not None else None) or 0.2
        default_high = 0.28 if self.loss_type == "dapo" else self.epsilon_low
        self.epsilon_high = (cfg.epsilon_high if cfg is not None else None) or default_high
        self.scale = (cfg.scale_rewards if cfg is not None else None) or ("none" if self.loss_type == "dr_grpo" else "group")

    @torch.no_grad()
    def collect(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sample the group of every prompt, score it, and keep what the passes over it need."""
        group = self.rollout.cfg.num_generations
        sampled = self.rollout.sample(model, batch)
        advantages, flat = group_advantages(sampled.rewards, group, self.scale)
        input_ids = torch.cat([sampled.prompt_ids, sampled.completion_ids], 1)
        attention_mask = torch.cat([sampled.prompt_mask, sampled.completion_mask], 1)
        completion_len = sampled.completion_ids.shape[1]
        mask = sampled.completion_mask
        rows = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": mask, "advantages": advantages}
        if self.steps_per_rollout > 1:  # later steps see a policy that has moved: keep the sampler's log-probabilities
            rows["old_logps"] = completion_logprobs(model, input_ids, attention_mask, completion_len,
                                                    self.rollout.cfg.temperature)[0]
        if self.beta != 0.0:  # the reference does not move: once per rollout
            rows["ref_logps"] = self.reference_logprobs(model, input_ids, attention_mask, completion_len)
        # dapo weighs every token of the rollout alike: its normaliser counts the tokens of every process
        (tokens,) = summed_over_ranks(mask.sum())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        stats = {**self.reward_stats(sampled.rewards, sampled.parts, mask),
                 "reward_sd": sampled.rewards.view(-1, group).std(1).mean(),
                 "zero_sd_groups": flat.view(-1, group)[:, 0].float().mean(),
                 "tokens_per_slice": tokens / (world * self.buffer.slices)}
        return rows, stats

    def optimise(self, model: nn.Module, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = rows["completion_mask"]
        completion_len = mask.shape[1]
        logps, entropy = completion_logprobs(model, rows["input_ids"], rows["attention_mask"], completion_len,
                                             self.rollout.cfg.temperature, with_entropy=True)
        old_logps = rows.get("old_logps", logps.detach())
        advantages = rows["advantages"]
        loss, kl = policy_loss(logps, old_logps, rows.get("ref_logps"), advantages, mask, self.beta,
                               self.epsilon_low, self.epsilon_high, self.loss_type, self.rollout.cfg.max_new_tokens,
                               self.buffer.stats["tokens_per_slice"] if self.loss_type == "dapo" else None)
        weights = mask.float()
        metrics = {"tokens": torch.tensor(len(mask)),
                   "kl": masked_mean_over_ranks(kl, weights) if kl is not None else torch.zeros(()),
                   "entropy": masked_mean_over_ranks(entropy, weights),
                   **clip_shares(logps, old_logps, advantages, weights, self.epsilon_low, self.epsilon_high)}
        return loss, metrics
