"""A tiny recipe through the CLI: tokenizer -> prepare -> train -> eval -> generate, plus `run`."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

from .conftest import REPO

runner = CliRunner()
PRECISION = "trainer.precision=fp32"


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _tiny_recipe(tmp_path, corpus, **trainer):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "tokenizer": {"train_files": [str(corpus)], "vocab_size": 512},
        "data": {"train_files": [str(corpus)], "val_fraction": 0.1},
        "model": {"family": "llama", "preset": "tiny",
                  "overrides": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "intermediate_size": 256}},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 120, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "eval_every": 20,
                    "eval_batches": 4, "log_every": 5, "save_every": 20, "progress": False, **trainer},
        "generate": {"prompts": ["The jury"], "max_new_tokens": 8},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_commands_end_to_end(tmp_path, small_jsonl):
    tok, data = tmp_path / "tok", tmp_path / "data"
    assert "tokens saved" in _invoke("tokenizer", small_jsonl, "--out", tok, "--vocab-size", 512)
    out = _invoke("prepare", small_jsonl, "--tokenizer", tok, "--out", data, "--val-fraction", 0.1)
    assert "train" in out and "tokens/s" in out
    recipe = _tiny_recipe(tmp_path, small_jsonl)
    _invoke("train", recipe, PRECISION, f"tokenizer.path={tok}", "tokenizer.train_files=[]", "data.train_files=[]",
            f"data.prepared_dir={data}")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert losses[-1] < losses[0] - 0.5
    final = tmp_path / "run" / "final"
    out = _invoke("eval", "--model", final, "--data", data, "--seq-len", 64)
    loss = float(out.split("loss ")[1].split()[0])
    entropy = float(out.split("unigram entropy ")[1].split()[0])
    assert loss < entropy - 0.2  # learned more than token frequencies
    out = _invoke("generate", "--model", final, "--prompt", "The jury", "--max-new-tokens", 8, "--temperature", 0)
    assert out.startswith("The jury") and len(out.strip()) > len("The jury")
    sampled = _invoke("generate", "--model", final, "--prompt", "The jury", "--max-new-tokens", 8,
                      "--temperature", 1.0, "--top-k", 20, "--top-p", 0.9, "--seed", 3)
    assert sampled.startswith("The jury")
    # a training checkpoint samples too (its tokenizer given), and matches the final model at the last step
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000120"
    result = runner.invoke(app, ["generate", "--model", str(checkpoint), "--prompt", "The jury", "--temperature", "0"])
    assert result.exit_code == 2 and "pass --tokenizer" in result.output
    assert _invoke("generate", "--model", checkpoint, "--tokenizer", tok, "--prompt", "The jury",
                   "--max-new-tokens", 8, "--temperature", 0) == out


def test_run_recipe_then_rerun_skips(tmp_path, small_jsonl):
    recipe = _tiny_recipe(tmp_path, small_jsonl, max_steps=10, eval_every=10)
    out = _invoke("run", recipe)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train"]["steps"] == 10 and summary["samples"]["The jury"]
    assert "unigram entropy" in out
    out = _invoke("run", recipe)
    assert "up to date" in out


def test_cli_reports_bad_recipe_key(tmp_path, small_jsonl):
    recipe = _tiny_recipe(tmp_path, small_jsonl)
    result = runner.invoke(app, ["train", str(recipe), "trainer.warmup=3"])
    assert result.exit_code == 2
    assert "trainer.warmup" in result.output and "did you mean 'trainer.warmup_steps'" in result.output


def test_help_on_every_command():
    for command in ("tokenizer", "prepare", "train", "eval", "generate", "run"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_version_and_env_describe_the_install_and_the_machine():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lmforge {version('lmforge')}"
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert "torch " in result.output and "precision auto -> " in result.output and "device: " in result.output


def test_recipes_lists_describes_and_copies_without_overwriting(tmp_path):
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0 and "quickstart " in result.output and "smollm2_sft" in result.output
    result = CliRunner().invoke(app, ["recipes", "quickstart", "--copy", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "quickstart.yaml"
    assert "tokenizer" in copied.read_text()
    copied.write_text("mine")
    result = CliRunner().invoke(app, ["recipes", "quickstart", "--copy", str(copied)])
    assert result.exit_code == 2 and "does not overwrite" in result.output and copied.read_text() == "mine"
    result = CliRunner().invoke(app, ["recipes", "nope"])
    assert result.exit_code == 2 and "no bundled recipe 'nope'" in result.output


def test_make_quickstart_passes_its_args_to_the_recipe():
    """`make quickstart ARGS="trainer.max_steps=100"`: the overrides reach `lmforge run` (make -n prints the
    command without running it; -o keeps the install step out)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", "quickstart", "ARGS=trainer.max_steps=100 data.max_docs=20"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "lmforge run recipes/quickstart.yaml trainer.max_steps=100 data.max_docs=20" in out


def test_ctrl_c_after_training_keeps_the_model_and_the_rerun_only_evaluates(tmp_path, small_jsonl, monkeypatch):
    """Ctrl-C in the final evaluation: a clear line and exit 130, no traceback; the trained model stays, and the
    same command again skips the training and evaluates."""
    from lmforge import pipeline

    recipe = _tiny_recipe(tmp_path, small_jsonl, max_steps=4, eval_every=4, save_every=4)
    real_eval = pipeline.eval_stage

    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "eval_stage", pressed_ctrl_c)
    result = runner.invoke(app, ["run", str(recipe), PRECISION])
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C): what had finished is kept" in result.output and "Traceback" not in result.output
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    monkeypatch.setattr(pipeline, "eval_stage", real_eval)
    again = _invoke("run", recipe, PRECISION)
    assert "up to date for this recipe and data; skipping" in again and "eval: validation loss" in again
