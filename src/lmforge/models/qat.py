"""Quantization-aware training (recipe section `qat`) and post-training quantization, both torchao's.

The scheme: int8 activations quantized per token on the fly (dynamic, asymmetric) and int8 (one
scale per output channel) or int4 (one scale per `group_size` weights) symmetric weights, for the
linear layers of the transformer blocks; embeddings, norms, the output layer and task heads stay in
float (they are a small share of the products and the most sensitive to rounding).

QAT: before training, torchao's `QATConfig(step="prepare")` swaps those layers for fake-quantized
ones, which round activations and weights to the scheme's grid in the forward pass and let the
gradient through unchanged (straight-through), so the weights learn to sit well on the grid. The
saved checkpoint (`final/`) holds those float weights; at the end they are converted to a real
quantized model (`quantized/`: torchao tensors in safetensors, read by plain
`transformers.AutoModel*.from_pretrained` with torchao installed). The conversion is exactly
post-training quantization with the same scheme, so `lmforge export --format torchao` applied to any
float model is the PTQ baseline the QAT model is compared against.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lmforge.engine.runtime import repeated_blocks


def torchao():
    """torchao, quiet: it logs a warning for every optional CUDA kernel library it cannot load here."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        raise ValueError("qat / --format torchao need torchao: pip install 'torchao>=0.14' "
                         "(or pip install 'lmforge[qat]')") from None
    return torchao


def scheme(weights: str, group_size: int):
    """torchao's config: int8 dynamic activations with int8 per-channel or int4 per-group weights."""
    torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if weights == "int8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


def block_linears(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the blocks' linear layers, names of every other linear layer) of `model`."""
    inside = {id(m) for block in repeated_blocks(model) for m in block.modules() if isinstance(m, nn.Linear)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n, m in linears if id(m) in inside], [n for n, m in linears if id(m) not in inside]


def check_group_size(model: nn.Module, weights: str, group_size: int, where: str) -> None:
    if weights != "int4":
        return
    names, _ = block_linears(model)
    for name in names:
        width = model.get_submodule(name).in_features
        if width % group_size:
            raise ValueError(f"{where}: group_size {group_size} does not divide the input width {width} of {name}")


def prepare(model: nn.Module, weights: str, group_size: int) -> int:
    """Fake-quantize the blocks' linear layers in place for training; returns how many."""
    torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names, _ = block_linears(model)
    if not names:
        raise ValueError("qat: found no linear layers in a stack of transformer blocks")
    check_group_size(model, weights, group_size, "qat")
    chosen = set(names)
    quantize_(model, QATConfig(scheme(weights, group_size), step="prepare"), filter_fn=lambda m, fqn: fqn in chosen)
    return len(names)


def quantized_from_pretrained(folder, auto_class, weights: str, group_size: int) -> nn.Module:
    """A float checkpoint loaded as a real quantized model (the blocks' linears only): transformers'
    torchao integration quantizes while loading, and can save the result."""
    from transformers import AutoConfig, TorchAoConfig

    torchao()
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        skeleton = auto_class.from_config(config)
    names, others = block_linears(skeleton)
    if not names:
        raise ValueError(f"{folder}: found no linear layers in a stack of transformer blocks to quantize")
    check_group_size(skeleton, weights, group_size, "--dtype")
    quantization = TorchAoConfig(scheme(weights, group_size), modules_to_not_convert=others or None)
    return auto_class.from_pretrained(str(folder), quantization_config=quantization, device_map="cpu",
                                      dtype=torch.float32, local_files_only=True).eval()
