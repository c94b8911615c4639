"""The evaluation suite of `lmforge eval` and of eval stages: corpora, held-out task files, prompts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator

from lmforge.config.errors import explain_error
from lmforge.config.rules import ConfigError, Section, chat_template_name


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
    chat_template: Annotated[str | None, AfterValidator(chat_template_name)] = None  # Jinja, or lmforge / chatml
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
