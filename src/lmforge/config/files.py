"""Recipe files as YAML: read (a key given twice refused, errors naming the file and line), and
`KEY=VALUE` overrides applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmforge.config.rules import ConfigError

TRAINING_LENGTH = {"trainer.max_steps", "trainer.max_tokens", "trainer.epochs"}
WARMUP = {"trainer.warmup_steps", "trainer.warmup_fraction"}
# settings given one way or another: one given later (an override, a pipeline stage) replaces the others
ALTERNATIVES = (TRAINING_LENGTH, WARMUP)


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
        for choice in ALTERNATIVES:  # a new length (or warm-up) replaces the recipe's, in another unit too
            given = next((t for t in choice if key.strip() == t or key.strip().endswith("." + t)), None)
            for other in choice - {given} if given else ():  # also in a pipeline's stage
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
