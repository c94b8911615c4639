"""Proximal policy optimization with a value head (Schulman et al., 2017; for language models Ziegler
et al., 2019 and Ouyang et al., 2022): the third step of RLHF, after SFT and a reward model.

Each rollout (engine/rollout.py) samples completions of `trainer.batch_size` prompts from the current
policy and scores each with the recipe's reward (rewards.py: a reward-model folder, a function, or a
verifiable check). Then, without gradients:
- every completion token gets the reward -beta x KL(policy || reference) at that token (k1: the
  log-ratio; k3: exp(-r) - 1 + r, never negative), and the last token (EOS, or the last one sampled)
  also gets the score (minus objective.missing_eos_penalty when it never reached EOS);
- a value head, a linear layer on the policy's last hidden state (the one the output layer reads),
  values the state before each token; generalised advantage estimation (gamma, gae_lambda) turns
  rewards and values into advantages and returns; advantages are whitened over the rollout's tokens.
Then `rollout.epochs` passes (default 4), each cut into `rollout.minibatches` optimizer steps, minimise
the clipped policy loss (ratio clipped to 1 +- epsilon) plus vf_coef x the clipped value loss (values
clipped to +- value_clip around the rollout's).

TRL's PPOTrainer (trl.experimental.ppo, last shipped in TRL 1.12) computes the same; tests/test_ppo.py
runs both on the same completions. One difference, on purpose: TRL adds the score one position after
EOS (on the first padding token, TRL issue #3750), lmforge on the EOS token itself, where the policy's
last action is; the two agree on completions that run to max_new_tokens.

The value head trains beside the model (an objective parameter, in checkpoints with the rollout in use)
and is saved as value_head.safetensors in the final folder, which plain transformers (or peft) loads as
the policy alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.engine.distributed import mean_over_ranks
from lmforge.objectives.policy import PolicyObjective, completion_logprobs, masked_mean_over_ranks

VALUE_HEAD_FILE = "value_head.safetensors"


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                  beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion token's reward: -beta x its KL estimate, plus the score on the last real token;
    and the per-token KL (0 without a reference, and after the end)."""
    if ref_logps is None:
        kl = torch.zeros_like(logps)
    else:
        log_ratio = ref_logps - logps
        kl = -log_ratio if estimator == "k1" else log_ratio.exp() - 1 - log_ratio
    kl = kl * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, kl


