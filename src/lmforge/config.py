"""The recipe schema: pydantic models of every section, and the plain YAML helpers around them.

Every section forbids unknown keys; `explain_error` turns pydantic's errors into messages that name the
key (with its dotted path), the bad value, and the closest valid key. This module imports nothing of
lmforge above data types: resolving a recipe against presets, objectives, models and packages is
recipe_files.py's (`load_recipe`, `validate_recipe`).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmforge.data.chat_templates import name_problem  # a table that imports nothing: the schema's layer


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file and key."""


def _chat_template(value: str | None) -> str | None:
    problem = name_problem(value) if value is not None else None
    if problem:
        raise ValueError(problem)
    return value


class Section(BaseModel):
    # inf and nan are no settings: `trainer.lr=inf` would train a model of non-finite weights
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# How a setting counts for a run, declared once beside it: a section states the rule of its settings in its
# class line (`counts=...` below), a setting that counts otherwise in its own Field. run_keys.py derives
# from these alone the train key (what an up-to-date output must match), what `--resume` accepts as
# changed, and which differences the report shows; tests/test_run_keys.py fails for a key declaring nothing.
WEIGHTS = "weights"  # decides the trained weights: in the train key; --resume refuses a change
RESUMABLE = "resumable"  # in the train key, but --resume accepts a change (the schedule is refit from the checkpoint on)
OUTSIDE = "outside"  # changes no weight (logging, saving, tracking, sampling afterwards): out of the train key
NAMING = "naming"  # names the run or its folder: out of the train key and of the report's differences


def counts(rule: str, decides_weights_with: str | None = None) -> dict:
    """A run-key declaration. `decides_weights_with`: an OUTSIDE setting that decides the weights all the
    same once that other key is set (with early stopping, when the run evaluates picks the final step)."""
    return {"run_key": rule, **({"decides_weights_with": decides_weights_with} if decides_weights_with else {})}


class TokenizerConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Train a tokenizer (when `train_files` is set) or use the one at `path`."""

    path: str | None = None
    train_files: list[str] = Field(default_factory=list)
    column: str = "text"
    kind: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(8192, gt=0)
    min_frequency: int = Field(2, ge=1)
    num_sentinels: int = Field(0, ge=0)
    max_docs: int | None = Field(None, gt=0)
    # Continual pretraining: add the `extend_count` domain words (from `extend_files`) that save the
    # most tokens to the tokenizer at `path`; the model's new embedding rows start as piece means.
    extend_files: list[str] = Field(default_factory=list)
    extend_count: int = Field(0, ge=0)
    extend_min_frequency: int = Field(5, ge=1)


class MixtureSource(Section, json_schema_extra=counts(WEIGHTS)):
    """One corpus of a training mixture: raw files to prepare, or an already prepared folder."""

    name: str
    train_files: list[str] = Field(default_factory=list)
    prepared_dir: str | None = None
    column: str = "text"
    weight: float = Field(1.0, gt=0.0)


class MultitaskConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Several instruction tasks in one run (data/multitask.py): which row is which task, how batches
    sample the tasks, each task's prompt, and the tasks held out to measure generalisation."""

    column: str = "task"  # the row's task name
    # proportional: by example count; temperature: count^(1/T) (T5); equal: every task alike
    sampling: Literal["proportional", "temperature", "equal"] = "proportional"
    temperature: float = Field(2.0, gt=0.0)
    prefix: str | None = None  # T5-style, before each prompt; "{task}" is the task's name, e.g. "{task}: "
    templates: dict[str, str] = Field(default_factory=dict)  # task -> its prompt template (else data.prompt_template)
    tasks: list[str] | None = None  # the tasks that train (unset: every task of the data but the held-out ones)
    held_out_tasks: list[str] = Field(default_factory=list)  # never trained; every eval scores all their rows


