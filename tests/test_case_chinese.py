"""The Chinese adaptation case (issue 32): what its pipeline needs from lmforge, each on a tiny model, and
the shipped recipe itself, shortened, on SmolLM2-135M."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.labeled import labeled_split
from lmforge.eval import forgetting

from .conftest import REPO

runner = CliRunner()
REVIEWS = REPO / "assets" / "corpora" / "chinese_reviews_excerpt.jsonl.gz"
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 128}


def _reviews(path: Path, rows: int) -> Path:
    with gzip.open(REVIEWS, "rt", encoding="utf-8") as handle:
        path.write_text("".join(line for _, line in zip(range(rows), handle, strict=False)), encoding="utf-8")
    return path


# slow: a pipeline with a BPE merge and a report (~40 s here) keeps the default suite under 15 min; CI runs it
@pytest.mark.slow
def test_a_first_stage_from_a_model_folder_is_measured_before_it(tmp_path, base_model, small_jsonl):
    """Continual pretraining straight from an imported model had no stage before it, so nothing measured what
    it made the model forget: now the model it starts from is measured too (here across a BPE extension)."""
    chinese = _reviews(tmp_path / "chinese.jsonl", 300)
    spec = {"name": "from_base", "output_dir": str(tmp_path / "runs"), "eval_batches": 2,
            "general": [str(tmp_path / "runs" / "continual" / "data_english")],
            "defaults": {"packing": {"seq_len": 64},
                         "trainer": {"batch_size": 4, "max_steps": 3, "lr": 1e-3, "progress": False, "precision": "fp32"}},
            "stages": {"continual": {
                "model": {"path": str(base_model)},
                "tokenizer": {"extend_files": [str(chinese)], "extend_method": "bpe", "extend_count": 50,
                              "extend_min_frequency": 2},
                "data": {"val_fraction": 0.1, "mixture": [
                    {"name": "chinese", "train_files": [str(chinese)], "weight": 0.75},
                    {"name": "english", "train_files": [str(small_jsonl)], "weight": 0.25}]}}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    probe = json.loads((tmp_path / "runs" / "continual" / "eval.json").read_text())["probes"]["general"]
    assert "skipped" not in probe["before"] and "skipped" not in probe["after"]
    assert probe["before"]["tokenizer"] != probe["after"]["tokenizer"]  # the base's tokens, then the extended ones
    assert probe["change"]["measure"].startswith("bits per byte") and probe["change"]["ci"]
    assert (tmp_path / "runs" / "continual" / "probe_start_general").is_dir()
    assert "bits/byte" in result.output
    page = tmp_path / "report.html"  # the report shows the extension and the bits per byte, start model first
    assert runner.invoke(app, ["report", str(tmp_path / "runs"), "-o", str(page)]).exit_code == 0
    html = page.read_text()
    stamp = json.loads((tmp_path / "runs" / "continual" / "tokenizer" / "lmforge_stage.json").read_text())
    assert "merged BPE pieces" in html and f"{stamp['tokens_per_char']['after']:.3f}" in html
    assert "alt='General corpora in bits per byte" in html


# slow: five classify runs with their evaluations (~40 s here); CI runs it
@pytest.mark.slow
def test_seeds_and_budgets_of_a_branch_share_one_few_shot_baseline(tmp_path, base_model, monkeypatch):
    """Every seed scored the same in-context baseline again (minutes per instance on 1,000 rows for
    SmolLM2): the same start model, shots and rows are now scored once, and budgets of SHOT_POOL rows or
    more draw the same shots."""
    from lmforge.eval import fewshot

    task = tmp_path / "task.jsonl"
    with gzip.open(REVIEWS, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(160), handle, strict=False)]
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    scored = []
    real = forgetting.recipe_baseline
    monkeypatch.setattr(forgetting, "recipe_baseline", lambda *a, **k: scored.append(1) or real(*a, **k))
    budgets = [fewshot.SHOT_POOL, fewshot.SHOT_POOL + 16]
    spec = {"name": "budgets", "output_dir": str(tmp_path / "runs"),
            "defaults": {"packing": {"seq_len": 48},
                         "trainer": {"batch_size": 8, "max_steps": 2, "lr": 1e-3, "progress": False, "precision": "fp32"}},
            "stages": {"task": {"model": {"path": str(base_model)}, "objective": {"name": "classify"},
                                "seeds": [0, 1], "matrix": {"data.max_docs": budgets},
                                "data": {"train_files": [str(task)], "label_column": "label", "val_fraction": 0.25}}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert len(scored) == 1  # four instances, one scoring
    baselines = [json.loads((tmp_path / "runs" / "task" / f"max_docs_{b}" / f"seed_{s}" / "eval.json").read_text())["baseline"]
                 for b in budgets for s in (0, 1)]
    held_out = labeled_split([str(task)], "text", "label", None, 0.25)[1]
    assert all(b == baselines[0] for b in baselines) and baselines[0]["examples"] == len(held_out) > 20
    assert "the few-shot baseline of" in result.output
    # another start model is scored anew
    (base_model / "marker.txt").write_text("changed")
    try:
        again = runner.invoke(app, ["run", str(path), "--force"])
    finally:
        (base_model / "marker.txt").unlink()
    assert again.exit_code == 0, again.output
    assert len(scored) == 2


def test_a_shot_is_cut_by_tokens_too(tokenizer):
    """400 characters of a Chinese review are ~700 tokens to an English byte-level tokenizer: 8 such shots
    made every in-context prompt thousands of tokens long. A shot is cut at SHOT_TOKENS as well."""
    from lmforge.eval.fewshot import SHOT_CHARS, SHOT_TOKENS, shot_text

    with gzip.open(REVIEWS, "rt", encoding="utf-8") as handle:
        review = json.loads(handle.readline())["text"] * 20
    cut = shot_text(tokenizer, review)
    assert review.startswith(cut) and "\ufffd" not in cut and len(cut) < SHOT_CHARS
    assert SHOT_TOKENS - 4 <= len(tokenizer(cut, add_special_tokens=False).input_ids) <= SHOT_TOKENS
    english = "The jury said it was a good election. " * 3
    assert shot_text(tokenizer, english) == english  # short text stays whole


def test_the_data_script_holds_the_test_reviews_out_of_everything_else(tmp_path):
    out = tmp_path / "data"
    done = subprocess.run([sys.executable, str(REPO / "examples" / "chinese_case_data.py"), "--out", str(out),
                           "--test", "300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def texts(name: str) -> list[str]:
        return [json.loads(line)["text"] for line in (out / name).read_text(encoding="utf-8").splitlines()]

    test = set(texts("test.jsonl"))
    assert len(test) == 300
    assert not test & set(texts("task.jsonl")) and not test & set(texts("chinese.jsonl"))
    assert set(texts("task.jsonl")) <= set(texts("chinese.jsonl"))  # the task's texts, unlabelled, are pretraining text
    assert {json.loads(line)["label"] for line in (out / "test.jsonl").read_text().splitlines()} == {"negative", "positive"}


# slow: SmolLM2-135M through every stage (~4 min here); CI runs it
@pytest.mark.slow
def test_the_shipped_chinese_case_runs_shortened(tmp_path, monkeypatch):
    """recipes/case_chinese.yaml as shipped, shortened on the command line: the vocabulary extension of
    SmolLM2's own tokenizer, continual pretraining with and without replay, three fine-tuning branches
    over a label-budget matrix, English and Chinese measured before and after, and the report."""
    data = tmp_path / "runs" / "case_chinese_data"
    done = subprocess.run([sys.executable, str(REPO / "examples" / "chinese_case_data.py"), "--out", str(data),
                           "--test", "40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name, keep in (("chinese.jsonl", 3000), ("english.jsonl", 60), ("task.jsonl", 400)):
        path = data / name
        path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "case_chinese"
    recipe = str(REPO / "recipes" / "case_chinese.yaml")
    short = ["defaults.trainer.progress=false", "eval_batches=2", "vars.pieces=400",
             "stages.continual.trainer.max_steps=2", "stages.continual.trainer.batch_size=2",
             "stages.no_replay.trainer.max_steps=2", "stages.no_replay.trainer.batch_size=2",
             *[f"stages.{s}.{key}" for s in ("direct", "vocab_only", "adapted")
               for key in ("seeds=[0]", 'matrix={"data.max_docs": [16, 32]}', "trainer.max_steps=1")]]
    result = runner.invoke(app, ["run", recipe, *short])
    assert result.exit_code == 0, result.output
    tokens = json.loads((out / "continual" / "tokenizer" / "lmforge_stage.json").read_text())
    assert tokens["tokens_per_char"]["after"] < tokens["tokens_per_char"]["before"]
    for stage in ("continual", "no_replay"):  # the base is measured before the first stages
        probes = json.loads((out / stage / "eval.json").read_text())["probes"]
        assert set(probes) == {"data_english", "data_chinese"}
        assert all(p["change"]["measure"].startswith("bits per byte") for p in probes.values()), stage
    for branch in ("direct", "vocab_only", "adapted"):
        for budget in (16, 32):
            measured = json.loads((out / branch / f"max_docs_{budget}" / "seed_0" / "eval.json").read_text())
            assert measured["tasks"][branch]["after"]["examples"] == 40
            assert measured["baseline"]["examples"] == 40
            final = out / branch / f"max_docs_{budget}" / "seed_0" / "final" / "config.json"
            assert json.loads(final.read_text())["lmforge_label_prompt"] == "\nLabel:"  # prompt-based fine-tuning
    page = tmp_path / "case.html"
    report = runner.invoke(app, ["report", str(out), "-o", str(page)])
    assert report.exit_code == 0, report.output
    assert all(stage in page.read_text() for stage in ("direct", "vocab_only", "adapted", "no_replay"))
