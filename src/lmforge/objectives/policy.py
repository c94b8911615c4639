"""What the RL objectives (grpo, ppo) share: the policy's log-probabilities of its own completions,
the reference model, the rollout buffer and the run's health.

An RL objective's `loss(model, batch)` is called with a prompt batch numbered `rollout_part`. Part 0
rolls out (samples, scores, and computes what stays fixed while the rollout is used: old and reference
log-probabilities, advantages) into the buffer; every part then optimises on its slice of it. The
objective says how to `collect` a rollout and how to `optimise` a slice; this class does the rest.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from lmforge.engine.rollout import Rollout, RolloutBuffer, unwrapped
from lmforge.objectives.base import ObjectiveBase


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                        temperature: float = 1.0, with_entropy: bool = False, value_head: nn.Module | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probability of each completion token (the last `completion_len` of each row) under `model`,
    in fp32, and the policy's entropy at those positions. Positions count real tokens only, as in
    generation from left-padded prompts. With `value_head`, also its value of the state before each
    completion token (from the last hidden state, the one the output layer reads), from the same pass."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=completion_len + 1, output_hidden_states=value_head is not None)
    logits = out.logits[:, :-1].float() / temperature  # position t predicts token t + 1
    targets = input_ids[:, -completion_len:]
    normaliser = logits.logsumexp(-1)
    logps = logits.gather(-1, targets[..., None]).squeeze(-1) - normaliser
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = normaliser - (logits.softmax(-1) * logits).sum(-1)
    if value_head is None:
        return logps, entropy
    hidden = out.hidden_states[-1][:, -completion_len - 1 : -1]
    values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps, entropy, values


def summed_over_ranks(*values: torch.Tensor) -> list[torch.Tensor]:
    """Each value summed over the processes of a distributed run (itself in one process): the totals
    that global means and normalisers are made of."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
    return list(stacked.unbind())