class DataConfig(Section, json_schema_extra=counts(WEIGHTS)):
    """Corpus preparation: raw files in, memory-mapped token shards out."""

    # a named data set of the registry (data/presets.py): its files and column keys, under the recipe's own
    dataset: str | None = None
    registry: str | None = None  # the registry file; else $LMFORGE_DATASETS, else ./datasets.yaml
    # a common layout's column names: alpaca | sharegpt | messages | text | labelled | pairs | preferences
    preset: Literal["alpaca", "sharegpt", "messages", "text", "labelled", "pairs", "preferences"] | None = None
    train_files: list[str] = Field(default_factory=list)
    # the user's own held-out set (same format and columns): every train_files row trains, these are
    # what every held-out metric reads; unset = a hashed val_fraction of train_files is held out
    val_files: list[str] = Field(default_factory=list)
    column: str = "text"
    # paired data (contrastive): the positive's column; unset = each text is its own positive (SimCSE)
    pair_column: str | None = None
    # labelled data (classify): the label's column, and optionally the allowed labels in order
    label_column: str | None = None
    labels: list[str] | None = None
    # extractive QA (extractive_qa): the question's and the context's columns, and the answers' (SQuAD's
    # {"text": [...], "answer_start": [...]}, an answer string, or a list of them)
    question_column: str = "question"
    context_column: str = "context"
    answer_column: str = "answers"
    # auto: by the file's suffix; a .txt (or any other) file is one document, `paragraphs` splits plain
    # text at blank lines
    format: Literal["auto", "text", "paragraphs", "jsonl", "csv", "parquet", "hf"] = "auto"
    prepared_dir: str | None = None
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    max_docs: int | None = Field(None, gt=0)
    shard_tokens: int = Field(100_000_000, gt=0)
    # Several corpora sampled by weight (continual pretraining with replay); replaces train_files.
    mixture: list[MixtureSource] = Field(default_factory=list)
    # Instruction data (sft): a conversation column, or a prompt built from the row's columns
    # plus the answer's column; rendered with the tokenizer's chat template, this one, or lmforge's.
    messages_column: str = "messages"
    prompt_template: str = "{prompt}"
    response_column: str = "response"
    # Preference data (dpo, reward): the prompt as above, and the two answers' columns
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    system_prompt: str | None = None
    chat_template: Annotated[str | None, AfterValidator(_chat_template)] = None  # Jinja, or lmforge / chatml
    long_examples: Literal["drop", "truncate", "error"] = "drop"  # examples longer than packing.seq_len
    multitask: MultitaskConfig | None = None  # instruction rows of several tasks (sft)

    @model_validator(mode="after")
    def _one_conversation_source(self) -> DataConfig:
        defaults = type(self).model_fields
        if (self.prompt_template != defaults["prompt_template"].default
                and self.messages_column != defaults["messages_column"].default):  # both chosen (a dump has defaults)
            raise ValueError("give data.messages_column (rows hold a conversation) or data.prompt_template (rows hold "
                             "columns of a prompt), not both: a row with the conversation column would ignore the template")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.mixture and self.train_files:
            raise ValueError("give either train_files or mixture, not both")
        if self.val_files and self.mixture:
            raise ValueError("data.val_files: each mixture source holds out its own val_fraction; "
                             "val_files is for train_files")
        if self.val_files and self.val_fraction != type(self).model_fields["val_fraction"].default:
            raise ValueError("give data.val_files (your own held-out rows) or data.val_fraction (a share of "
                             "train_files held out), not both")
        names = [m.name for m in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture source names must be unique (got {names})")
        return self


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


class PackingConfig(Section, json_schema_extra=counts(WEIGHTS)):
    seq_len: int = Field(256, gt=1)
    # Reset position ids at document starts so attention stays inside each document. With SDPA
    # this means a dense block mask (slower on CPU), hence off by default for pretraining.
    document_mask: bool = False
    # Variable-length examples (sft): `grouped` batches examples of similar length, right-padded
    # (sorted inside shuffled chunks of `group_size` batches); `packed` concatenates them into
    # seq_len rows (with document_mask to keep them apart).
    examples: Literal["grouped", "packed"] = "grouped"
    group_size: int = Field(128, gt=0)


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
    warmup_steps: int = Field(0, ge=0)
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


class EvalTaskConfig(Section):
    """A held-out task file that `lmforge eval` (or an eval stage) scores: labelled rows (classification),
    conversations with reference answers (generation) or preference pairs (preferences)."""

    files: list[str]
    kind: Literal["auto", "classification", "generation", "preferences"] = "auto"  # auto: by the first row's columns
    column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    messages_column: str = "messages"
    prompt_template: str = "{prompt}"
    response_column: str = "response"
    chosen_column: str = "chosen"  # preference pairs: the better answer
    rejected_column: str = "rejected"
    system_prompt: str | None = None
    chat_template: Annotated[str | None, AfterValidator(_chat_template)] = None  # Jinja, or lmforge / chatml
    # where in-context examples come from; unset: the first rows of `files` (then not scored)
    shots_files: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0)  # score at most this many rows

    @field_validator("files", "shots_files", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EvalConfig(Section):
    """The evaluation suite: perplexity on named corpora, held-out tasks, sample generations."""

    corpora: dict[str, list[str]] = Field(default_factory=dict)  # name -> a prepared folder, or text files
    column: str = "text"
    tasks: dict[str, EvalTaskConfig] = Field(default_factory=dict)
    prompts: list[str] = Field(default_factory=list)
    few_shot: int = Field(8, ge=0)  # in-context examples a causal LM sees per classification prompt
    baseline: str | None = None  # an untuned model folder, scored in context (or by prototypes) on the same rows
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, gt=0)
    max_batches: int | None = Field(50, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    seed: int = 0

    @field_validator("corpora", mode="before")
    @classmethod
    def _corpus_files(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value


def validate_eval(raw: Any, source: str) -> EvalConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping (corpora, tasks, prompts, ...), got {type(raw).__name__}")
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(explain_error(e, source, EvalConfig) for e in exc.errors())) from None


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


def flatten(node: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict:
    """A nested mapping as `a.b.c -> value`; empty mappings and the keys in `whole` stay whole values."""
    out: dict = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict) and value and key not in whole:
            out.update(flatten(value, f"{prefix}{key}.", whole))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _section_at(loc: tuple, model: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (the key itself being loc[-1])."""
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        ann = getattr(field, "annotation", None) if field else None
        if typing.get_origin(ann) is dict and parts:  # a mapping of names to sections: skip the name
            ann = typing.get_args(ann)[1]
            parts.pop(0)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


# Hugging Face TrainingArguments / LLaMA-Factory names users bring, and what lmforge calls them
HF_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
            "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "warmup_ratio": "warmup_steps",
            "lr_scheduler_type": "schedule", "max_grad_norm": "clip_grad", "logging_steps": "log_every",
            "eval_steps": "eval_every", "save_steps": "save_every", "gradient_checkpointing": "activation_checkpointing",
            "max_seq_length": "seq_len", "cutoff_len": "seq_len", "model_name_or_path": "path", "lora_rank": "rank",
            "lora_alpha": "alpha", "lora_dropout": "dropout"}


def explain_error(error: dict, source: str, root: type[BaseModel] | None = None) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        section = _section_at(loc, root or Recipe)
        valid = list(section.model_fields) if section else []
        known = HF_NAMES.get(str(loc[-1]))
        if known and known in valid:  # a Hugging Face TrainingArguments name for one of ours
            return (f"{source}: unknown key '{key}'; lmforge calls it '{'.'.join([*map(str, loc[:-1]), known])}' "
                    f"(valid here: {', '.join(valid)})")
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint} (valid here: {', '.join(valid)})"
    value = error.get("input")
    where = f"key '{key}'" if key else "recipe"
    return f"{source}: {where} = {value!r}: {error['msg']}"


TRAINING_LENGTH = {"trainer.max_steps", "trainer.max_tokens", "trainer.epochs"}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings; values are parsed as YAML (`3e-4`, `true`, `[1, 2]`)."""
    if overrides and not isinstance(raw, dict):
        raise ConfigError(f"the recipe must be a mapping of sections to apply overrides to, got {type(raw).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. trainer.lr=3e-4")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = _parse_value(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        length = next((t for t in TRAINING_LENGTH if key.strip() == t or key.strip().endswith("." + t)), None)
        if length:  # a new length replaces the recipe's (it may use another unit); also in a pipeline's stage
            for other in TRAINING_LENGTH - {length}:
                node.pop(other.split(".")[-1], None)
    return raw


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    # YAML 1.1 reads "3e-4" as a string; a number is what anyone typing it means.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently,
    dropping a whole section when a section name repeats)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' given twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> Any:
    """A recipe file's YAML (duplicate keys refused), errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {exc}") from None


def is_pipeline(raw: Any) -> bool:
    """A pipeline recipe lists `stages:`; a plain recipe is one stage's body."""
    return isinstance(raw, dict) and "stages" in raw
