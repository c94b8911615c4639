"""Run keys are derived from the schema's declarations (config.counts beside every setting), not kept in lists."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from lmforge.config import NAMING, OUTSIDE, RESUMABLE, WEIGHTS, Recipe, Section, counts
from lmforge.run_keys import (
    Undeclared,
    declarations,
    flat_settings,
    naming_keys,
    not_in_train_key,
    safe_on_resume,
)


def test_every_recipe_key_declares_how_it_counts():
    rules = declarations()  # raises Undeclared for a key whose field and section both say nothing
    assert len(rules) > 150
    assert {d["run_key"] for d in rules.values()} == {WEIGHTS, RESUMABLE, OUTSIDE, NAMING}
    for key in flat_settings(Recipe()):  # every key a run's settings hold has its rule
        assert key in rules, key


def test_a_setting_that_declares_nothing_fails_the_walk():
    class Quiet(Section):  # a section with no `counts` of its own, as a new one would be written
        knob: int = 1

    class Loud(Section, json_schema_extra=counts(WEIGHTS)):
        quiet: Quiet = Quiet()

    with pytest.raises(Undeclared, match="quiet.knob: Quiet declares no run-key rule"):
        declarations(Loud)

    class Declared(Section, json_schema_extra=counts(WEIGHTS)):
        knob: int = 1

    assert declarations(Declared) == {"knob": {"run_key": WEIGHTS}}
    assert issubclass(Declared, BaseModel)


def test_what_the_declarations_give():
    outside, resumable = not_in_train_key(), safe_on_resume()
    assert {"name", "output_dir", "generate", "generate.temperature", "trainer.log_every", "trainer.eval_every",
            "trainer.progress", "trainer.tracking_uri"} <= outside
    assert {"trainer.max_steps", "trainer.epochs", "trainer.strategy"} <= resumable - outside
    assert outside <= resumable
    assert not {"trainer.lr", "seed", "data.train_files", "objective.max_kl", "method.lora.r"} & resumable
    assert naming_keys() == {"name", "output_dir"}