def masked_mean_over_ranks(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `mask` is 1, over every process's tokens (what TRL logs)."""
    total, count = summed_over_ranks((values.detach() * mask).sum(), mask.sum())
    return total / count.clamp(min=1.0)


class PolicyObjective(ObjectiveBase):
    """The shared half of an RL objective. Subclasses set `name` and `train_metrics`, and define
    `collect(model, batch) -> (rows, stats)` and `optimise(model, rows) -> (loss, metrics)`."""

    head = "causal_lm"
    data_kind = "prompts"
    long_inputs = "dropped when they leave no room for rollout.max_new_tokens"
    per_token_loss = False
    train_metrics: tuple[str, ...] = ()
    default_epochs = 1  # passes over each rollout when rollout.epochs is unset

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.beta = cfg.beta if cfg is not None else 0.0
        self.max_kl = cfg.max_kl if cfg is not None else None
        self.max_flat_steps = cfg.max_flat_steps if cfg is not None else None
        self._flat_from: int | None = None  # the step since which every group's rewards were equal
        self._last_logged = 0
        self.rollout: Rollout | None = None
        self.reference: nn.Module | None = None  # a frozen copy under full fine-tuning
        self.buffer = RolloutBuffer()

    def reference_for(self, model: nn.Module) -> nn.Module | None:
        """The reference to bind for `model` as training starts: a frozen copy under full fine-tuning;
        None at beta 0 (no KL term) or under adapters (the policy with them switched off is the reference)."""
        if self.beta == 0.0 or hasattr(model, "disable_adapter"):
            return None
        return copy.deepcopy(model).eval().requires_grad_(False)

    def bind(self, rollout: Rollout, reference: nn.Module | None, model: nn.Module | None = None,
             device: torch.device | None = None) -> None:
        """The prompts, sampler and reward (the data source builds them), and the reference model
        (None: the policy with its adapters off, or no reference at beta 0); `model` and the `device` it
        will train on, for what the objective adds to it (ppo's value head)."""
        self.rollout, self.reference = rollout, reference
        self.buffer = rollout.buffer(self.default_epochs)
        names = rollout.reward.names
        self.train_metrics = type(self).train_metrics + (tuple(f"reward_{n}" for n in names) if len(names) > 1 else ())

    def health_rules(self) -> str:
        """The verdicts `unhealthy` applies, as the log states them when training starts."""
        rules = [f"the mean KL to the reference exceeds {self.max_kl:g} (objective.max_kl)" if self.max_kl
                 else "no KL bound (objective.max_kl: null)"]
        if "zero_sd_groups" in self.train_metrics:
            rules.append(f"every group's rewards are equal for {self.max_flat_steps} steps in a row "
                         "(objective.max_flat_steps)" if self.max_flat_steps else
                         "never for equal rewards (objective.max_flat_steps: null)")
        return "run health: the run stops when " + "; or ".join(rules) + "; or the completions are all empty"

    def unhealthy(self, record: dict, step: int | None = None) -> str | None:
        """Why the run must stop, from a log record (window means) at `step`, or None: the policy has run
        away from the reference, every completion is empty (EOS at once: nothing left to reward), or for
        max_flat_steps every group's completions got one reward (no advantage: nothing to learn)."""
        if self.max_kl is not None and record.get("kl", 0.0) > self.max_kl:
            return (f"the mean KL to the reference {record['kl']:.3g} exceeds objective.max_kl {self.max_kl:g} (raise "
                    "objective.beta or lower trainer.lr)")
        if record.get("completion_length", 2.0) <= 1.0:
            return "the completions collapsed to empty (EOS at once); lower trainer.lr or check the reward"
        if step is not None and "zero_sd_groups" in record:
            flat = record["zero_sd_groups"] >= 1.0
            if flat and self._flat_from is None:
                self._flat_from = self._last_logged
            elif not flat:
                self._flat_from = None
            self._last_logged = step
            if flat and self.max_flat_steps is not None and step - self._flat_from >= self.max_flat_steps:
                return (f"for {step - self._flat_from} steps every group's completions got the same reward, so no "
                        "completion was better than another and nothing was learned (objective.max_flat_steps "
                        f"{self.max_flat_steps}); make the reward tell answers apart, raise rollout.temperature or "
                        "rollout.num_generations")
        return None

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps each rollout serves: more than one, and the policy moves away from the one that sampled."""
        return self.buffer.epochs * self.rollout.cfg.minibatches if self.rollout is not None else 1

    @torch.no_grad()
    def reference_logprobs(self, model: nn.Module, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
        temperature = self.rollout.cfg.temperature
        if self.reference is not None:
            if next(self.reference.parameters()).device != input_ids.device:
                self.reference.to(input_ids.device)
            return completion_logprobs(self.reference, input_ids, attention_mask, completion_len, temperature)[0]
        policy = unwrapped(model)
        off = policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext()
        with off:
            return completion_logprobs(policy, input_ids, attention_mask, completion_len, temperature)[0]

    def reward_stats(self, rewards: torch.Tensor, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rollout's mean reward (and of each part) and completion length, over every process's samples."""
        count = torch.ones_like(rewards)
        stats = {"reward": masked_mean_over_ranks(rewards, count),
                 "completion_length": masked_mean_over_ranks(mask.sum(1).float(), count)}
        if len(parts) > 1:
            for name, values in parts.items():
                known = ~values.isnan()
                stats[f"reward_{name}"] = masked_mean_over_ranks(values.nan_to_num(0.0), known.float())
        return stats

    def collect(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def optimise(self, model: nn.Module, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.rollout is None:
            raise ValueError(f"{self.name}: no rollout bound (the prompt data source binds it)")
        part = int(batch["rollout_part"][0]) if "rollout_part" in batch else 0
        seed = int(batch["rollout_seed"][0]) if "rollout_seed" in batch else 0
        if part == 0:
            self.buffer.fill(seed, *self.collect(model, batch))
        elif self.buffer.seed != seed:
            raise RuntimeError(f"{self.name}: part {part} of the rollout with seed {seed}, but the buffer holds the "
                               f"rollout with seed {self.buffer.seed} (a checkpoint without its rollout?)")
        device = batch["input_ids"].device
        loss, metrics = self.optimise(model, self.buffer.part(part, device))
        metrics.update({k: v.to(device) for k, v in self.buffer.stats.items()})
        return loss, metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout in use (a checkpoint in the middle of one resumes on the same samples)."""
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state)
