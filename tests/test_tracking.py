"""`trainer.tracking: mlflow`: params, every metric and the final model in a local MLflow store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

from .conftest import write_recipe

pytest.importorskip("mlflow")


def test_a_run_is_tracked_in_a_local_sqlite_store(tmp_path, base_model, small_jsonl):
    from mlflow.tracking import MlflowClient

    recipe = write_recipe(tmp_path, base_model, {
        "name": "tracked", "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
        "trainer": {"max_steps": 6, "batch_size": 2, "log_every": 2, "eval_every": 3, "tracking": "mlflow"},
        "packing": {"seq_len": 64},
    }, {})
    result = CliRunner().invoke(app, ["run", recipe])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    assert "tracked in MLflow" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracked"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "6" and run.data.params["trainer.lr"] == json.dumps(0.001)
    for split in ("train", "val"):  # every record of metrics.jsonl, at its step
        logged = read_metrics(run_dir / "metrics.jsonl", split)
        history = client.get_metric_history(run.info.run_id, f"{split}/loss")
        assert [(m.step, round(m.value, 6)) for m in history] == [(r["step"], round(r["loss"], 6)) for r in logged]
    assert "summary/tokens_per_second" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors"} <= artifacts
    assert (run_dir / "mlartifacts").is_dir()  # beside the store, not in the working directory


def test_tracking_leaves_the_train_key_alone(tmp_path, base_model, small_jsonl):
    """Turning tracking on for a trained recipe does not retrain it."""
    sections = {"data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
                "trainer": {"max_steps": 2, "batch_size": 2}, "packing": {"seq_len": 64}}
    recipe = write_recipe(tmp_path, base_model, sections, {})
    assert CliRunner().invoke(app, ["run", recipe]).exit_code == 0
    again = CliRunner().invoke(app, ["run", recipe, "trainer.tracking=mlflow"])
    assert again.exit_code == 0 and "up to date" in again.output, again.output
