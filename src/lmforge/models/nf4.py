"""A 4-bit NF4 frozen base for LoRA (`method.lora.base_dtype: nf4`): QLoRA (Dettmers et al. 2023).

Each frozen `nn.Linear` of the transformer blocks becomes bitsandbytes' `Linear4bit`: its weight in
4-bit NormalFloat with one absmax scale per 64 values (the scales themselves in 8 bits: QLoRA's
double quantization), dequantized to the compute dtype for every
product. The adapters train in fp32 against that quantized base and are saved in peft's format, so
they load (and merge) onto the float base later, as QLoRA's do. The embeddings, norms, output layer
and task heads stay in floating point, as transformers' own 4-bit loading leaves them (the test
compares the two).

bitsandbytes runs this on CUDA and, since 0.46, on the CPU (its CPU backend dequantizes in plain
PyTorch where no fused kernel is found). It is an optional dependency: without it a recipe asking for
nf4 stops with the install line, never silently falls back to another dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn


def _bitsandbytes():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend's note on an optional hub kernel
        import bitsandbytes
    except ImportError:
        raise ValueError("method.lora.base_dtype nf4 needs bitsandbytes: pip install 'bitsandbytes>=0.46' "
                         "(or pip install 'lmforge[qlora]')") from None
    return bitsandbytes


def quantize_frozen_linears_nf4(modules: Iterable[nn.Module], compute_dtype: torch.dtype) -> int:
    """Replace the frozen `nn.Linear` layers inside `modules` by NF4 `Linear4bit`s; returns how many."""
    bnb = _bitsandbytes()
    count = 0
    for module in modules:
        for name, child in list(module.named_modules()):
            if type(child) is not nn.Linear or child.weight.requires_grad:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
            # compress_statistics: QLoRA's double quantization (the per-block scales themselves in 8 bits)
            quantized.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for its inference kernel at the first
            # forward in eval mode under no_grad, for good; training after such an evaluation then runs that
            # kernel, which has no backward (and fails on biases). Held-out evaluations happen mid-training.
            quantized.support_avx512bf16_for_cpu = False
            quantized = quantized.to(device)  # Params4bit quantizes when moved to its device
            if quantized.weight.dtype != torch.uint8:
                raise RuntimeError(f"bitsandbytes did not quantize {name} on {device}")
            setattr(parent, attr, quantized)
            count += 1
    return count
