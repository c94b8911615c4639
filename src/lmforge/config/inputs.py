"""What a run reads: the tokenizer, the data (files, columns, held-out rows, mixtures, tasks) and how
texts become rows (packing).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from lmforge.config.rules import WEIGHTS, Section, chat_template_name, counts


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
    # words: whole pre-tokenized words (added tokens; English-like text); bpe: sub-word pieces a BPE model
    # learns from extend_files, merged into the base's own merges (Chinese-LLaMA's way: text without spaces)
    extend_method: Literal["words", "bpe"] = "words"


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
    # the first max_docs rows of each file; labelled data (classify): a label budget, that many training
    # rows (a fixed-seed sample, smaller budgets inside larger ones) with the held-out rows unchanged
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
    chat_template: Annotated[str | None, AfterValidator(chat_template_name)] = None  # Jinja, or lmforge / chatml
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
