"""What trains: the model, the objective it learns, and the method that decides which weights change
(full, LoRA, IA3, prompt learning, adapters, freezing, layer-wise learning rates).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config.rules import WEIGHTS, Section, counts


class ModelConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """A model built from a family preset (plus overrides) or loaded from a local directory."""

    family: Literal["llama", "gpt2", "bert", "roberta", "t5"] = "llama"
    preset: Literal["tiny", "small", "base"] = "tiny"
    path: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    trust_remote_code: bool = False


class ObjectiveConfig(Section, json_schema_extra=counts(WEIGHTS)):
    name: Literal["clm", "mlm", "prefix_lm", "span", "contrastive", "classify", "sft", "dpo", "simpo", "orpo", "reward",
                  "distill", "grpo", "ppo", "kto", "token_classify", "extractive_qa"] = "clm"
    # mlm: selection rate, and how selected tokens are replaced (the rest stay unchanged)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    mask_replace_prob: float = Field(0.8, ge=0.0, le=1.0)
    random_replace_prob: float = Field(0.1, ge=0.0, le=1.0)
    whole_word_masking: bool = False
    sentence_task: Literal["none", "nsp", "sop"] = "none"  # mlm companion loss (BERT NSP / ALBERT SOP)
    # prefix_lm: the prefix length is drawn uniformly between these fractions of the row
    prefix_min_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    prefix_max_fraction: float = Field(0.9, gt=0.0, lt=1.0)
    # span: T5 span corruption
    noise_density: float = Field(0.15, gt=0.0, lt=1.0)
    mean_span_length: float = Field(3.0, ge=1.0)
    # contrastive: InfoNCE temperature (fixed, or the starting value when learned), pooling
    temperature: float = Field(0.05, gt=0.0)
    learn_temperature: bool = False
    pooling: Literal["mean", "cls"] = "mean"
    symmetric: bool = False
    # classify with a decoder (prompt-based fine-tuning, as PET and LM-BFF): every text is followed by this
    # prompt (e.g. "\nLabel:", the few-shot baseline's), and the new classifier head starts as the model's
    # own output rows of each label name's first token (" negative", " positive"): step 0 is the zero-shot
    # classifier, not a random one. The prompt is kept in the model's config, so eval and predict add it.
    label_prompt: str | None = Field(None, min_length=1)
    # dpo, grpo, ppo: the weight of the KL penalty that keeps the policy near the reference (higher: closer;
    # grpo and ppo may use 0: no reference at all; ppo subtracts it from each token's reward); simpo: the reward scale (its paper uses 2-2.5); orpo: the
    # odds-ratio term's weight (lambda)
    beta: float = Field(0.1, ge=0.0)
    # dpo: sigmoid (DPO's loss) or ipo (a squared loss on per-token log-ratios, toward 1 / (2 beta))
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    # simpo: the target reward margin gamma between the chosen and the rejected answer
    simpo_gamma: float = Field(0.5, ge=0.0)
    # kto: the weights of the desirable and the undesirable examples' losses (unset: 1; to balance
    # unequal counts, keep desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3])
    desirable_weight: float | None = Field(None, gt=0.0)
    undesirable_weight: float | None = Field(None, gt=0.0)
    # grpo: how the per-token losses are averaged (grpo: per completion, then over completions; bnpo:
    # over all tokens of the batch; dr_grpo: over batch x rollout.max_new_tokens, with unscaled
    # advantages; dapo: over the tokens, with clip-higher), the clipping range of the importance ratio
    # [1 - epsilon, 1 + epsilon_high], and how advantages are scaled (group: by each prompt's reward sd;
    # batch: by the batch's; none). Unset: grpo, 0.2, epsilon (dapo: 0.28), group (dr_grpo: none).
    grpo_loss: Literal["grpo", "bnpo", "dr_grpo", "dapo"] | None = None
    epsilon: float | None = Field(None, gt=0.0, lt=1.0)
    epsilon_high: float | None = Field(None, gt=0.0)
    scale_rewards: Literal["group", "batch", "none"] | None = None
    # ppo: the value head's loss weight and clip range (around the values at the rollout), the discount
    # and GAE's lambda, the per-token KL estimate in the reward (k1: log-ratio; k3: never negative),
    # and a penalty on the score of a completion that never reached EOS (unset: none). epsilon clips the
    # policy's ratio as in grpo. Unset values are TRL's PPO defaults.
    vf_coef: float = Field(0.1, ge=0.0)
    value_clip: float = Field(0.2, gt=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    missing_eos_penalty: float | None = Field(None, ge=0.0)
    # grpo, ppo run health: a run whose mean KL to the reference (over a log window) exceeds max_kl, or
    # (grpo) whose every group of completions got equal rewards for max_flat_steps steps in a row (nothing
    # to learn from), stops with an error naming its last good checkpoint; null switches a verdict off.
    # A run whose completions are all empty always stops.
    max_kl: float | None = Field(5.0, gt=0.0)
    max_flat_steps: int | None = Field(20, gt=0)
    # extractive_qa: the longest answer predicted, in tokens, and the overlap of the windows a long
    # context is cut into (tokens shared by neighbouring windows; unset: a quarter of packing.seq_len)
    max_answer_tokens: int = Field(30, gt=0)
    doc_stride: int | None = Field(None, ge=0)
    # distill: the teacher (a local causal-LM checkpoint with the student's vocabulary), the softmax
    # temperature of both distributions, and the distillation term's share of the loss (the rest is
    # the usual next-token loss on the data)
    teacher: str | None = None
    distill_temperature: float = Field(2.0, gt=0.0)
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _beta_positive(self) -> ObjectiveConfig:
        if self.beta == 0 and self.name not in ("grpo", "ppo"):
            raise ValueError(f"beta: must be above 0 for {self.name} (only grpo and ppo run without the KL term)")
        return self

    @model_validator(mode="after")
    def _teacher_given(self) -> ObjectiveConfig:
        if self.name == "distill" and not self.teacher:
            raise ValueError("teacher: the distill objective needs the teacher's local checkpoint directory")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> ObjectiveConfig:
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError("mask_replace_prob + random_replace_prob must be at most 1")
        if self.prefix_min_fraction > self.prefix_max_fraction:
            raise ValueError("prefix_min_fraction must not exceed prefix_max_fraction")
        return self


class LoraConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """LoRA / DoRA adapters (method.name: lora), built by `peft` so `PeftModel.from_pretrained` loads them."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # 0 keeps every step deterministic and cheaper
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    dora: bool = False
    # the frozen base's storage dtype: bf16 halves its memory; auto = bf16 only where bf16 matmuls
    # were measured faster (same rule as trainer.precision), else fp32; int8 (opt-in: it changes the
    # base's outputs slightly) quantizes the blocks' linear layers and multiplies in int8 (models/int8.py);
    # nf4 (QLoRA) stores them in 4-bit NormalFloat through bitsandbytes (models/nf4.py; pip install bitsandbytes)
    base_dtype: Literal["auto", "fp32", "bf16", "int8", "nf4"] = "auto"

    @model_validator(mode="after")
    def _int8_without_dora(self) -> LoraConfig:
        if self.base_dtype in ("int8", "nf4") and self.dora:
            raise ValueError(f"base_dtype {self.base_dtype} does not combine with dora (DoRA rescales by the norms of the "
                             "base weights, which a quantized base does not keep)")
        return self


