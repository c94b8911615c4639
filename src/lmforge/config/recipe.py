"""A recipe: one run's sections together, the checks across sections, and the paths it writes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from lmforge.config.inputs import DataConfig, PackingConfig, TokenizerConfig
from lmforge.config.model import PROMPT_METHODS, MethodConfig, ModelConfig, ObjectiveConfig
from lmforge.config.rules import NAMING, OUTSIDE, WEIGHTS, Section, counts
from lmforge.config.training import (
    GenerateConfig,
    QatConfig,
    RegularizeConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)


class Recipe(Section, json_schema_extra=counts(WEIGHTS)):
    name: str = Field("run", json_schema_extra=counts(NAMING))
    output_dir: str = Field("runs/run", json_schema_extra=counts(NAMING))
    seed: int = 0
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    packing: PackingConfig = Field(default_factory=PackingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig, json_schema_extra=counts(OUTSIDE))
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    qat: QatConfig | None = None  # quantization-aware training (unset: off)
    rollout: RolloutConfig | None = None  # grpo's and ppo's sampling (unset: RolloutConfig's defaults)
    reward: RewardConfig | None = None  # what grpo and ppo optimise

    @model_validator(mode="after")
    def _reward_given(self) -> Recipe:
        name = self.objective.name
        if name in ("grpo", "ppo") and not (self.reward and self.reward.terms):
            raise ValueError(f"reward.terms: the {name} objective needs a reward (exact_match, numeric_match, regex, "
                             "function or model), e.g. reward: {terms: [{kind: numeric_match}]}")
        rollout = self.rollout or RolloutConfig()
        if name == "grpo" and rollout.num_generations < 2:
            raise ValueError("rollout.num_generations: grpo compares each completion with its group's; it needs at least 2")
        if name in ("grpo", "ppo"):
            completions = self.trainer.batch_size * rollout.num_generations
            slices = rollout.minibatches * self.trainer.grad_accum
            if completions % slices:
                raise ValueError(f"rollout.minibatches: {rollout.minibatches} minibatches x trainer.grad_accum "
                                 f"{self.trainer.grad_accum} do not divide a rollout's {completions} completions "
                                 f"(trainer.batch_size x rollout.num_generations)")
        return self

    @model_validator(mode="after")
    def _labels_named(self) -> Recipe:
        name = self.objective.name
        if name in ("classify", "token_classify") and self.data.train_files and not self.data.label_column:
            raise ValueError(f"data.label_column: the {name} objective needs the column that holds each row's "
                             + ("label" if name == "classify" else "tags") + ", e.g. data: {label_column: label}")
        if self.objective.label_prompt and name != "classify":
            raise ValueError(f"objective.label_prompt: starts a classifier head from the label names (classify), "
                             f"not a {name} objective; remove it")
        return self

    @model_validator(mode="after")
    def _windows_overlap_less_than_half(self) -> Recipe:
        stride, seq_len = self.objective.doc_stride, self.packing.seq_len
        if stride is not None and stride >= seq_len // 2:
            raise ValueError(f"objective.doc_stride {stride}: windows must overlap by less than half of "
                             f"packing.seq_len ({seq_len})")
        return self

    @model_validator(mode="after")
    def _l2sp_unsharded(self) -> Recipe:
        if self.qat is not None and self.method.name not in ("full", "freeze", "llrd"):
            raise ValueError(f"qat: trains the model's own weights on the quantization grid (method full, freeze or "
                             f"llrd), not {self.method.name}'s added parameters")
        if self.qat is not None and self.trainer.strategy == "fsdp":
            raise ValueError("qat: not with trainer.strategy fsdp yet (use ddp)")
        if self.method.name == "adapter" and self.trainer.strategy == "fsdp":
            raise ValueError("method.name adapter: not with trainer.strategy fsdp yet (use ddp)")
        if self.trainer.early_stopping is not None and self.trainer.strategy == "fsdp":
            raise ValueError("trainer.early_stopping: not with trainer.strategy fsdp yet (use ddp)")
        if (self.regularize.l2sp or self.regularize.ewc) and self.trainer.strategy == "fsdp":  # anchors are whole tensors
            raise ValueError("regularize: l2sp and ewc do not run with trainer.strategy fsdp (use ddp)")
        return self

    @model_validator(mode="after")
    def _prompt_learning_fits(self) -> Recipe:
        if self.method.name not in PROMPT_METHODS:
            return self
        if self.objective.name not in ("clm", "sft", "dpo", "simpo", "orpo", "kto"):
            raise ValueError(f"method.name {self.method.name}: built for causal-LM objectives (clm, sft, dpo, simpo, orpo, kto), "
                             f"not '{self.objective.name}'")
        if self.packing.document_mask:  # peft drops position ids under prompt learning
            raise ValueError(f"packing.document_mask: {self.method.name} ignores position ids, so packed "
                             "documents could not be kept apart; turn document_mask off")
        return self

    # Derived paths: one place decides where each stage writes.
    @property
    def tokenizer_dir(self) -> Path:
        """Where the run's tokenizer lives: trained or extended ones in the run's folder."""
        if self.tokenizer.path and not self.tokenizer.extend_count:
            return Path(self.tokenizer.path)
        return Path(self.output_dir) / "tokenizer"

    @property
    def prepared_dir(self) -> Path:
        return Path(self.data.prepared_dir or Path(self.output_dir) / "data")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def final_model_dir(self) -> Path:
        return Path(self.output_dir) / "final"

    @property
    def quantized_model_dir(self) -> Path:
        """Where a QAT run writes its real quantized model (torchao), beside final/."""
        return Path(self.output_dir) / "quantized"
