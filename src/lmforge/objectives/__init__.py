"""Training objectives, one per file; `get_objective` picks one by its recipe name."""

from __future__ import annotations

from lmforge.objectives.base import Objective
from lmforge.objectives.clm import CausalLM

OBJECTIVES: dict[str, type] = {"clm": CausalLM}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective '{name}' (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]()
