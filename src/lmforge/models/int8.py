"""An 8-bit frozen base for LoRA (`method.lora.base_dtype: int8`): int8 weights, int8 matmuls.

Each frozen `nn.Linear` of the transformer blocks keeps its weight as int8 with one scale per output
channel. Inputs are quantized per token (per row) on the fly, and the product runs on the int8 units
(`torch._int_mm`: VNNI on x86 CPUs, int8 tensor cores on GPUs) with exact int32 sums, rescaled to
float. The weight is frozen, so the backward pass needs only the input gradient: the same int8
product with the gradient quantized per row (the "SwitchBack" recipe, Wortsman et al. 2023).

Why: on CPUs without a fast bf16 path the frozen GEMMs are most of a LoRA step, and int8 runs them
2-3x faster than fp32, quantization included, when `trainer.compile: blocks` fuses the quantizing
and rescaling passes into few kernels (eagerly they cost most of the gain; the README's performance
table has the measured steps). The price is the quantization error: SmolLM2-135M's held-out loss
rises by ~0.03 nats (0.7%) before training, 0.01 after 100 LoRA steps. The adapters are trained
against the quantized base and saved in peft's format, like QLoRA's.

Only the blocks: the output layer stays fp32, because per-row int8 of its gradient (softmax minus
one-hot) rounds the many small probabilities to zero, and training on that gradient raised the loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

_INT8_MAX = 127.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of a 2-D tensor and each row's scale (its absolute maximum / 127)."""
    x = x.float()
    # amax and amin, not abs().amax() (a full-size temporary) nor aminmax (8x slower on CPU);
    # in place after the division: eager mode pays for every temporary
    high, low = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    scale = torch.maximum(high, low.neg_()).clamp_min_(torch.finfo(torch.float32).tiny).div_(_INT8_MAX)
    return torch.div(x, scale).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


def _int_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # CUDA's int8 kernels need more than 16 rows and dimensions in multiples of 8; the CPU takes any shape
    return a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32."""
    if _int_mm_fits(a, b):
        if a.device.type == "cuda" and b.stride(0) != 1:
            # cuBLASLt's int8 kernels want B column-major (the "TN" layout); a copy of B is cheap next
            # to the product (the input gradient's frozen weight, once per backward)
            b = b.t().contiguous().t()
        return torch._int_mm(a, b)
    # float32 holds these sums exactly while K * 127^2 < 2^24 (K < 1040), closely beyond
    return (a.float() @ b.float()).round().to(torch.int32)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (scale * qweight).T in float32 for (M, in) rows, x quantized per row."""
    rows, row_scale = quantize_rows(x)
    return int8_matmul(rows, qweight.t()).float().mul_(row_scale).mul_(scale)  # not int32 * float: 1.3x slower


def int8_linear_input_grad(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad @ (scale * qweight) for (M, out) rows: dX = (dY * scale) @ Q, the scales moved onto dY's
    columns and dY quantized per row. The weight is frozen: its gradient is never needed."""
    rows, row_scale = quantize_rows(grad * scale)
    return int8_matmul(rows, qweight).float().mul_(row_scale)


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.input_dtype = x.dtype
        out = int8_linear(x.reshape(-1, x.shape[-1]), qweight, scale)
        return out.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:  # the first block's input (frozen embeddings): nothing to do
            return None, None, None
        qweight, scale = ctx.saved_tensors
        grad_input = int8_linear_input_grad(grad.reshape(-1, grad.shape[-1]), qweight, scale)
        return grad_input.reshape(*grad.shape[:-1], qweight.shape[1]).to(ctx.input_dtype), None, None


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 weights with per-output-channel scales (a quarter of fp32's memory)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """`weight` as `nn.Linear` holds it: (out_features, in_features)."""
        super().__init__()
        qweight, scale = quantize_rows(weight.detach())
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.reshape(1, -1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8LinearFunction.apply(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _frozen_linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a frozen `nn.Linear` or GPT-2 `Conv1D` (which stores it transposed)."""
    if type(module) is nn.Linear and not module.weight.requires_grad:
        return module.weight
    if type(module) is Conv1D and not module.weight.requires_grad:
        return module.weight.t()
    return None


def quantize_frozen_linears(modules: Iterable[nn.Module]) -> int:
    """Replace every frozen linear layer inside `modules` (the transformer blocks) by an `Int8Linear`,
    in place; trainable layers (LoRA's A and B) stay as they are. Returns how many were replaced."""
    replaced = 0
    for module in modules:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                weight = _frozen_linear_weight(child)
                if weight is not None:
                    setattr(parent, name, Int8Linear(weight, child.bias))
                    replaced += 1
    return replaced
