"""A run's identity, derived from the schema's declarations (config/: `counts=` beside every setting):
the train key an up-to-date output must match, what `--resume` accepts as changed, and which settings
the report compares. No list of keys is kept here: a new setting counts as its declaration says."""

from __future__ import annotations

import glob
import json
import typing
from functools import cache
from pathlib import Path

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from lmforge.config import NAMING, OUTSIDE, RESUMABLE, Recipe, flatten
from lmforge.data.formats import file_fingerprints
from lmforge.data.prepare import PreparedCorpus
from lmforge.data.tokenizer import tokenizer_fingerprint
from lmforge.engine.checkpoint import CheckpointError
from lmforge.engine.distributed import say
from lmforge.outputs import content_hash


class Undeclared(TypeError):
    """A recipe key whose section and field both leave out how it counts for a run."""


def _sections(annotation: object) -> list[type[BaseModel]]:
    """The pydantic sections inside a field's type (`X | None`, `list[X]`, ...)."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [s for arg in typing.get_args(annotation) for s in _sections(arg)]


def declarations(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, dict]:
    """Every key under `model` (dotted, sections inside lists too) -> its declaration: the field's own
    `counts(...)`, else its section's. Raises Undeclared for a key with neither."""
    section = model.model_config.get("json_schema_extra") or {}
    found: dict[str, dict] = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        own = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        rule = own if "run_key" in own else section if "run_key" in section else None
        if rule is None:
            raise Undeclared(f"{key}: {model.__name__} declares no run-key rule for it (config.counts: "
                             "weights, resumable, outside or naming)")
        found[key] = rule
        for inner in _sections(field.annotation):
            found.update(declarations(inner, key + "."))
    return found


@cache
def _keys_where(*rules: str) -> frozenset[str]:
    return frozenset(k for k, d in declarations().items() if d["run_key"] in rules)


def not_in_train_key() -> frozenset[str]:
    """Keys that cannot change the trained weights: out of the train key, so changing them never retrains."""
    return _keys_where(OUTSIDE, NAMING)


def safe_on_resume() -> frozenset[str]:
    """What `--resume` accepts as changed: the above and the RESUMABLE keys. Any other change would make the
    run neither the old nor the new recipe."""
    return _keys_where(OUTSIDE, NAMING, RESUMABLE)


def naming_keys() -> frozenset[str]:
    """Keys that only name a run (left out of the report's configuration differences)."""
    return _keys_where(NAMING)


@cache
def _decided_with() -> dict[str, str]:
    return {k: d["decides_weights_with"] for k, d in declarations().items() if "decides_weights_with" in d}


def flat_settings(recipe: Recipe) -> dict:
    """The recipe as `section.key -> value` (lists and free-form mappings stay whole values)."""
    return flatten(recipe.model_dump(mode="json"), whole=("overrides",))


def train_settings(recipe: Recipe) -> dict:
    """The settings that decide the trained weights: all but those out of the train key (less those whose
    `decides_weights_with` key is set). Unset ones (None, empty) are left out: a key that lmforge
    adds later, unset by default, then leaves every earlier output's train key as it was (an unset key and
    an absent one train the same weights), while any value set still changes it."""
    flat = flat_settings(recipe)

    def decides(key: str) -> bool:
        condition = _decided_with().get(key)
        if condition is not None and any(k == condition or k.startswith(condition + ".") for k, v in flat.items()
                                         if v is not None):
            return True
        return not _excluded(key, not_in_train_key())

    return {k: v for k, v in flat.items() if decides(k) and v is not None and v != [] and v != {}}


def _excluded(key: str, excluded: frozenset[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in excluded)


def _path_fingerprint(value: str, outputs: Path) -> list | None:
    """Size and mtime of every file at a path the recipe names (a file, a folder, a glob); None when
    the string names nothing on disk. The run's own outputs are left out (they are what it writes)."""
    matches = sorted(glob.glob(value, recursive=True)) if any(c in value for c in "*?[") else [value]
    found = []
    for match in matches:
        path = Path(match)
        if not path.exists() or path.absolute().is_relative_to(outputs):
            continue
        found += file_fingerprints([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
    return found or None


def input_fingerprints(recipe: Recipe) -> dict:
    """For every recipe string that names a file, folder or glob on disk: its files' sizes and mtimes."""
    outputs = Path(recipe.output_dir).absolute()
    prints = {}
    for key, value in flat_settings(recipe).items():
        if _excluded(key, not_in_train_key()):
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str) and item and not item.startswith("hf:"):
                found = _path_fingerprint(item, outputs)
                if found:
                    prints[f"{key}[{i}]"] = found
    return prints


def run_identity(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, corpora: dict[str, PreparedCorpus]) -> dict:
    """Everything that decides the trained weights: the recipe's settings (less those out of the train key), the
    tokenizer, the prepared corpora and every named input file. Its hash is the train key; checkpoints
    keep it whole, so that a resume can list what changed."""
    identity = {"settings": train_settings(recipe), "tokenizer": tokenizer_fingerprint(tokenizer),
                "corpora": {n: c.manifest["fingerprint"] for n, c in corpora.items()},
                "inputs": input_fingerprints(recipe)}
    return json.loads(json.dumps(identity))  # as a checkpoint's state.json gives it back (lists, not tuples)


def train_key(identity: dict) -> str:
    return content_hash(identity)


def resume_changes(saved: dict | None, current: dict) -> tuple[list[str], list[str]]:
    """(changes `--resume` refuses, changes it accepts) between a checkpoint's run identity and this run's."""
    if not saved:
        return ["the checkpoint records no recipe (written by an older lmforge); start over without --resume"], []
    refused, accepted = [], []
    old, new = saved.get("settings", {}), current["settings"]
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (accepted if _excluded(key, safe_on_resume()) else refused).append(line)
    for part, what in (("tokenizer", "the tokenizer"), ("corpora", "the prepared data"), ("inputs", "the input files")):
        if saved.get(part) != current[part]:
            changed = sorted(k for k in saved.get(part, {}).keys() | current[part].keys()
                             if saved.get(part, {}).get(k) != current[part].get(k)) if isinstance(current[part], dict) else []
            refused.append(f"{what} changed" + (f" ({', '.join(changed)})" if changed else ""))
    return refused, accepted


def checkpoint_acceptor(identity: dict):
    """What the loop asks before resuming from a checkpoint: refuse one whose run differs in what
    breaks exactness (the list of changes), log the accepted changes."""
    def accept(path: Path, saved: dict | None) -> None:
        refused, accepted = resume_changes(saved, identity)
        if refused:
            raise CheckpointError(f"{path}: --resume would continue another run; changed since that checkpoint:\n  "
                                  + "\n  ".join(refused)
                                  + "\nrevert these, or start a new run without --resume (--force moves the checkpoints aside)")
        if accepted:
            say("resume: accepted changes since the checkpoint: " + "; ".join(accepted))
    return accept
