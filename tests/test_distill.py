"""Knowledge distillation: the KL term against TRL's, a student that moves toward its teacher."""

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ObjectiveConfig
from lmforge.engine.metrics import read_metrics
from lmforge.objectives.distill import Distillation, distillation_kl

from .conftest import write_recipe


def test_kl_matches_trl_forward_kl():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    torch.manual_seed(0)
    hidden_s, hidden_t = torch.randn(2, 7, 16), torch.randn(2, 7, 24)  # the teacher may be wider
    head_s, head_t = torch.randn(50, 16), torch.randn(50, 24)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    ours = distillation_kl(hidden_s @ head_s.T, hidden_t @ head_t.T, mask, temperature=2.0)
    theirs, _, _ = _chunked_divergence_loss(hidden_s, hidden_t, head_s, head_t, mask.long(), beta=0.0, temperature=2.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_student_moves_toward_its_teacher(tmp_path, base_model, small_jsonl):
    """Pure distillation (alpha 1) of a from-scratch student of another shape: the training loss,
    T^2 * KL(teacher || student), falls; evaluation reports the student's own next-token loss."""
    recipe = write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
        "model": {"family": "llama", "preset": "tiny", "overrides": {"num_hidden_layers": 2}},
        "objective": {"name": "distill", "teacher": str(base_model), "distill_alpha": 1.0, "distill_temperature": 2.0},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 30, "eval_batches": 4,
                    "log_every": 1},
    }, {})
    result = CliRunner().invoke(app, ["run", recipe])
    assert result.exit_code == 0, result.output
    train = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    val = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    # measured: 0.101 -> 0.050 (means of the first and last three steps)
    assert sum(train[-3:]) / 3 < 0.6 * sum(train[:3]) / 3
    assert val[-1]["ppl"] > 1  # the student's own perplexity


def test_refusals(base_model):
    with pytest.raises(ValidationError, match="teacher: the distill objective needs"):
        ObjectiveConfig(name="distill")
    objective = Distillation(ObjectiveConfig(name="distill", teacher=str(base_model)))
    with pytest.raises(Exception, match="distillation needs one vocabulary"):
        objective.teacher(torch.device("cpu"), vocab_size=7)
