"""Standard benchmarks through the lm-evaluation-harness (`lm-eval`), for tasks whose data is local.

An lmforge model folder (a full model, or an adapter folder merged onto its base) is loaded as lmforge
loads it and handed to lm-eval's `HFLM` as a model instance, so the harness scores exactly the weights
lmforge trained. Task YAMLs come from a folder (`TaskManager(include_path=...)`); their relative
`data_files` resolve against that folder, not the working directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from lmforge.data.tokenizer import load_tokenizer


class HarnessError(ValueError):
    """lm-eval is absent, or a task cannot be found."""


@contextlib.contextmanager
def _inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _quiet(name: str):
    """lm-eval warns that a model handed over as an instance ignores its model arguments: lmforge passes none."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def harness_metrics(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results ("acc,none" read as "acc")."""
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias"}
            for task, metrics in results["results"].items()}


def harness_table(results: dict) -> str:
    """lm-eval's own table of the results (the one its CLI prints)."""
    from lm_eval.utils import make_table

    return make_table(results) + (make_table(results, "groups") if results.get("groups") else "")


def ensure_new_file(path: Path) -> Path:
    """`path`, refused if a file is there: lmforge does not overwrite what it did not write."""
    path = Path(path)
    if path.exists():
        raise HarnessError(f"--out {path}: the file exists (lmforge does not overwrite it); name another")
    return path


def write_harness_json(results: dict, path: Path) -> Path:
    """lm-eval's results as its CLI writes them (configs, versions, n-shot, metrics), to a new file."""
    from lm_eval.utils import handle_non_serializable

    path = ensure_new_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def run_harness(model_dir: Path, tasks_dir: Path, tasks: list[str], num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's `simple_evaluate` results (without per-sample logs) on the local tasks of `tasks_dir`;
    `harness_metrics` reads them as {task: {metric: value}}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("lm-eval is not installed (pip install 'lm-eval>=0.4.13')") from None
    from lmforge.engine.runtime import pick_device
    from lmforge.models.factory import load_model

    model_dir, tasks_dir = Path(model_dir).absolute(), Path(tasks_dir).absolute()
    if not tasks_dir.is_dir():
        raise HarnessError(f"--tasks-dir {tasks_dir}: not a folder of task YAMLs")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: never a hub lookup
    manager = TaskManager(include_path=str(tasks_dir))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = sorted(p.stem for p in tasks_dir.glob("*.yaml"))
        raise HarnessError(f"--task {', '.join(unknown)}: not a task lm-eval knows (YAMLs in {tasks_dir}: {', '.join(local) or 'none'})")
    device = pick_device()
    model = load_model(model_dir, "causal_lm").to(device).eval()
    with _quiet("lm_eval.models.huggingface"):
        lm = HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir), batch_size=batch_size, device=str(device))
    with _inside(tasks_dir):
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  bootstrap_iters=1000, log_samples=False)
    results.pop("samples", None)
    results["lmforge"] = {"model": str(model_dir), "tasks_dir": str(tasks_dir)}
    return results
