"""Pydantic's errors as messages a user acts on: the key with its dotted path, the bad value, and the
closest valid key (or lmforge's name for a Hugging Face TrainingArguments one).
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel

from lmforge.config.recipe import Recipe


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
    if not key:  # a rule across keys: its message names them (the input is the whole recipe)
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    return f"{source}: key '{key}' = {error.get('input')!r}: {error['msg']}"
