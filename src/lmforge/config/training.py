"""How it trains: the trainer (length, optimizer, schedule, precision, evaluation, saving), early
stopping, QAT, regularization against forgetting, sampling afterwards, and RL's rollouts and rewards.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.rules import OUTSIDE, RESUMABLE, WEIGHTS, Section, counts


class EarlyStoppingConfig(Section, json_schema_extra=counts(WEIGHTS)):
    # a held-out metric the objective's evaluation reports, without the val_ prefix (loss, accuracy, ppl,
    # likelihood_accuracy, ...); min for losses, max for accuracies
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, gt=0)  # evaluations without an improvement before training stops
    min_delta: float = Field(0.0, ge=0.0)  # what counts as an improvement


# Evaluation runs on a forked RNG and changes no weight, unless early stopping picks the final step by it.
_EVALUATION = counts(OUTSIDE, decides_weights_with="trainer.early_stopping")


class TrainerConfig(Section, json_schema_extra=counts(WEIGHTS)):
    # Training length: exactly one of max_steps, max_tokens, epochs.
    max_steps: int | None = Field(None, gt=0, json_schema_extra=counts(RESUMABLE))
    max_tokens: int | None = Field(None, gt=0, json_schema_extra=counts(RESUMABLE))
    epochs: float | None = Field(None, gt=0, json_schema_extra=counts(RESUMABLE))
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)  # over half the run's steps is warned of (see warmup_fraction)
    # warm-up as a share of the run's steps, so it follows the run's length (200 labels, 24 steps: 2 of
    # warm-up at 0.1, where a fixed 20 left 4 steps to learn); give this or warmup_steps
    warmup_fraction: float | None = Field(None, ge=0.0, le=0.5)
    schedule: Literal["cosine", "linear", "constant", "cosine_with_restarts"] = "cosine"
    num_cycles: int = Field(1, gt=0)
    clip_grad: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # off | blocks (each transformer block compiled in place; pays on Llama-style blocks and on GPUs) | model
    compile: Literal["off", "blocks", "model"] = "off"
    # Recompute each block's activations in the backward pass instead of keeping them: less memory
    # for one more forward pass per step.
    activation_checkpointing: bool = False
    optimizer_impl: Literal["auto", "fused", "foreach"] = "auto"
    # Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters, gradients and
    # optimizer states sharded across ranks, each block gathered only while it runs). One process: neither.
    # (checkpoints are keyed by parameter name and resume under either: a change is accepted on --resume)
    strategy: Literal["ddp", "fsdp"] = Field("ddp", json_schema_extra=counts(RESUMABLE))
    # steps between evaluations, or `epoch`: after every pass over the training data (records carry `epoch`)
    eval_every: Annotated[int, Field(gt=0)] | Literal["epoch"] = Field(200, json_schema_extra=_EVALUATION)
    eval_at_start: bool = Field(False, json_schema_extra=_EVALUATION)  # evaluate before the first step: the "before" of continual pretraining
    # batches drawn from a large split (packed corpora, sentence pairs); example-level held-out sets
    # (classify, sft, dpo, reward, contrastive pairs) are evaluated whole
    eval_batches: int = Field(20, gt=0, json_schema_extra=_EVALUATION)
    log_every: int = Field(10, gt=0, json_schema_extra=counts(OUTSIDE))
    save_every: int | None = Field(None, gt=0, json_schema_extra=counts(OUTSIDE))
    keep_last: int = Field(2, gt=0, json_schema_extra=counts(OUTSIDE))
    max_bad_steps: int = Field(5, gt=0)
    num_threads: int | None = Field(None, gt=0)
    deterministic: bool = False
    progress: bool = Field(True, json_schema_extra=counts(OUTSIDE))
    # stop when a held-out metric stops improving; the best evaluation's weights become final/ (its
    # checkpoint is never rotated out by keep_last)
    early_stopping: EarlyStoppingConfig | None = None
    # Besides metrics.jsonl and TensorBoard: `mlflow` logs the recipe's settings, every metric and the
    # final model folder to an MLflow tracking store; tracking_uri default: a SQLite file in the output
    # folder (mlflow.db, artifacts in mlartifacts/), no server needed; or a server's http(s):// URI.
    tracking: Literal["mlflow"] | None = Field(None, json_schema_extra=counts(OUTSIDE))
    tracking_uri: str | None = Field(None, json_schema_extra=counts(OUTSIDE))
    tracking_experiment: str | None = Field(None, json_schema_extra=counts(OUTSIDE))  # default: the recipe's name

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: object) -> object:
        return ("blocks" if value else "off") if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_length(self) -> TrainerConfig:
        given = [k for k in ("max_steps", "max_tokens", "epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of max_steps, max_tokens, epochs (got {', '.join(given)})")
        if self.warmup_steps and self.warmup_fraction is not None:
            raise ValueError("give trainer.warmup_steps or trainer.warmup_fraction, not both")
        return self


class QatConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Quantization-aware training (models/qat.py, torchao): the blocks' linear layers train
    fake-quantized (int8 dynamic activations, int8 or int4 weights), and the run also writes the real
    quantized model to `quantized/` beside `final/` (the float weights)."""

    weights: Literal["int8", "int4"] = "int4"  # int8: one scale per output channel; int4: per group
    group_size: int = Field(32, gt=0)  # int4: weights sharing one scale (must divide each layer's input width)


class RegularizeConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Terms added to any objective's training loss that keep what the starting model knew."""

    # L2-SP (Li et al., 2018): strength/2 * ||theta - theta_start||^2 over the trained parameters, pulling
    # them toward the starting point instead of toward zero (0 = off)
    l2sp: float = Field(0.0, ge=0.0)
    # EWC (Kirkpatrick et al., 2017): strength/2 * sum F * (theta - theta_start)^2, F the diagonal Fisher
    # of the starting model's language modelling on the old data (`fisher_data`: a prepared corpus,
    # e.g. the general corpus a continual-pretraining run started from), scaled to mean 1 so that
    # the strength reads like l2sp's; causal-LM objectives (0 = off)
    ewc: float = Field(0.0, ge=0.0)
    fisher_data: str | None = None
    fisher_rows: int = Field(32, gt=0)  # rows of the old data, one gradient each

    @model_validator(mode="after")
    def _fisher_data_given(self) -> RegularizeConfig:
        if self.ewc and not self.fisher_data:
            raise ValueError("ewc needs fisher_data: a prepared corpus of the data the model should not forget")
        return self


class GenerateConfig(Section, json_schema_extra=counts(OUTSIDE)):  # samples after training
    prompts: list[str] = Field(default_factory=lambda: ["The"])
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int | None = Field(50, gt=0)
    top_p: float | None = Field(0.95, gt=0.0, le=1.0)


class RolloutConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """How an RL objective (grpo, ppo) samples from the current policy: `num_generations` completions per
    prompt (trainer.batch_size prompts a rollout), rendered with the training chat template, ending at EOS
    or after max_new_tokens; and how often each rollout is used: `epochs` passes over its completions,
    each cut into `minibatches` optimizer steps (each of trainer.grad_accum passes: a memory saving).
    Unset epochs: 1 for grpo (TRL's num_iterations), 4 for ppo (TRL's num_ppo_epochs)."""

    num_generations: int = Field(4, ge=1)  # grpo: a group per prompt, its rewards compared with each other (>= 2)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)
    epochs: int | None = Field(None, ge=1)
    minibatches: int = Field(1, ge=1)


class RewardTermConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """One part of the reward of a completion; the reward is the weighted sum of the parts.
    exact_match / numeric_match: 1 when the completion (its last number, for numeric_match) equals the
    row's reference in `column` (default data.response_column), else 0; regex: 1 when the stripped
    completion matches `pattern` whole; function: `package.module:function`, called as
    f(prompts=[...], completions=[...], **the rows' other columns as lists) -> list of floats (TRL's
    convention); model: the score of a reward model folder trained by objective.name: reward."""

    kind: Literal["exact_match", "numeric_match", "regex", "function", "model"]
    weight: float = 1.0
    column: str | None = None
    pattern: str | None = None
    function: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _needs(self) -> RewardTermConfig:
        needed = {"regex": "pattern", "function": "function", "model": "path"}.get(self.kind)
        if needed and not getattr(self, needed):
            raise ValueError(f"{needed}: a {self.kind} reward needs it")
        return self


class RewardConfig(Section, json_schema_extra=counts(WEIGHTS)):
    terms: list[RewardTermConfig] = Field(default_factory=list)
