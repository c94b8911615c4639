"""Every shipped recipe runs end to end (shortened to a few steps on a slice of its data)."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app

from .conftest import REPO

# recipes that start from another recipe's output run in the chains below
CHAINED = {"cpt_domain.yaml", "sft_instructions.yaml", "lora_instructions.yaml", "dpo_instructions.yaml",
           "reward_instructions.yaml"}
# pipelines (recipes with stages:) run in their own tests: test_lifecycle, test_case_study
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name not in CHAINED and "stages" not in yaml.safe_load(p.read_text()))
SHORT = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.progress=false",
         "trainer.warmup_steps=1", "trainer.save_every=2", "generate.max_new_tokens=2"]


def _run(recipe: Path, out: Path, *extra: str) -> str:
    args = ["run", str(recipe), f"output_dir={out}", *SHORT, *extra]
    if yaml.safe_load(recipe.read_text()).get("tokenizer", {}).get("train_files"):
        args.append("tokenizer.max_docs=12")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "final" / "config.json").is_file() or (out / "final" / "adapter_config.json").is_file()
    return result.output


@pytest.mark.parametrize("recipe", [  # grpo's rollouts make it the slowest by far: CI runs it
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem == "smollm2_grpo" else []) for p in RECIPES])
def test_shipped_recipe_runs(tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repo root
    data = yaml.safe_load(recipe.read_text()).get("data", {})
    extra = ["data.max_docs=20"] if data.get("train_files") and "pair_column" not in data else []
    output = _run(recipe, tmp_path / recipe.stem, *extra)
    assert "eval" in output


def test_continual_pretraining_recipes_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    general = tmp_path / "general"
    _run(REPO / "recipes" / "cpt_general.yaml", general, "data.max_docs=20")
    domain = yaml.safe_load((REPO / "recipes" / "cpt_domain.yaml").read_text())
    domain["tokenizer"]["path"] = domain["model"]["path"] = str(general / "final")
    domain["data"]["mixture"][1]["prepared_dir"] = str(general / "data")
    domain["data"]["max_docs"] = 10
    path = tmp_path / "cpt_domain.yaml"
    path.write_text(yaml.safe_dump(domain))
    output = _run(path, tmp_path / "domain")
    assert "eval [python_docs]" in output and "eval [general]" in output


def test_instruction_tuning_recipes_start_from_the_quickstart_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    base = tmp_path / "quickstart"
    _run(REPO / "recipes" / "quickstart.yaml", base, "data.max_docs=20")
    for name in ("sft_instructions", "lora_instructions"):
        output = _run(REPO / "recipes" / f"{name}.yaml", tmp_path / name, f"model.path={base / 'final'}",
                      f"tokenizer.path={base / 'final'}", "data.max_docs=200")
        assert "grouped by length" in output and "sample: " in output
    assert (tmp_path / "lora_instructions" / "final" / "adapter_model.safetensors").is_file()
    sft = tmp_path / "sft_instructions" / "final"
    for name in ("dpo_instructions", "reward_instructions"):
        output = _run(REPO / "recipes" / f"{name}.yaml", tmp_path / name, f"model.path={sft}", f"tokenizer.path={sft}",
                      "data.max_docs=40")
        assert "preference pairs" in output
