"""The 8-bit frozen base (models/int8.py): its int8 products are exactly the quantized math, stay
close to fp32, and only frozen layers are replaced."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmforge.models import int8
from lmforge.models.int8 import Int8Linear, quantize_frozen_linears, quantize_rows


def _dequantized(rows: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_rows(rows)
    return q.double() * scale.double()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# on CUDA, 3 x 5 rows take the float fallback (its int8 kernels want more than 16 rows), 3 x 9 `_int_mm`
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("rows", [5, 9])
def test_int8_linear_computes_the_quantized_product_forward_and_backward(device, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(device)
    x = torch.randn(3, rows, 96, device=device, requires_grad=True)
    layer = Int8Linear(linear.weight, linear.bias)
    out = layer(x)
    # int32 sums are exact: the result is the product of the dequantized operands, to float rounding
    exact = _dequantized(x.detach().reshape(-1, 96)) @ _dequantized(linear.weight.detach()).t() + linear.bias.double()
    torch.testing.assert_close(out.detach().reshape(-1, 40).double(), exact, rtol=1e-5, atol=1e-5)
    assert _relative_error(out, linear(x)) < 0.02

    grad = torch.randn_like(out)
    out.backward(grad)
    qweight, scale = quantize_rows(linear.weight.detach())
    # dX = (dY * scale) @ Q with dY quantized per row
    expected = _dequantized(grad.reshape(-1, 40) * scale.reshape(1, -1)) @ qweight.double()
    torch.testing.assert_close(x.grad.reshape(-1, 96).double(), expected, rtol=1e-5, atol=1e-5)
    assert _relative_error(x.grad.reshape(-1, 96), grad.reshape(-1, 40) @ linear.weight.detach()) < 0.02
    assert layer.qweight.dtype == torch.int8 and not list(layer.parameters())


def test_int8_linear_follows_the_input_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=False)
    x = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True)
    out = Int8Linear(linear.weight, None)(x)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert _relative_error(out.float(), linear(x.float())) < 0.03


def test_fallback_product_equals_int_mm(monkeypatch):
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (33, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8)
    expected = torch._int_mm(a, b)
    monkeypatch.setattr(int8, "_int_mm_fits", lambda a, b: False)  # as on CUDA for shapes its kernels refuse
    assert torch.equal(int8.int8_matmul(a, b), expected)


def test_only_frozen_linear_layers_are_replaced_gpt2_conv1d_included():
    torch.manual_seed(0)
    block = nn.ModuleDict({"frozen": nn.Linear(24, 12), "trained": nn.Linear(24, 12), "conv": Conv1D(12, 24)})
    block.frozen.requires_grad_(False)
    block.conv.requires_grad_(False)
    x = torch.randn(4, 24)
    conv_out = block.conv(x)
    assert quantize_frozen_linears([block]) == 2
    assert isinstance(block.frozen, Int8Linear) and isinstance(block.conv, Int8Linear)
    assert type(block.trained) is nn.Linear
    assert _relative_error(block.conv(x), conv_out) < 0.02  # Conv1D stores its weight as (in, out)


def test_first_layer_input_gradient_is_skipped_when_nothing_needs_it(monkeypatch):
    layer = Int8Linear(torch.randn(8, 16), None)
    calls = []
    real = int8.int8_matmul
    monkeypatch.setattr(int8, "int8_matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    adapter = nn.Parameter(torch.ones(8))
    (layer(torch.randn(3, 16)) * adapter).sum().backward()
    assert calls == [(3, 16)] and adapter.grad is not None  # the forward product only


@pytest.mark.parametrize("shape", [(1, 16), (2, 3, 16)])
def test_any_number_of_rows(shape):
    layer = Int8Linear(torch.randn(8, 16), torch.randn(8))
    assert layer(torch.randn(*shape)).shape == (*shape[:-1], 8)