class Ia3Config(Section, json_schema_extra=counts(WEIGHTS)):
    """(IA)^3 (method.name: ia3): learned vectors rescale the keys, values and feed-forward activations
    of a frozen model (a few thousand parameters); built by `peft`, so `PeftModel.from_pretrained` loads them."""

    # None: peft's choice for the architecture (e.g. k_proj, v_proj, down_proj for Llama)
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None  # the targets whose input, not output, is rescaled


class PromptConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Prompt learning (method.name: prompt_tuning | prefix_tuning | p_tuning): the model stays frozen and
    `virtual_tokens` learned vectors steer it. prompt_tuning: embeddings prepended to the input;
    p_tuning: the same, produced by a small MLP; prefix_tuning: keys and values prepended in every layer.
    Built by `peft` for causal LMs (clm, sft, dpo); the folder loads with `PeftModel.from_pretrained`."""

    virtual_tokens: int = Field(20, gt=0)  # prompt_tuning starts them as embeddings of sampled vocabulary tokens
    encoder_hidden_size: int | None = Field(None, gt=0)  # p_tuning's MLP, prefix_tuning's projection (default: model width)
    prefix_projection: bool = False  # prefix_tuning: produce the prefixes through an MLP (more stable, more parameters)


PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
# methods whose output is an adapter that names its base model's folder (peft's, and bottleneck adapters)
ADAPTER_METHODS = ("lora", "ia3", *PROMPT_METHODS, "adapter")


class AdapterConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Bottleneck adapters (method.name: adapter, methods/adapters.py): a small down-projection, a
    non-linearity and an up-projection added to a sublayer's output, the base frozen. houlsby: after the
    attention and after the feed-forward block of every layer; pfeiffer: after the feed-forward block only."""

    kind: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = Field(16, gt=0)  # the bottleneck is the model width divided by this
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    train_layer_norms: bool = False  # Houlsby's paper also trains the layer norms


class LlrdConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Layer-wise learning-rate decay (method.name: llrd): block i of L trains at decay^(L - i) times the
    learning rate, the embeddings at decay^(L + 1), the head at 1."""

    decay: float = Field(0.8, gt=0.0, le=1.0)


class MethodConfig(Section, json_schema_extra=counts(WEIGHTS)):
    name: Literal["full", "freeze", "llrd", "lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                  "adapter"] = "full"
    # for `freeze`: parameter-name substrings that stay trainable, everything else is frozen
    trainable: list[str] = Field(default_factory=list)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    llrd: LlrdConfig = Field(default_factory=LlrdConfig)
    ia3: Ia3Config = Field(default_factory=Ia3Config)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)

    @property
    def virtual_positions(self) -> int:
        """Positions the method adds in front of every input (prompt learning's virtual tokens)."""
        return self.prompt.virtual_tokens if self.name in PROMPT_METHODS else 0
