"""Pipelines run: which stage instances are up to date (plan), the pre-launch check of each, the run in
order with each stage evaluated before and after it (eval/forgetting.py), and `pipeline.json` for
`lmforge report`. A plain recipe runs as one stage (`run_single`), measured the same way. Reading a
pipeline recipe into its instances is pipeline_recipe.py's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError, Recipe
from lmforge.engine.status import finished_evaluating, pipeline_at
from lmforge.pipeline_types import Pipeline, StageRun


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
        lineage = [(r.stage, r.recipe) for r in reversed([run, *run.ancestors()])]
        report = check_recipe(recipe, sample_rows, measure, stand_in=recipe is not run.recipe, lineage=lineage)
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
        if total is None and t.epochs and getattr(report, "training_documents", 0):  # training rows read by the check
            data = step.run.recipe.data
            rows = report.training_documents * (1 - (0.0 if data.val_files else data.val_fraction))
            rows = min(rows, data.max_docs or rows)  # a label budget: max_docs rows of those
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
              "stages": [{"label": r.label, "stage": r.stage, "seed": r.seed, "point": r.point,
                          "parent": r.parent.label if r.parent else None,
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
        pipeline_at(pipeline.output_dir, run.label, "evaluating" if run.evaluation is not None else "preparing")
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
        finished_evaluating(run.folder)
    pipeline_at(pipeline.output_dir, None, "finished")
    return results


def run_single(recipe: Recipe, resume: bool = False, force: bool = False) -> dict:
    """`lmforge run RECIPE` of a recipe without stages: the recipe trained as one stage, then measured by
    the pipeline's own evaluation (eval.json: task metrics with intervals, the few-shot baseline of the
    untuned model, held-out answers), so a plain run and a pipeline stage are evaluated one way."""
    from lmforge.eval.forgetting import TASK_DATA, evaluate_stage
    from lmforge.objectives import objective_data
    from lmforge.pipeline import run_recipe

    summary = run_recipe(recipe, resume=resume, force=force)
    if summary.get("interrupted") or not summary:  # interrupted, or under torchrun a rank other than 0
        return summary
    if objective_data(recipe.objective) not in TASK_DATA:  # pretraining: its held-out loss is all there is
        finished_evaluating(Path(recipe.output_dir))
        return summary
    run = StageRun(recipe.name or Path(recipe.output_dir).name, None, recipe)
    pipeline = Pipeline(run.stage, Path(recipe.output_dir), str(recipe.output_dir), [run], forgetting_probes=False)
    summary["evaluation"] = evaluate_stage(pipeline, run, plan_key(run))  # reused while the run is unchanged
    finished_evaluating(Path(recipe.output_dir))
    return summary

