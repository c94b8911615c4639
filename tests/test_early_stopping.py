"""trainer.early_stopping: the run stops when a held-out metric stops improving, and the best
evaluation's weights (a checkpoint keep_last never removes) become the final model."""

from __future__ import annotations

from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

from .conftest import assert_cli_resume_is_exact, write_recipe


def _recipe(tmp_path, base_model, small_jsonl, early: dict, **trainer) -> str:
    return write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}, "packing": {"seq_len": 64},
        "trainer": {"max_steps": 30, "batch_size": 2, "lr": 3e-3, "eval_every": 2, "eval_batches": 2, "log_every": 2,
                    "keep_last": 1, "early_stopping": early, **trainer},
    }, {})


def test_a_metric_that_stops_improving_stops_the_run_and_keeps_the_best_weights(tmp_path, base_model, small_jsonl):
    # the loss falls, so read as "higher is better" it never improves on the first evaluation (step 2)
    recipe = _recipe(tmp_path, base_model, small_jsonl, {"metric": "loss", "mode": "max", "patience": 2})
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    val = read_metrics(run / "metrics.jsonl", "val")
    assert [r["step"] for r in val] == [0, 2, 4, 6] and val[2]["loss"] < val[1]["loss"]  # training did improve it
    assert read_metrics(run / "metrics.jsonl", "train")[-1]["step"] == 6  # stopped, not 30 steps
    assert "early stopping at step 6" in result.output and "the best was step 2" in result.output
    best = run / "checkpoints" / "step_00000002"
    assert best.is_dir()  # kept although keep_last is 1
    assert (run / "final" / "model.safetensors").read_bytes() != (run / "checkpoints" / "step_00000006" / "model.safetensors").read_bytes()
    from safetensors.torch import load_file

    final, saved = load_file(run / "final" / "model.safetensors"), load_file(best / "model.safetensors")
    saved.setdefault("model.embed_tokens.weight", saved.get("lm_head.weight"))  # a tied weight, saved under one name
    assert final.keys() <= saved.keys() and all((final[k] == saved[k]).all() for k in final)


def test_an_improving_metric_trains_to_the_end(tmp_path, base_model, small_jsonl):
    recipe = _recipe(tmp_path, base_model, small_jsonl, {"metric": "loss", "mode": "min", "patience": 50}, max_steps=8)
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 0 and "early stopping at" not in result.output, result.output
    assert read_metrics(tmp_path / "run" / "metrics.jsonl", "train")[-1]["step"] == 8


def test_early_stopping_resumes_exactly(tmp_path, base_model, small_jsonl):
    recipe = _recipe(tmp_path, base_model, small_jsonl, {"metric": "loss", "mode": "max", "patience": 2})
    assert_cli_resume_is_exact(recipe, tmp_path / "run", "model.safetensors", last_step=6)


def test_a_metric_the_objective_does_not_report_is_named(tmp_path, base_model, small_jsonl):
    recipe = _recipe(tmp_path, base_model, small_jsonl, {"metric": "accuracy", "mode": "max"})
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 2
    assert "trainer.early_stopping.metric: 'accuracy' is not among the held-out metrics" in result.output
    assert "loss" in result.output.split("reports (")[1]
    (tmp_path / "b").mkdir()
    bad = write_recipe(tmp_path / "b", base_model, {"trainer": {"early_stopping": {"metric": "loss", "patience": 0}}}, {})
    assert "patience" in CliRunner().invoke(app, ["check", bad]).output


def test_eval_every_epoch_reports_per_epoch_metrics(tmp_path, base_model, small_jsonl):
    recipe = write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1, "max_docs": 4}, "packing": {"seq_len": 64},
        "trainer": {"epochs": 2, "batch_size": 8, "eval_every": "epoch", "eval_batches": 2},
    }, {})
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 0, result.output
    val = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    steps = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")[-1]["step"]
    assert [r["epoch"] for r in val] == [0.0, 1.0, 2.0]  # the start (eval_at_start), then each epoch
    assert val[-1]["step"] == steps and val[1]["step"] == steps // 2
