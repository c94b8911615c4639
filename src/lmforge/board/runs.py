"""What the board shows, read from the output folders as they are (nothing is cached: a page reflects
the files at the moment it is asked, so runs appear and move while they train).

A run folder is one lmforge wrote: `recipe.yaml` with `metrics.jsonl`, `status.json` or
`summary.json` beside it (a pipeline's stages are run folders too). Its id on the board is its path
below the board's root.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from lmforge.engine.metrics import read_metrics
from lmforge.engine.status import LOG, pipeline_state, read_status, run_state
from lmforge.outputs import run_recipe_file

SKIP = {"checkpoints", "final", "tensorboard", "mlartifacts", "base"}
MAX_DEPTH = 5


class BoardError(ValueError):
    """A run id that names no run under the board's root."""


def _is_run(folder: Path) -> bool:
    return run_recipe_file(folder) is not None and any((folder / n).is_file() for n in ("metrics.jsonl", "status.json", "summary.json"))


def _folders(root: Path):
    """`root` and the folders below it, a few levels deep, less those no run or pipeline lives in."""
    frontier = [(Path(root), 0)]
    while frontier:
        folder, depth = frontier.pop()
        yield folder
        if depth >= MAX_DEPTH:
            continue
        try:
            frontier += [(c, depth + 1) for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")
                         and c.name not in SKIP and ".replaced-" not in c.name]
        except OSError:
            continue


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root` (itself included), newest activity first."""
    return sorted(filter(_is_run, _folders(root)), key=_last_activity, reverse=True)


def find_pipelines(root: Path) -> list[Path]:
    """Every pipeline output folder (its pipeline.json written by lmforge) under `root`."""
    return [f for f in _folders(root) if _json(f / "pipeline.json").get("writer") == "lmforge"]


def waiting_stage_rows(root: Path) -> list[dict]:
    """A pipeline's stages whose folders are not runs yet (still to come, being prepared, or an evaluation
    stage at work), from pipeline.json and the pipeline's own status: so a stage shows from its first moment,
    not from its first metrics record. No link: there is no run page until the stage has started."""
    rows = []
    for pipeline in find_pipelines(root):
        layout = _json(pipeline / "pipeline.json")
        live = pipeline_state(pipeline)
        for stage in layout.get("stages", []):
            folder = pipeline / stage.get("folder", "")
            if _is_run(folder):
                continue
            done = stage.get("kind") == "eval" and (folder / "eval.json").is_file()
            if live.get("stage") == stage["label"]:
                state = (live.get("phase") or "running") if live.get("alive") else "interrupted"
            else:
                state = "finished" if done else "pending"
            rows.append({"id": run_id(root, folder) if folder.is_relative_to(root) else str(folder), "status": state,
                         "recipe": layout.get("name", pipeline.name), "objective": stage.get("objective", ""),
                         "method": stage.get("method", ""), "stage": f"{layout.get('name', pipeline.name)}: {stage['label']}",
                         "step": 0, "total_steps": None, "progress": None, "eta_seconds": None, "last_loss": None,
                         "message": None, "updated": live.get("updated") or 0.0, "waiting": True})
    return rows


def _last_activity(folder: Path) -> float:
    times = [(folder / n).stat().st_mtime for n in ("status.json", "metrics.jsonl", "summary.json") if (folder / n).is_file()]
    return max(times, default=0.0)


def run_id(root: Path, folder: Path) -> str:
    relative = folder.relative_to(root).as_posix()
    return relative if relative != "." else folder.name


def resolve(root: Path, ident: str) -> Path:
    """The run folder of `ident`, refusing anything outside the root (`..`, absolute paths)."""
    root = Path(root).absolute()
    candidate = root if ident == root.name and _is_run(root) else (root / ident).absolute()
    if not candidate.is_relative_to(root) or ".." in Path(ident).parts or not _is_run(candidate):
        raise BoardError(f"no run '{ident}' under {root}")
    return candidate


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _recipe(folder: Path) -> dict:
    try:
        recipe = yaml.safe_load(run_recipe_file(folder).read_text())
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _records(folder: Path) -> list[dict]:
    try:
        return read_metrics(folder / "metrics.jsonl")
    except (OSError, ValueError):  # being written this instant: the next poll reads it whole
        return []


def _pipeline_stage(root: Path, folder: Path) -> str | None:
    for parent in [folder.parent, *folder.parents][:3]:
        layout = _json(parent / "pipeline.json")
        if layout.get("writer") == "lmforge":
            for stage in layout.get("stages", []):
                if (parent / stage["folder"]).absolute() == folder.absolute():
                    return f"{layout.get('name', parent.name)}: {stage['label']}"
    return None


def best_metrics(folder: Path, records: list[dict] | None = None) -> dict:
    """The lowest validation loss and its step, and the final held-out task metrics of eval.json."""
    records = _records(folder) if records is None else records
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and _finite(r.get("loss")) is not None]
    best = {}
    if val:
        step, loss = min(val, key=lambda p: p[1])
        best.update(best_val_loss=loss, best_step=step)
    for task in (_json(folder / "eval.json").get("tasks") or {}).values():
        after = task.get("after") if isinstance(task, dict) else None
        for key in ("accuracy", "macro_f1", "exact_match"):
            if isinstance(after, dict) and _finite(after.get(key)) is not None:
                best[key] = after[key]
        break
    return best


def run_row(root: Path, folder: Path) -> dict:
    records = _records(folder)
    status = read_status(folder)
    recipe = _recipe(folder)
    train = [r for r in records if r.get("split") == "train"]
    summary = _json(folder / "summary.json")
    step = status.get("step") or (train[-1]["step"] if train else 0)
    total = status.get("total_steps") or (summary.get("train") or {}).get("steps")
    state = run_state(folder)
    return {
        "id": run_id(root, folder), "status": state, "recipe": recipe.get("name", ""),
        "objective": (recipe.get("objective") or {}).get("name", ""), "method": (recipe.get("method") or {}).get("name", ""),
        "stage": _pipeline_stage(root, folder), "step": step, "total_steps": total,
        "progress": (step / total) if total else None,
        "eta_seconds": status.get("eta_seconds") if state == "running" else None,
        "last_loss": _finite(train[-1].get("loss")) if train else None, "message": status.get("message"),
        "updated": _last_activity(folder), **best_metrics(folder, records),
    }


def run_detail(root: Path, folder: Path, log_lines: int = 40) -> dict:
    """The run's row, its curves (every numeric metric by split), log tail, recipe, check report, samples."""
    records = _records(folder)
    series: dict[str, dict[str, list]] = {}
    for record in records:
        split = record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "split") or _finite(value) is None:
                continue
            series.setdefault(split, {}).setdefault(key, []).append([record["step"], value])
    log = folder / LOG
    tail = log.read_text().splitlines()[-log_lines:] if log.is_file() else []
    summary = _json(folder / "summary.json")
    return {**run_row(root, folder), "series": series, "log": tail,
            "recipe_text": recipe_file.read_text() if (recipe_file := run_recipe_file(folder)) else "",
            "check": (folder / "check.txt").read_text() if (folder / "check.txt").is_file() else None,
            "samples": summary.get("samples") or {}, "model": str(folder / "final") if _model_saved(folder / "final") else None}


def _model_saved(final: Path) -> bool:
    """A full model, a peft adapter or a bottleneck-adapter folder (models/factory.is_model_folder,
    without importing transformers into the board's listing)."""
    return any((final / name).is_file() for name in ("config.json", "adapter_config.json", "bottleneck_adapter.json"))
