"""The schema's ground rules: the error every bad recipe raises, the base of every section (unknown
keys refused), and how a setting counts for a run (`counts`), declared once beside it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lmforge.data.chat_templates import name_problem  # a table that imports nothing: the schema's layer


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file and key."""


def chat_template_name(value: str | None) -> str | None:
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
