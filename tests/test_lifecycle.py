"""Staged pipelines: branches and seeds, skipping what is up to date, rerunning what changed, resuming an
interrupted stage, forgetting measured before and after each stage, and the report as a browser shows it."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ConfigError
from lmforge.eval.intervals import (
    accuracy_change,
    classification_intervals,
    excludes_zero,
    perplexity_interval,
)
from lmforge.pipeline_recipe import load_pipeline

from .conftest import REPO

TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def _numbers_corpus(path: Path, docs: int = 40) -> Path:
    """A 'domain' nothing like Brown: lines of numbers. Training on it alone makes a model forget English."""
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(str(rng.randint(0, 99)) for _ in range(300))}) + "\n"
                            for _ in range(docs)))
    return path


def _pipeline(root: Path, small_jsonl: Path, tokenizer_dir: Path, genre_file: Path, **changes) -> Path:
    spec = {
        "name": "tinycase", "output_dir": str(root / "runs"),
        "vars": {"general": str(small_jsonl), "domain": str(_numbers_corpus(root / "numbers.jsonl")),
                 "task": str(genre_file)},
        "defaults": {"packing": {"seq_len": 64},
                     "trainer": {"batch_size": 8, "max_steps": 12, "lr": 2e-3, "progress": False, "precision": "fp32"}},
        "stages": {
            "pretrain": {"tokenizer": {"path": str(tokenizer_dir)},
                         "model": {"family": "bert", "preset": "tiny", "overrides": TINY_BERT},
                         "objective": {"name": "mlm"}, "data": {"train_files": ["${general}"], "val_fraction": 0.1},
                         "trainer": {"max_steps": 40}},
            "continual": {"after": "pretrain", "objective": {"name": "mlm"},
                          "data": {"train_files": ["${domain}"], "val_fraction": 0.1}, "trainer": {"lr": 5e-3, "max_steps": 30}},
            "direct": {"after": "pretrain", "seeds": [0, 1], "objective": {"name": "classify"},
                       "data": {"train_files": ["${task}"], "label_column": "genre", "val_fraction": 0.3}},
            "adapted": {"after": "continual", "seeds": [0, 1], "objective": {"name": "classify"},
                        "data": {"train_files": ["${task}"], "label_column": "genre", "val_fraction": 0.3}},
        },
    }
    for key, value in changes.items():
        spec[key] = value
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def ran(tmp_path_factory, small_jsonl, tokenizer_dir, genre_file):
    root = tmp_path_factory.mktemp("lifecycle")
    path = _pipeline(root, small_jsonl, tokenizer_dir, genre_file)
    code, output = _invoke("run", str(path))
    assert code == 0, output
    return path, root / "runs", output


def test_branches_and_seeds_each_get_a_folder_and_start_from_their_parent(ran):
    path, runs, output = ran
    layout = json.loads((runs / "pipeline.json").read_text())
    # the pipeline's own live record (what the board shows a stage by before its folder is a run) ends finished,
    # and every stage's run ended its evaluating phase
    assert {k: v for k, v in json.loads((runs / "pipeline_status.json").read_text()).items()
            if k in ("stage", "phase")} == {"stage": None, "phase": "finished"}
    assert all(json.loads((runs / s["folder"] / "status.json").read_text()).get("phase") is None for s in layout["stages"])
    assert [s["label"] for s in layout["stages"]] == [
        "pretrain", "continual", "direct/seed_0", "direct/seed_1", "adapted/seed_0", "adapted/seed_1"]
    for stage in layout["stages"]:
        recipe = yaml.safe_load((runs / stage["folder"] / "recipe.yaml").read_text())
        if stage["parent"]:
            parent = next(s for s in layout["stages"] if s["label"] == stage["parent"])
            assert recipe["model"]["path"] == str(runs / parent["folder"] / "final")
        if stage["seed"] is not None:
            assert recipe["seed"] == stage["seed"]
    from safetensors.torch import load_file

    a = load_file(runs / "direct/seed_0/final/model.safetensors")
    b = load_file(runs / "direct/seed_1/final/model.safetensors")
    assert not a["classifier.weight"].equal(b["classifier.weight"])  # the seed reached the run


def test_forgetting_is_measured_on_a_stage_that_forgets(ran):
    _, runs, output = ran
    continual = json.loads((runs / "continual/eval.json").read_text())["probes"]["general"]
    # lines of numbers only: English perplexity must rise, by more than the interval
    assert continual["after"]["ppl"] > continual["before"]["ppl"]
    assert continual["change"]["relative_change"] > 0 and excludes_zero(continual["change"]["ci"])
    pretrain_after = json.loads((runs / "pretrain/eval.json").read_text())["probes"]["general"]["after"]
    assert continual["before"]["ppl"] == pretrain_after["ppl"]  # before = the parent's final model, same batches
    assert "forgetting [continual]: general perplexity" in output
    record = [json.loads(x) for x in (runs / "continual/metrics.jsonl").read_text().splitlines()][-1]
    assert record["split"] == "eval" and record["general/ppl"] == continual["after"]["ppl"]
    assert record["general/relative_change"] == continual["change"]["relative_change"]
    # a classifier is measured with its body in its lineage's masked-LM head
    direct = json.loads((runs / "direct/seed_0/eval.json").read_text())
    assert direct["probes"]["general"]["before"]["ppl"] == pretrain_after["ppl"]
    assert "ppl" in direct["probes"]["general"]["after"]


def test_task_metrics_have_intervals_and_a_few_shot_baseline(ran):
    _, runs, _ = ran
    evaluation = json.loads((runs / "adapted/seed_1/eval.json").read_text())
    task = evaluation["tasks"]["adapted"]["after"]
    assert task["accuracy"] == pytest.approx(accuracy_score(task["actual"], task["predicted"]))
    assert task["macro_f1"] == pytest.approx(f1_score(task["actual"], task["predicted"], average="macro"))
    assert task["accuracy_ci"][0] <= task["accuracy"] <= task["accuracy_ci"][1]
    assert len(task["actual"]) == task["tokens"] > 100
    baseline = evaluation["baseline"]
    assert baseline["examples"] == len(task["actual"]) and 0 < baseline["accuracy"] < 1


def test_rerun_skips_everything_then_reruns_only_what_a_change_reaches(ran):
    path, runs, _ = ran
    finals = {label: (runs / label / "final" / "model.safetensors").stat().st_mtime_ns
              for label in ("pretrain", "continual", "direct/seed_0", "adapted/seed_0")}
    code, output = _invoke("run", str(path))
    assert code == 0, output
    assert output.count("skip ") >= 6 and "train " not in output.split("plan:")[1].split("==")[0]
    code, output = _invoke("run", str(path), "--dry-run", "stages.continual.trainer.lr=0.004")
    assert code == 0, output
    plan = output.split("plan:")[1]
    assert "skip  pretrain" in plan and "skip  direct/seed_0" in plan
    assert "train  continual (after pretrain): settings or inputs changed" in plan
    assert "train  adapted/seed_1 (after continual): its parent continual will change" in plan
    code, output = _invoke("run", str(path), "--only", "continual", "stages.continual.trainer.lr=0.004")
    assert code == 0, output
    assert (runs / "pretrain/final/model.safetensors").stat().st_mtime_ns == finals["pretrain"]
    assert (runs / "continual/final/model.safetensors").stat().st_mtime_ns != finals["continual"]
    code, output = _invoke("run", str(path), "--dry-run", "stages.continual.trainer.lr=0.004")
    assert "train  adapted/seed_0 (after continual): settings or inputs changed" in output  # its parent's files changed
    assert "skip  continual" in output and "skip  direct/seed_1" in output


def test_the_report_renders_in_a_browser_with_the_runs_numbers(ran, tmp_path):
    _, runs, _ = ran
    out = tmp_path / "report.html"
    code, output = _invoke("report", str(runs), "-o", str(out))
    assert code == 0, output
    page = out.read_text()
    evaluation = json.loads((runs / "direct/seed_0/eval.json").read_text())
    assert f"{evaluation['tasks']['direct']['after']['accuracy']:.3f}" in page
    continual = json.loads((runs / "continual/eval.json").read_text())["probes"]["general"]
    assert f"{continual['change']['relative_change']:+.1%}" in page
    train = json.loads((runs / "pretrain/summary.json").read_text())["train"]  # the stage card's MFU
    assert train["mfu"] == pytest.approx(train["tokens_per_second"] * train["flops_per_token"] / (train["matmul_peak_gflops"] * 1e9),
                                         rel=1e-2) and 0 < train["mfu"] < 1
    assert "MFU" in page and f"{train['mfu']:.1%}" in page
    # the branches on the same held-out rows, compared pair by pair (rows shared, seeds within each branch)
    assert "adapted − direct: accuracy" in page and "paired two-level bootstrap 95% CI" in page
    assert "over 2 + 2 seeds" not in page and "shared held-out rows and 2 + 2 seeds" in page
    # the genre task's paragraphs are Brown's, and so is the pretraining corpus: the report says how many
    assert "held-out rows seen in training" in page and "in stage pretrain: " in page and "in stage continual" not in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400"]
    dom = subprocess.run([browser, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    plots = int(dom.split('data-plots="')[1].split('"')[0])
    assert plots >= 3 and f'data-plots-rendered="{plots}"' in dom  # every embedded plot decoded in the browser
    assert f"{evaluation['tasks']['direct']['after']['accuracy']:.3f}" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # a page with text and plots, not a blank one
    # the plots themselves are not blank either
    import base64
    import io

    for chunk in page.split("data:image/png;base64,")[1:]:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(chunk.split("'")[0]))).convert("L"), dtype=float)
        assert image.std() > 5


def test_bad_pipelines_are_refused_naming_the_stage_and_key(tmp_path, small_jsonl, tokenizer_dir, genre_file):
    def refused(match: str, **changes) -> None:
        path = _pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file, **changes)
        with pytest.raises(ConfigError, match=match):
            load_pipeline(path)

    base = yaml.safe_load(_pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file).read_text())["stages"]
    cycle = {**base, "pretrain": {**base["pretrain"], "after": "adapted"}}
    refused(r"stages.pretrain.after: the stages form a cycle \(pretrain -> adapted -> continual -> pretrain\)", stages=cycle)
    refused(r"stages.direct.after: unknown stage 'pretrian'", stages={**base, "direct": {**base["direct"], "after": "pretrian"}})
    refused(r"stages.direct.model.path: the stage starts from its parent's model",
            stages={**base, "direct": {**base["direct"], "model": {"path": "x"}}})
    refused(r"stages.adapted.seeds: its parent 'continual' is already repeated per seed",
            stages={**base, "continual": {**base["continual"], "seeds": [0, 1]}})
    refused(r"stages.direct.output_dir: set by the pipeline", stages={**base, "direct": {**base["direct"], "output_dir": "x"}})
    refused(r"stages.continual.data.train_files\[0\]: \${nope} is not defined",
            stages={**base, "continual": {**base["continual"], "data": {"train_files": ["${nope}"]}}})
    refused(r"stages.direct: key 'trainer.lr' = -1.0", stages={**base, "direct": {**base["direct"], "trainer": {"lr": -1.0}}})
    shared = {"train_files": ["${general}"], "prepared_dir": str(tmp_path / "one")}
    refused(r"stages.continual.data.prepared_dir: .*one is also written by stage pretrain",
            stages={**base, "pretrain": {**base["pretrain"], "data": shared},
                    "continual": {**base["continual"], "data": {**shared, "train_files": ["${domain}"]}}})
    refused(r"unknown pipeline key\(s\) trainer", trainer={"lr": 1})
    # a stage whose lineage's model family does not fit its objective fails the check, before anything runs
    wrong = {**base, "pretrain": {**base["pretrain"], "model": {"family": "llama", "preset": "tiny"}, "objective": {"name": "clm"}}}
    path = _pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file, stages=wrong)
    code, output = _invoke("run", str(path))
    assert code == 2 and "stages.continual:" in output and "mlm" in output and "nothing was run" in output
    assert not (tmp_path / "runs").exists()
    code, output = _invoke("run", str(path), "--only", "nope")
    assert code == 2 and "--only nope: no such stage" in output
    good = _pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file)
    code, output = _invoke("run", str(good), "--only", "direct")
    assert code == 2 and "starts from pretrain, which has not run yet" in output
    code, output = _invoke("train", str(good))
    assert code == 2 and "a pipeline" in output


def test_an_interrupted_stage_resumes(tmp_path, small_jsonl, tokenizer_dir, genre_file):
    base = yaml.safe_load(_pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file).read_text())["stages"]
    stages = {"pretrain": {**base["pretrain"], "trainer": {"max_steps": 400, "save_every": 2, "keep_last": 2}}}
    path = _pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file, stages=stages)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "runs" / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("step_*")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(15)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert not (tmp_path / "runs/pretrain/final").exists()
    code, output = _invoke("run", str(path), "--dry-run")
    assert "train  pretrain: interrupted earlier: checkpoints there (--resume continues it)" in output
    code, output = _invoke("run", str(path), "--resume")
    assert code == 0, output
    assert "resume  pretrain" in output and "resume: continuing from" in output
    assert (tmp_path / "runs/pretrain/final/model.safetensors").is_file()


def test_intervals_cover_the_estimate_and_tell_a_real_difference():
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 3, 400).tolist()
    predicted = [a if rng.random() < 0.7 else int(rng.integers(0, 3)) for a in actual]
    ci = classification_intervals(actual, predicted, [0, 1, 2])
    accuracy = accuracy_score(actual, predicted)
    assert ci["accuracy_ci"][0] < accuracy < ci["accuracy_ci"][1]
    assert 0.05 < ci["accuracy_ci"][1] - ci["accuracy_ci"][0] < 0.15  # ~±2 sd of a proportion at n=400
    same = [int(a == p) for a, p in zip(actual, predicted, strict=True)]
    assert not excludes_zero(accuracy_change(same, same)["ci"])
    better = [1 if rng.random() < 0.5 else s for s in same]
    assert excludes_zero(accuracy_change(same, better)["ci"])
    parts = [(float(rng.normal(400, 20)), 100) for _ in range(50)]
    low, high = perplexity_interval(parts)
    assert low < np.exp(sum(p[0] for p in parts) / 5000) < high


def test_generation_metrics_equal_rouge_score_and_sacrebleu():
    import sacrebleu
    from rouge_score import rouge_scorer

    from lmforge.eval.generation import generation_metrics

    predictions = ["The cat sat on the mat.", "yes", "Paris is the capital", "running fast"]
    references = ["the cat sat on the mat", "No.", "The capital is Paris", "he runs fast"]
    metrics = generation_metrics(predictions, references)
    assert metrics["exact_match"] == 0.25  # lower-cased, end punctuation dropped
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)])
    assert metrics["rouge_l"] == pytest.approx(expected)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert metrics["rouge_l_ci"][0] <= metrics["rouge_l"] <= metrics["rouge_l_ci"][1]


@pytest.mark.slow
def test_an_sft_stage_scores_its_held_out_answers_before_and_after(tmp_path, small_jsonl, tokenizer_dir):
    spec = {
        "name": "sft", "output_dir": str(tmp_path / "runs"), "generation_examples": 12, "eval_batches": 4,
        "defaults": {"trainer": {"batch_size": 8, "progress": False, "precision": "fp32"}},
        "stages": {
            "pretrain": {"tokenizer": {"path": str(tokenizer_dir)}, "model": {"family": "llama", "preset": "tiny"},
                         "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}, "packing": {"seq_len": 64},
                         "trainer": {"max_steps": 20, "lr": 3e-3}},
            "sft": {"after": "pretrain", "objective": {"name": "sft"}, "packing": {"seq_len": 256},
                    "data": {"train_files": [str(REPO / "assets/corpora/instructions_excerpt.jsonl.gz")],
                             "val_fraction": 0.03}, "trainer": {"max_steps": 20, "lr": 1e-3}},
        },
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, output = _invoke("run", str(path))
    assert code == 0, output
    generation = json.loads((tmp_path / "runs/sft/eval.json").read_text())["generation"]
    before, after = generation["before"], generation["after"]
    assert before["examples"] == after["examples"] == 12
    assert [s["prompt"] for s in before["samples"]] == [s["prompt"] for s in after["samples"]]
    assert [s["answer"] for s in before["samples"]] != [s["answer"] for s in after["samples"]]  # training changed them
    assert "held-out answers ROUGE-L" in output
    code, output = _invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "r.html"))
    assert code == 0 and f"{after['rouge_l']:.3f}" in (tmp_path / "r.html").read_text()


def test_the_harness_runs_a_local_task_and_agrees_with_the_models_likelihoods(base_model, tmp_path):
    """lm-eval's accuracy on the shipped task equals the argmax of the model's own choice log-likelihoods;
    the command prints lm-eval's table and writes its results JSON, and never overwrites a file."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    import torch

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.eval.harness import harness_metrics, run_harness
    from lmforge.models.factory import load_model

    tasks = REPO / "assets" / "harness"
    results = harness_metrics(run_harness(base_model, tasks, ["lmforge_facts"]))
    model, tok = load_model(base_model, "causal_lm").eval(), load_tokenizer(base_model)
    right = 0
    rows = [json.loads(line) for line in (tasks / "lmforge_facts.jsonl").read_text().splitlines()]
    for row in rows:
        context = tok(row["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tok(row["question"] + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, len(context):]
            scores.append(float(logp[len(context) - 1:].gather(-1, targets[:, None]).sum()))
        right += int(np.argmax(scores) == row["answer"])
    assert results["lmforge_facts"]["acc"] == pytest.approx(right / len(rows))
    out = tmp_path / "h.json"
    code, output = _invoke("harness", "-m", str(base_model), "--tasks-dir", str(tasks), "-t", "lmforge_facts", "-o", str(out))
    assert code == 0 and "|lmforge_facts|" in output.replace(" ", "") and "Stderr" in output  # lm-eval's table
    assert "is not of type `str`" not in output
    written = json.loads(out.read_text())
    assert written["results"]["lmforge_facts"]["acc,none"] == pytest.approx(right / len(rows))
    assert written["n-shot"] == {"lmforge_facts": 0} and "configs" in written and "versions" in written
    code, output = _invoke("harness", "-m", str(base_model), "--tasks-dir", str(tasks), "-t", "lmforge_facts", "-o", str(out))
    assert code == 2 and "does not overwrite" in output
    code, output = _invoke("harness", "-m", str(base_model), "--tasks-dir", str(tasks), "-t", "nope")
    assert code == 2 and "nope: not a task lm-eval knows" in output and "lmforge_facts" in output


def test_a_stage_length_replaces_the_defaults_length(tmp_path, small_jsonl, tokenizer_dir, genre_file):
    path = _pipeline(tmp_path, small_jsonl, tokenizer_dir, genre_file,
                     defaults={"packing": {"seq_len": 64}, "trainer": {"epochs": 2, "batch_size": 8}})
    pipeline = load_pipeline(path, ["stages.direct.trainer.max_steps=3"])
    direct = next(r for r in pipeline.runs if r.stage == "direct").recipe.trainer
    assert direct.max_steps == 3 and direct.epochs is None
    assert next(r for r in pipeline.runs if r.stage == "adapted").recipe.trainer.epochs == 2


@pytest.mark.slow
def test_an_adapter_stage_after_an_adapter_stage_keeps_its_parents_training(tmp_path, base_model, monkeypatch):
    """LoRA SFT, then a LoRA stage from it (RLHF's reward model and PPO): the child trains on the parent's
    merged weights, so its folder must name a base that holds them (OUTPUT_DIR/start). Loaded with plain
    peft, a child that barely trained computes what the parent computes, not what the raw base does;
    `needs:` runs a stage first without starting from it."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"Say {w}.", "response": f"{w} {w} {w}."} for w in ("red", "blue", "green", "gold") * 6]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = {"name": "lora", "lora": {"rank": 4}}
    common = {"method": lora, "data": {"train_files": [str(tmp_path / "sft.jsonl")], "val_fraction": 0.2},
              "objective": {"name": "sft"}, "packing": {"seq_len": 64}}
    pipeline = {"name": "chain", "output_dir": str(tmp_path / "runs"), "generation_examples": 1, "eval_batches": 1, "stages": {
        "parent": {**common, "model": {"path": str(base_model)},
                   "trainer": {"max_steps": 15, "batch_size": 4, "lr": 2e-2, "eval_every": 100, "progress": False}},
        "other": {**common, "model": {"path": str(base_model)},
                  "trainer": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "eval_every": 100, "progress": False}},
        "child": {**common, "after": "parent", "needs": "other",
                  "trainer": {"max_steps": 1, "batch_size": 4, "lr": 1e-9, "eval_every": 100, "progress": False}}}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    plan = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert plan.output.index("other") < plan.output.index("child")
    assert [r.stage for r in load_pipeline(path).select(start="other")] == ["other", "child"]  # --from follows needs
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs"
    assert json.loads((runs / "child" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(runs / "child" / "start")
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        parent = AutoPeftModelForCausalLM.from_pretrained(runs / "parent" / "final")(input_ids=ids).logits
        child = AutoPeftModelForCausalLM.from_pretrained(runs / "child" / "final")(input_ids=ids).logits
        raw = AutoModelForCausalLM.from_pretrained(base_model)(input_ids=ids).logits
    assert (parent - raw).abs().max() > 1e-2  # the parent learned something
    torch.testing.assert_close(child, parent, atol=1e-3, rtol=1e-3)
