"""Group relative policy optimization (Shao et al., 2024, DeepSeekMath): reinforcement learning from a
reward without a value model.

Each training batch is a set of prompts. The objective rolls out `rollout.num_generations` completions
of every prompt from the current policy (engine/rollout.py), scores them with the recipe's reward
(rewards.py), and turns each completion's reward into an advantage relative to its own group: reward
minus the group's mean, divided by the group's standard deviation (`scale_rewards: group`; `batch`:
the batch's; `none`: not divided, as Dr. GRPO argues). The loss is the clipped importance-ratio
objective of PPO on every completion token plus beta times the k3 estimate of the per-token KL to the
reference, exp(ref - logp) - (ref - logp) - 1 (times the ratio: an unbiased gradient). One optimisation pass per rollout, so the ratio is 1 in
value but carries the policy gradient; the clipping range [1 - epsilon, 1 + epsilon_high] is DAPO's
clip-higher when epsilon_high > epsilon.

The loss variants differ only in how per-token losses are averaged (`objective.grpo_loss`):
grpo = per completion, then over completions (long completions weigh less per token); bnpo and dapo =
over all completion tokens of the batch; dr_grpo = over batch size x rollout.max_new_tokens (a constant:
no length bias). All follow TRL's GRPOTrainer and are compared with it in tests/test_grpo.py.

The reference is the model as training starts: under adapters the same weights with the adapters
switched off (no second copy in memory), under full fine-tuning a frozen copy; with beta 0 there is none.
Completion log-probabilities use the sampling temperature (the distribution the completions came from).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from lmforge.engine.rollout import Rollout, unwrapped
from lmforge.objectives.base import ObjectiveBase


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


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                        temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each completion token (the last `completion_len` of each row) under `model`,
    in fp32, and the policy's entropy at those positions. Positions count real tokens only, as in
    generation from left-padded prompts."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=completion_len + 1).logits
    logits = logits[:, :-1].float() / temperature  # position t predicts token t + 1
    targets = input_ids[:, -completion_len:]
    normaliser = logits.logsumexp(-1)
    logps = logits.gather(-1, targets[..., None]).squeeze(-1) - normaliser
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = normaliser - (logits.softmax(-1) * logits).sum(-1)
    return logps, entropy


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float, loss_type: str,
                max_completion_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The clipped surrogate plus beta x k3 KL per completion token, averaged as `loss_type` says;
    and the per-token KL (None without a reference)."""
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
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"objective.grpo_loss: unknown '{loss_type}'")
    return loss, kl


class GroupRelativePolicy(ObjectiveBase):
    name = "grpo"
    head = "causal_lm"
    data_kind = "prompts"
    per_token_loss = False
    # logged (window means) at every log step beside the loss
    train_metrics = ("reward", "reward_sd", "kl", "entropy", "completion_length", "zero_sd_groups")

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 0.0
        self.loss_type = (cfg.grpo_loss if cfg is not None else None) or "grpo"
        self.epsilon_low = (cfg.epsilon if cfg is not None else None) or 0.2
        default_high = 0.28 if self.loss_type == "dapo" else self.epsilon_low
        self.epsilon_high = (cfg.epsilon_high if cfg is not None else None) or default_high
        self.scale = (cfg.scale_rewards if cfg is not None else None) or ("none" if self.loss_type == "dr_grpo" else "group")
        self.max_kl = cfg.max_kl if cfg is not None else None
        self.rollout: Rollout | None = None
        self.reference: nn.Module | None = None  # a frozen copy under full fine-tuning

    def reference_for(self, model: nn.Module) -> nn.Module | None:
        """The reference to bind for `model` as training starts: a frozen copy under full fine-tuning;
        None at beta 0 (no KL term) or under adapters (the policy with them switched off is the reference)."""
        if self.beta == 0.0 or hasattr(model, "disable_adapter"):
            return None
        return copy.deepcopy(model).eval().requires_grad_(False)

    def bind(self, rollout: Rollout, reference: nn.Module | None) -> None:
        """The prompts, sampler and reward (the data source builds them), and the reference model
        (None: the policy with its adapters off, or no reference at beta 0)."""
        self.rollout, self.reference = rollout, reference
        names = rollout.reward.names
        self.train_metrics = type(self).train_metrics + (tuple(f"reward_{n}" for n in names) if len(names) > 1 else ())

    def unhealthy(self, record: dict) -> str | None:
        """Why the run must stop, from a log record (window means), or None: the policy has run away
        from the reference, or every completion is empty (EOS at once: nothing left to reward)."""
        if self.max_kl is not None and record.get("kl", 0.0) > self.max_kl:
            return (f"the mean KL to the reference {record['kl']:.3g} exceeds objective.max_kl {self.max_kl:g} (raise "
                    "objective.beta or lower trainer.lr)")
        if record.get("completion_length", 2.0) <= 1.0:
            return "the completions collapsed to empty (EOS at once); lower trainer.lr or check the reward"
        return None

    @torch.no_grad()
    def _reference_logprobs(self, model: nn.Module, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
        temperature = self.rollout.cfg.temperature
        if self.reference is not None:
            if next(self.reference.parameters()).device != input_ids.device:
                self.reference.to(input_ids.device)
            return completion_logprobs(self.reference, input_ids, attention_mask, completion_len, temperature)[0]
        policy = unwrapped(model)
        off = policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext()
        with off:
            return completion_logprobs(policy, input_ids, attention_mask, completion_len, temperature)[0]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.rollout is None:
            raise ValueError("grpo: no rollout bound (the prompt data source binds it)")
        group = self.rollout.cfg.num_generations
        sampled = self.rollout.sample(model, batch)
        advantages, flat = group_advantages(sampled.rewards, group, self.scale)
        input_ids = torch.cat([sampled.prompt_ids, sampled.completion_ids], 1)
        attention_mask = torch.cat([sampled.prompt_mask, sampled.completion_mask], 1)
        completion_len = sampled.completion_ids.shape[1]
        logps, entropy = completion_logprobs(model, input_ids, attention_mask, completion_len,
                                             self.rollout.cfg.temperature, with_entropy=True)
        ref_logps = (self._reference_logprobs(model, input_ids, attention_mask, completion_len)
                     if self.beta != 0.0 else None)
        mask = sampled.completion_mask
        loss, kl = policy_loss(logps, logps.detach(), ref_logps, advantages, mask, self.beta, self.epsilon_low,
                               self.epsilon_high, self.loss_type, self.rollout.cfg.max_new_tokens)
        tokens = mask.sum().clamp(min=1)
        metrics = {"tokens": torch.tensor(len(sampled.rewards)),
                   "reward": sampled.rewards.mean(), "reward_sd": sampled.rewards.view(-1, group).std(1).mean(),
                   "kl": (kl.detach() * mask).sum() / tokens if kl is not None else torch.zeros(()),
                   "entropy": (entropy * mask).sum() / tokens, "completion_length": mask.sum(1).float().mean(),
                   "zero_sd_groups": flat.view(-1, group)[:, 0].float().mean()}
        metrics.update({f"reward_{k}": v.nanmean() for k, v in sampled.parts.items()} if len(sampled.parts) > 1 else {})
        return loss, metrics
