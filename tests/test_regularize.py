"""Regularizers that keep what the starting model knew (L2-SP)."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import Recipe
from lmforge.engine.metrics import read_metrics
from lmforge.objectives.regularize import Regularized, l2sp_penalty

from .conftest import REPO, write_recipe

INSTRUCTIONS = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


def test_l2sp_term_value_gradient_and_training_only():
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    penalty = l2sp_penalty(params, strength=0.5)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    value = penalty()
    expected = 0.25 * sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
    torch.testing.assert_close(value, expected)
    value.backward()
    for p, s in zip(params, start, strict=True):
        torch.testing.assert_close(p.grad, 0.5 * (p.detach() - s))  # strength * (p - p_start)

    class Zero:
        name = "zero"

        def loss(self, model, batch):
            return torch.zeros(()), {"tokens": torch.tensor(1)}

    wrapped = Regularized(Zero(), penalty)
    assert wrapped.name == "zero"  # everything but the loss is the wrapped objective's
    layer.train()
    torch.testing.assert_close(wrapped.loss(layer, {})[0], expected)
    layer.eval()  # evaluation reports the objective's own loss
    assert wrapped.loss(layer, {})[0] == 0


def _distance_from_base(run, base) -> float:
    start, end = load_file(base / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    return sum(((end[k] - start[k]) ** 2).sum().item() for k in end) ** 0.5


def test_l2sp_keeps_the_weights_near_the_start_and_still_learns(tmp_path, base_model):
    runs = {}
    for strength in (0.0, 1.0):
        out = tmp_path / f"l2sp_{strength}"
        out.mkdir()
        recipe = write_recipe(out, base_model, {
            "data": {"train_files": [str(INSTRUCTIONS)], "val_fraction": 0.05}, "objective": {"name": "sft"},
            "trainer": {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 20, "eval_batches": 4},
            "regularize": {"l2sp": strength},
        }, {})
        result = CliRunner().invoke(app, ["run", recipe])
        assert result.exit_code == 0, result.output
        runs[strength] = ([r["loss"] for r in read_metrics(out / "run" / "metrics.jsonl", "val")],
                          _distance_from_base(out / "run", base_model))
    (free_losses, free_distance), (kept_losses, kept_distance) = runs[0.0], runs[1.0]
    # measured: 1.13 vs 22.0 from the base weights; held-out answer loss 6.26 -> 5.46 (free: 5.15)
    assert kept_losses[0] == free_losses[0]  # the validation loss carries no penalty
    assert kept_distance < 0.2 * free_distance
    assert kept_losses[-1] < kept_losses[0] - 0.3


def test_l2sp_refused_under_fsdp():
    with pytest.raises(ValidationError, match="regularize.l2sp: not with trainer.strategy fsdp"):
        Recipe(regularize={"l2sp": 0.1}, trainer={"strategy": "fsdp"})
