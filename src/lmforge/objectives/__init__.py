"""Training objectives, one per file; `get_objective` picks one by its recipe name."""

from __future__ import annotations

from lmforge.config import ObjectiveConfig
from lmforge.objectives.base import Objective
from lmforge.objectives.classify import SequenceClassification
from lmforge.objectives.clm import CausalLM
from lmforge.objectives.contrastive import Contrastive
from lmforge.objectives.distill import Distillation
from lmforge.objectives.dpo import DirectPreference
from lmforge.objectives.extractive_qa import ExtractiveQA
from lmforge.objectives.grpo import GroupRelativePolicy
from lmforge.objectives.kto import KahnemanTversky
from lmforge.objectives.mlm import MaskedLM
from lmforge.objectives.orpo import OddsRatioPreference
from lmforge.objectives.ppo import ProximalPolicy
from lmforge.objectives.prefix_lm import PrefixLM
from lmforge.objectives.reward import RewardModel
from lmforge.objectives.sft import SupervisedFineTuning
from lmforge.objectives.simpo import SimplePreference
from lmforge.objectives.span import SpanCorruption
from lmforge.objectives.token_classify import TokenClassification

OBJECTIVES: dict[str, type] = {"clm": CausalLM, "mlm": MaskedLM, "prefix_lm": PrefixLM, "span": SpanCorruption,
                               "contrastive": Contrastive, "classify": SequenceClassification,
                               "sft": SupervisedFineTuning, "dpo": DirectPreference, "simpo": SimplePreference,
                               "orpo": OddsRatioPreference, "reward": RewardModel,
                               "distill": Distillation, "grpo": GroupRelativePolicy, "ppo": ProximalPolicy,
                               "kto": KahnemanTversky, "token_classify": TokenClassification,
                               "extractive_qa": ExtractiveQA}


def objective_head(cfg: ObjectiveConfig) -> str:
    """The model head an objective trains, known from the recipe alone (before any tokenizer exists)."""
    if cfg.name == "mlm" and cfg.sentence_task != "none":
        return "pretraining"
    return OBJECTIVES[cfg.name].head


def objective_data(cfg: ObjectiveConfig) -> str:
    """What the objective trains on: packed rows, (query, positive) pairs, or sentence pairs."""
    if cfg.name == "mlm" and cfg.sentence_task != "none":
        return "sentence_pairs"
    return getattr(OBJECTIVES[cfg.name], "data_kind", "packed")


def get_objective(cfg: ObjectiveConfig | str, tokenizer=None) -> Objective:
    cfg = ObjectiveConfig(name=cfg) if isinstance(cfg, str) else cfg
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective '{cfg.name}' (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.name](cfg, tokenizer)
