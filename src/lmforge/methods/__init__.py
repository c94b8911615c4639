"""Fine-tuning methods, one per file: each decides which parameters train and how they are grouped."""

from __future__ import annotations

from torch import nn

from lmforge.config import MethodConfig
from lmforge.methods import adapters, freeze, full, llrd, peft

METHODS = {"full": full.apply, "freeze": freeze.apply, "llrd": llrd.apply, "lora": peft.apply, "ia3": peft.apply,
           "prompt_tuning": peft.apply, "prefix_tuning": peft.apply, "p_tuning": peft.apply,
           "adapter": adapters.apply}


def apply_method(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    if cfg.name not in METHODS:
        raise ValueError(f"method.name: unknown method '{cfg.name}' (known: {', '.join(METHODS)})")
    return METHODS[cfg.name](model, cfg, weight_decay)
