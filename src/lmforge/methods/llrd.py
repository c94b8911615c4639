"""Layer-wise learning-rate decay (ULMFiT, ELECTRA, BEiT): every parameter trains, lower layers slower.

With L transformer blocks and decay d, what comes after the blocks (final norm, output layer, task
head) trains at the base learning rate, the top block at d times it, block i (0 = the lowest) at
d^(L - i), and what comes before the blocks (the embeddings) at d^(L + 1). The general features of
the lower layers then move least, which keeps more of what pretraining learned. Parameters are
placed by the order the model registers them (embeddings, blocks, head), the same in every
`transformers` architecture with one stack of blocks.
"""

from __future__ import annotations

from torch import nn

from lmforge.config import MethodConfig
from lmforge.engine.optimizer import decay_groups
from lmforge.engine.runtime import repeated_blocks


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Each trainable parameter's learning-rate multiplier, by name."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("method.name llrd: an encoder-decoder model has two stacks of blocks, so 'lower' "
                         "is not one order; use full or freeze")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"method.name llrd: found no stack of transformer blocks in {type(model).__name__}")
    depth = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    scales, seen_blocks = {}, False
    for name, param in model.named_parameters():
        if id(param) in depth:
            seen_blocks = True
            scales[name] = decay ** (len(blocks) - depth[id(param)])
        else:  # before the first block: embeddings; after it: final norm and heads
            scales[name] = 1.0 if seen_blocks else decay ** (len(blocks) + 1)
    return scales


def apply(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    for param in model.parameters():
        param.requires_grad_(True)
    scales = layer_scales(model, cfg.llrd.decay)
    groups = []
    for scale in sorted(set(scales.values()), reverse=True):
        named = [(name, p) for name, p in model.named_parameters() if scales[name] == scale]
        groups += decay_groups(named, weight_decay, lr_scale=scale)
    return model, groups
