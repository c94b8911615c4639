import math

import pytest
import torch

from lmforge.engine.optimizer import build_optimizer, decay_groups, lr_factor


def test_warmup_then_cosine_values():
    f = lr_factor("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = lr_factor("linear", 0, 100, 0.0)
    assert [lin(0), lin(50), lin(100)] == pytest.approx([1.0, 0.5, 0.0])
    const = lr_factor("constant", 5, 100)
    assert const(2) == pytest.approx(0.6) and const(99) == 1.0


def test_cosine_with_restarts_restarts():
    f = lr_factor("cosine_with_restarts", 0, 100, 0.0, num_cycles=2)
    assert f(0) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.5)
    assert f(49) < 0.01
    assert f(50) == pytest.approx(1.0)
    assert f(75) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_decay_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = decay_groups(model.named_parameters(), 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in groups) == 4


def test_frozen_parameters_left_out_and_empty_refused():
    model = torch.nn.Linear(4, 4)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(decay_groups(model.named_parameters(), 0.1), 1e-3, (0.9, 0.95), 1e-8)


def test_lr_scale_applies():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(decay_groups(model.named_parameters(), 0.0, lr_scale=0.5), 1e-3, (0.9, 0.95), 1e-8)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)


def test_training_length_in_steps_tokens_or_epochs():
    from lmforge.config import TrainerConfig
    from lmforge.engine.loop import resolve_total_steps

    # 100 batches per epoch, 2,048 tokens per batch, 2 micro-batches per optimizer step
    assert resolve_total_steps(TrainerConfig(max_steps=7, grad_accum=2), 100, 2048) == 7
    assert resolve_total_steps(TrainerConfig(max_tokens=10 * 4096, grad_accum=2), 100, 2048) == 10
    assert resolve_total_steps(TrainerConfig(max_tokens=10 * 4096 + 1, grad_accum=2), 100, 2048) == 11
    assert resolve_total_steps(TrainerConfig(epochs=1.5, grad_accum=2), 100, 2048) == 75
    assert resolve_total_steps(TrainerConfig(grad_accum=1), 100, 2048) == 100  # one epoch by default
