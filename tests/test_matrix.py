"""A pipeline stage repeated over the values of any recipe key (`matrix:`), as over seeds: a label-budget
curve, drawn by the report (issue 32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ConfigError
from lmforge.pipeline_recipe import load_pipeline

runner = CliRunner()
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def _spec(root: Path, tokenizer_dir: Path, genre_file: Path, **task) -> dict:
    return {"name": "curve", "output_dir": str(root / "runs"),
            "defaults": {"packing": {"seq_len": 48}, "tokenizer": {"path": str(tokenizer_dir)},
                         "trainer": {"batch_size": 8, "epochs": 2, "lr": 2e-3, "progress": False, "precision": "fp32"}},
            "stages": {"task": {"model": {"family": "bert", "preset": "tiny", "overrides": TINY_BERT},
                                "objective": {"name": "classify"}, "seeds": [0, 1],
                                "matrix": {"data.max_docs": [16, 48]},
                                "data": {"train_files": [str(genre_file)], "label_column": "genre", "val_fraction": 0.3},
                                **task},
                       "more": {"after": "task", "objective": {"name": "classify"}, "trainer": {"max_steps": 2},
                                "data": {"train_files": [str(genre_file)], "label_column": "genre", "val_fraction": 0.3}}}}


def _write(root: Path, spec: dict) -> Path:
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_matrix_repeats_a_stage_and_what_follows_per_value(tmp_path, tokenizer_dir, genre_file):
    pipeline = load_pipeline(_write(tmp_path, _spec(tmp_path, tokenizer_dir, genre_file)))
    labels = [r.label for r in pipeline.runs]
    assert labels == ["task/max_docs_16/seed_0", "task/max_docs_16/seed_1", "task/max_docs_48/seed_0",
                      "task/max_docs_48/seed_1", "more/max_docs_16/seed_0", "more/max_docs_16/seed_1",
                      "more/max_docs_48/seed_0", "more/max_docs_48/seed_1"]
    for run in pipeline.runs:
        assert run.folder == tmp_path / "runs" / run.label
        assert run.recipe.seed == run.seed
    task = {r.label: r for r in pipeline.runs if r.stage == "task"}
    assert task["task/max_docs_16/seed_1"].recipe.data.max_docs == 16
    assert task["task/max_docs_48/seed_0"].recipe.data.max_docs == 48
    more = next(r for r in pipeline.runs if r.label == "more/max_docs_48/seed_1")
    assert more.parent.label == "task/max_docs_48/seed_1" and more.point == {"data.max_docs": 48}
    assert more.recipe.data.max_docs is None  # the value belongs to the stage that varies it


def test_a_varied_length_replaces_the_defaults_one(tmp_path, tokenizer_dir, genre_file):
    spec = _spec(tmp_path, tokenizer_dir, genre_file, matrix={"trainer.max_steps": [2, 4], "trainer.lr": [1e-3, 3e-3]})
    runs = [r for r in load_pipeline(_write(tmp_path, spec)).runs if r.stage == "task"]
    assert len(runs) == 8 and runs[0].label == "task/max_steps_2/lr_0.001/seed_0"
    assert {(r.recipe.trainer.max_steps, r.recipe.trainer.epochs, r.recipe.trainer.lr) for r in runs} == {
        (2, None, 1e-3), (2, None, 3e-3), (4, None, 1e-3), (4, None, 3e-3)}


@pytest.mark.parametrize(("matrix", "match"), [
    ({"data.max_docs": []}, r"stages.task.matrix.data.max_docs: expected a list of values"),
    ({"data.max_docs": [8, 8]}, r"values repeat"),
    ({"seed": [1, 2]}, r"stages.task.matrix.seed: not a key to vary"),
    ([16, 48], r"stages.task.matrix: expected a mapping of recipe keys"),
    ({"data.max_doc": [8]}, r"unknown key 'data.max_doc'; did you mean 'data.max_docs'"),
])
def test_a_bad_matrix_is_refused_naming_the_stage_and_key(tmp_path, tokenizer_dir, genre_file, matrix, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(_write(tmp_path, _spec(tmp_path, tokenizer_dir, genre_file, matrix=matrix)))


def test_a_matrix_under_a_matrix_is_refused(tmp_path, tokenizer_dir, genre_file):
    spec = _spec(tmp_path, tokenizer_dir, genre_file)
    spec["stages"]["more"]["matrix"] = {"trainer.lr": [1e-3, 2e-3]}
    with pytest.raises(ConfigError, match=r"stages.more.matrix: its parent 'task' is already repeated over a matrix"):
        load_pipeline(_write(tmp_path, spec))


def test_a_label_budget_curve_runs_and_the_report_draws_it(tmp_path, tokenizer_dir, genre_file):
    spec = _spec(tmp_path, tokenizer_dir, genre_file)
    del spec["stages"]["more"]
    path = _write(tmp_path, spec)
    planned = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert all(f"task/max_docs_{n}/seed_{s}" in planned.output for n in (16, 48) for s in (0, 1))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs"
    for n in (16, 48):
        evaluation = json.loads((runs / "task" / f"max_docs_{n}" / "seed_0" / "eval.json").read_text())
        assert evaluation["tasks"]["task"]["after"]["examples"] > 0
        assert f"data: {n} training rows (data.max_docs: a label budget of {n})" in result.output
    rows = {json.loads((runs / "task" / f"max_docs_{n}" / f"seed_{s}" / "eval.json").read_text())["tasks"]["task"]
            ["after"]["rows"] for n in (16, 48) for s in (0, 1)}
    assert len(rows) == 1  # every budget scored on the same held-out rows
    page = tmp_path / "report.html"
    report = runner.invoke(app, ["report", str(runs), "-o", str(page)])
    assert report.exit_code == 0, report.output
    html = page.read_text()
    assert "Learning curves: accuracy against the varied setting" in html
    assert "task max_docs=48 − task max_docs=16: accuracy" in html and "shared held-out rows and 2 + 2 seeds" in html
