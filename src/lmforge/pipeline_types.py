"""A pipeline as lmforge holds it once loaded (pipeline_recipe.load_pipeline): its stage instances, each a stage on
one seed branch with its resolved recipe, and the pipeline's own settings. Plain data, read by the
lifecycle that plans and runs them and by eval/forgetting.py that measures each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, EvalConfig, Recipe


def point_folders(point: dict[str, Any]) -> list[str]:
    """A matrix point as folder names, one per key: {"data.max_docs": 256} -> ["max_docs_256"]."""
    return [f"{key.rsplit('.', 1)[-1]}_{str(value).replace('/', '_')}" for key, value in point.items()]


@dataclass
class StageRun:
    """One stage instance: a stage, on one seed branch, with its resolved recipe."""

    stage: str
    seed: int | None
    recipe: Recipe
    parent: StageRun | None = None
    children: list[StageRun] = field(default_factory=list)
    evaluation: EvalConfig | None = None  # an eval stage: its parent's final model measured, nothing trained
    needed: list[StageRun] = field(default_factory=list)  # the instances of the stages it `needs`
    # the values of a `matrix:` this instance takes (its own stage's, or inherited from its parent's):
    # recipe key -> value, e.g. {"data.max_docs": 256}
    point: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The instance's folder under the pipeline's: STAGE[/KEY_VALUE...][/seed_N]."""
        return "/".join([self.stage, *point_folders(self.point), *([] if self.seed is None else [f"seed_{self.seed}"])])

    @property
    def folder(self) -> Path:
        return Path(self.recipe.output_dir)

    def ancestors(self) -> list[StageRun]:
        out, node = [], self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def depends_on(self, stage: str) -> bool:
        """Whether this instance starts from `stage`'s model or needs its outputs, directly or further back."""
        return any(r.stage == stage or r.depends_on(stage) for r in [*([self.parent] if self.parent else []), *self.needed])


@dataclass
class Pipeline:
    name: str
    output_dir: Path
    source: str
    runs: list[StageRun]  # parents before children
    general: list[str] = field(default_factory=list)  # prepared corpora probed for forgetting (default: see forgetting)
    eval_batches: int = 50  # general-corpus batches measured before and after every stage
    generation_examples: int = 48  # held-out prompts an instruction-tuned stage answers, before and after
    forgetting_probes: bool = True  # general corpora measured at every stage (a single run has no other stage)

    def select(self, only: str | None = None, start: str | None = None) -> list[StageRun]:
        """The instances `--only STAGE` or `--from STAGE` (it and what starts from it or needs it) run; all by default."""
        names = {r.stage for r in self.runs}
        for flag, name in (("--only", only), ("--from", start)):
            if name is not None and name not in names:
                raise ConfigError(f"{flag} {name}: no such stage in {self.source} (stages: {', '.join(dict.fromkeys(r.stage for r in self.runs))})")
        if only is not None:
            return [r for r in self.runs if r.stage == only]
        if start is not None:
            return [r for r in self.runs if r.stage == start or r.depends_on(start)]
        return list(self.runs)
