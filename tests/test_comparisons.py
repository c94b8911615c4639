"""Comparisons a statistician would sign (issue 32): branches compared only on the same held-out rows, with
a paired two-level bootstrap (checked against scipy's paired bootstrap and t-test), and held-out rows found
in training text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import yaml
from scipy.stats import bootstrap, ttest_rel
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.eval.intervals import paired_branch_difference
from lmforge.eval.leakage import WINDOW, seen_rows
from lmforge.eval.report import RunView, _branches, branch_groups

from .conftest import EXCERPT

runner = CliRunner()


def _seeds(rng: np.random.Generator, accuracy: float, seeds: int, rows: int) -> np.ndarray:
    return (rng.random((seeds, rows)) < accuracy).astype(float)


def test_one_seed_each_is_scipys_paired_bootstrap_of_the_rows():
    rng = np.random.default_rng(1)
    a, b = _seeds(rng, 0.6, 1, 400), _seeds(rng, 0.7, 1, 400)
    ours = paired_branch_difference(a, b)
    theirs = bootstrap((a[0], b[0]), lambda x, y: np.mean(y) - np.mean(x), paired=True, vectorized=False,
                       n_resamples=1000, method="percentile", rng=np.random.default_rng(5)).confidence_interval
    assert ours["difference"] == pytest.approx(b.mean() - a.mean())
    assert ours["ci"] == pytest.approx([theirs.low, theirs.high], abs=0.012)  # two Monte Carlo draws of one interval


def test_the_seed_interval_is_scipys_paired_t_test():
    rng = np.random.default_rng(2)
    a, b = _seeds(rng, 0.6, 3, 300), _seeds(rng, 0.65, 3, 300)
    ours = paired_branch_difference(a, b)
    theirs = ttest_rel(b.mean(axis=1), a.mean(axis=1)).confidence_interval(0.95)
    assert ours["t_ci"] == pytest.approx([theirs.low, theirs.high])


def test_seed_noise_widens_the_two_level_interval_and_shared_rows_narrow_it():
    rng = np.random.default_rng(3)
    base = _seeds(rng, 0.7, 1, 500)
    steady = np.repeat(base, 3, axis=0)  # three seeds that agree on every row
    flips = steady.copy()
    for k, share in enumerate((0.0, 0.15, 0.3)):  # three seeds that differ a lot
        flips[k, rng.random(500) < share] = 0
    same = paired_branch_difference(steady, steady)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]  # the rows are shared: their noise cancels
    wide = paired_branch_difference(steady, flips)
    assert wide["ci"][1] - wide["ci"][0] > 0.05
    with pytest.raises(ValueError, match="same examples"):
        paired_branch_difference(steady, steady[:, :10])


def _view(stage: str, seed: int, correct: list[int], rows: str | None) -> RunView:
    after = {"accuracy": float(np.mean(correct)), "predicted": correct, "actual": [1] * len(correct), "rows": rows}
    return RunView(stage, None, stage, seed=seed, evaluation={"tasks": {stage: {"after": after}}}, objective="classify")


def test_the_report_compares_branches_only_on_the_same_rows():
    rng = np.random.default_rng(4)
    direct = [_view("direct", s, list((rng.random(200) < 0.6).astype(int)), "rowsA") for s in range(3)]
    adapted = [_view("adapted", s, list((rng.random(200) < 0.9).astype(int)), "rowsA") for s in range(3)]
    other = [_view("direct200", s, list((rng.random(50) < 0.3).astype(int)), "rowsB") for s in range(3)]
    page = _branches(branch_groups([*direct, *adapted, *other]))
    assert "adapted − direct: accuracy +0.3" in page and "larger than the interval" in page
    assert "over 200 shared held-out rows and 3 + 3 seeds" in page and "paired t over seeds" in page
    assert page.count("not compared: scored on different held-out rows") == 2  # direct200 against each


def test_held_out_rows_found_in_training_text_whole_or_by_a_long_stretch():
    chinese = "这家店的服务态度非常好，菜也很新鲜，下次还会再来。环境干净整洁，价格也算公道，推荐给大家一起来吃饭。"
    chinese += "服务员很耐心地介绍了每一道菜的做法和味道。"
    assert len(chinese) >= WINDOW + 5
    held_out = ["A short row.", chinese, "Never seen anywhere in the corpus, this sentence is long enough to need a window.",
                "Other text entirely"]
    training = ["intro  a SHORT   row. outro", "新闻：" + chinese[5:5 + WINDOW] + "……", "nothing here"]
    assert seen_rows(held_out, training) == [0, 1]
    assert seen_rows(held_out, ["A short", "row."]) == []  # no match across two documents


def test_check_and_the_stage_evaluation_say_which_held_out_rows_a_stage_trained_on(tmp_path, tokenizer_dir, base_model):
    """A classifier whose held-out rows appear in the continual stage's text: `check` notes it before
    anything runs, with the share."""
    with gzip.open(EXCERPT, "rt") as handle:
        docs = [json.loads(line) for line in handle][:60]
    rows = [{"text": p.strip(), "label": d["genre"] if d["genre"] == "news" else "other"}
            for d in docs for p in d["text"].split("\n") if len(p.strip()) > 80][:120]
    task, domain = tmp_path / "task.jsonl", tmp_path / "domain.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    domain.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[::2]))  # half the task's texts
    spec = {"name": "leak", "output_dir": str(tmp_path / "runs"),
            "defaults": {"packing": {"seq_len": 32}, "trainer": {"batch_size": 4, "max_steps": 2, "progress": False}},
            "stages": {"continual": {"tokenizer": {"path": str(tokenizer_dir)}, "model": {"path": str(base_model)},
                                     "data": {"train_files": [str(domain)]}},
                       "task": {"after": "continual", "objective": {"name": "classify"},
                                "data": {"train_files": [str(task)], "label_column": "label", "val_fraction": 0.25}}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["check", str(path), "--no-measure"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("note: leakage:"))
    assert "held-out rows" in line and f"stage continual: {domain}" in line
    share = int(line.split("(")[1].split("%")[0])
    assert 25 <= share <= 75  # about half the held-out rows were in the domain text


def test_compare_shows_a_running_stage_as_running_and_leaves_unread_defaults_out_of_the_diff(tmp_path):
    """Two SFT runs from one loaded model (its own tokenizer), at two learning rates; the second still trains.
    The diff shows the learning rate, not the tokenizer-training defaults neither read; the running one shows
    where it is instead of "wall s 0" and "No instruction-tuning stage"."""
    import json
    import os
    import socket

    from lmforge.eval.report import render
    from lmforge.recipe_files import dump_recipe, validate_recipe

    for name, lr, vocab in (("done", 1e-3, 8192), ("training", 2e-3, 4096)):
        folder = tmp_path / name
        folder.mkdir()
        recipe = validate_recipe({"output_dir": str(folder), "model": {"path": str(tmp_path / "base")},
                                  "objective": {"name": "sft"}, "trainer": {"lr": lr},
                                  "tokenizer": {"vocab_size": vocab}}, "r.yaml")  # a default nobody reads
        dump_recipe(recipe, folder)
    (tmp_path / "done" / "summary.json").write_text(json.dumps({"train": {"seconds": 12.5, "steps": 8}}))
    (tmp_path / "done" / "status.json").write_text(json.dumps({"status": "finished", "step": 8, "total_steps": 8}))
    (tmp_path / "training" / "status.json").write_text(json.dumps({
        "status": "running", "pid": os.getpid(), "host": socket.gethostname(), "step": 3, "total_steps": 8}))
    page = render([tmp_path / "done", tmp_path / "training"])
    diff = page[page.index("Configuration differences"):]
    assert "trainer.lr" in diff and "tokenizer.vocab_size" not in diff
    assert "running, step 3 of 8" in page and "not evaluated yet (running, step 3 of 8)" in page
    assert "No instruction-tuning stage" not in page