def generalised_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al., 2016) over each completion, the state after its last token terminal:
    advantages and returns (advantages + values). Rewards and values after the end count 0."""
    values = values * mask
    advantage = torch.zeros_like(rewards[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * advantage
        advantages.append(advantage)
    advantages = torch.stack(advantages[::-1], 1)
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the masked positions (unbiased variance, as TRL), 0 elsewhere."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) ** 2) * mask).sum() / count * (count / (count - 1).clamp(min=1.0))
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def clipped_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
                   old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, epsilon: float,
                   value_clip: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss and half the clipped squared value error, each a mean over the
    completion tokens; and the share of tokens each clip bound."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    count = mask.sum().clamp(min=1.0)
    policy = (torch.max(unclipped, clipped) * mask).sum() / count
    values_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    error, error_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    value = 0.5 * (torch.max(error, error_clipped) * mask).sum() / count
    with torch.no_grad():
        shares = {"clip_fraction": (clipped > unclipped).float(), "value_clip_fraction": (error_clipped > error).float()}
    return policy, value, shares


class ProximalPolicy(PolicyObjective):
    name = "ppo"
    default_epochs = 4
    # logged (window means) at every log step beside the loss
    train_metrics = ("reward", "kl", "rlhf_reward", "entropy", "completion_length", "policy_loss", "value_loss",
                     "clip_fraction", "value_clip_fraction", "approx_kl", "explained_variance")

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.epsilon = (cfg.epsilon if cfg is not None else None) or 0.2
        self.value_clip = cfg.value_clip if cfg is not None else 0.2
        self.vf_coef = cfg.vf_coef if cfg is not None else 0.1
        self.gamma = cfg.gamma if cfg is not None else 1.0
        self.lam = cfg.gae_lambda if cfg is not None else 0.95
        self.estimator = cfg.kl_estimator if cfg is not None else "k1"
        self.missing_eos_penalty = cfg.missing_eos_penalty if cfg is not None else None
        self.value_head: nn.Linear | None = None

    def bind(self, rollout, reference, model=None, device=None) -> None:
        """Also builds the value head for `model`'s hidden size: zero-initialised, so every value
        starts at 0 and the first advantages are the returns themselves."""
        super().bind(rollout, reference, model, device)
        if model is not None:
            self.value_head = nn.Linear(model.config.hidden_size, 1, device=device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            for p in self.value_head.parameters():
                p.register_hook(mean_over_ranks)  # outside the model: DDP would not average it

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters()) if self.value_head is not None else []

    @torch.no_grad()
    def collect(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sample, score, and turn the scores into per-token advantages and returns."""
        sampled = self.rollout.sample(model, batch)
        input_ids = torch.cat([sampled.prompt_ids, sampled.completion_ids], 1)
        attention_mask = torch.cat([sampled.prompt_mask, sampled.completion_mask], 1)
        completion_len = sampled.completion_ids.shape[1]
        mask = sampled.completion_mask.float()
        old_logps, _, values = completion_logprobs(model, input_ids, attention_mask, completion_len,
                                                   self.rollout.cfg.temperature, value_head=self.value_head)
        ref_logps = self.reference_logprobs(model, input_ids, attention_mask, completion_len) if self.beta else None
        scores = sampled.rewards.float()
        if self.missing_eos_penalty is not None:
            ended = ((sampled.completion_ids == self.rollout.tokenizer.eos_token_id) & (mask > 0)).any(1)
            scores = scores - self.missing_eos_penalty * (~ended).float()
        rewards, kl = token_rewards(scores, old_logps, ref_logps, mask, self.beta, self.estimator)
        advantages, returns = generalised_advantages(rewards, values, mask, self.gamma, self.lam)
        rows = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": mask,
                "old_logps": old_logps, "values": values * mask, "returns": returns, "advantages": whiten(advantages, mask)}
        ones = torch.ones_like(scores)
        stats = {**self.reward_stats(sampled.rewards, sampled.parts, mask),
                 "kl": masked_mean_over_ranks(kl, mask),
                 "rlhf_reward": masked_mean_over_ranks(scores - self.beta * kl.sum(1), ones),
                 "explained_variance": self._explained_variance(values, returns, mask)}
        return rows, stats

    @staticmethod
    def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """1 - Var(returns - values) / Var(returns) over the rollout's tokens: how much of the return the
        value head predicts (0: nothing, 1: all; it starts at 0 with the head)."""
        count = mask.sum().clamp(min=1.0)

        def variance(x):
            mean = (x * mask).sum() / count
            return (((x - mean) ** 2) * mask).sum() / count
        return 1 - variance(returns - values) / variance(returns).clamp(min=1e-8)

    def optimise(self, model: nn.Module, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = rows["completion_mask"]
        if self.value_head.weight.device != rows["input_ids"].device:
            self.value_head.to(rows["input_ids"].device)  # in place: the optimizer keeps the same parameters
        logps, entropy, values = completion_logprobs(model, rows["input_ids"], rows["attention_mask"], mask.shape[1],
                                                     self.rollout.cfg.temperature, with_entropy=True,
                                                     value_head=self.value_head)
        policy, value, shares = clipped_losses(logps, rows["old_logps"], rows["advantages"], values, rows["values"],
                                               rows["returns"], mask, self.epsilon, self.value_clip)
        log_ratio = (logps.detach() - rows["old_logps"]) * mask
        metrics = {"tokens": torch.tensor(len(mask)), "policy_loss": policy.detach(), "value_loss": value.detach(),
                   "entropy": masked_mean_over_ranks(entropy, mask),
                   "approx_kl": masked_mean_over_ranks(0.5 * log_ratio**2, mask),
                   **{k: masked_mean_over_ranks(v, mask) for k, v in shares.items()}}
        return policy + self.vf_coef * value, metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The value head and the rollout in use."""
        head = {f"value_head.{k}": v.detach().cpu() for k, v in self.value_head.state_dict().items()} if self.value_head else {}
        return {**super().state_dict(), **head}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.value_head is not None and "value_head.weight" in state:
            with torch.no_grad():  # in place: the optimizer holds these very parameters
                self.value_head.weight.copy_(state["value_head.weight"])
                self.value_head.bias.copy_(state["value_head.bias"])

    def save_alongside(self, directory: Path, model: nn.Module, seq_len: int) -> None:
        """The value head beside the policy: value_head.safetensors (weight (1, hidden), bias (1,)), a
        linear layer on the last hidden state; transformers and peft load the folder as the policy alone."""
        if self.value_head is None:
            return
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(tensors, str(Path(directory) / VALUE_HEAD_FILE),
                  metadata={"lmforge": "ppo value head: Linear(hidden_size, 1) on the last hidden state"})
