"""Features that work alone work together (issue 31): one data contract, keys that follow what decides
the weights, one evaluation path, a model that remembers how it read its data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.recipe_files import validate_recipe

from .conftest import REPO

runner = CliRunner()
INSTRUCTIONS = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


def test_an_sft_stage_scores_answers_only_on_its_own_held_out_rows(tokenizer):
    """max_docs, seq_len and long_examples decide the held-out rows: answer scoring asks exactly those
    (before: 48 prompts drawn from all 1,123 rows, some longer than seq_len)."""
    from lmforge.data.instructions import InstructionFormat, ensure_chat_template, load_instructions
    from lmforge.eval.generation import held_out_conversations

    ensure_chat_template(tokenizer, None)
    recipe = validate_recipe({"objective": {"name": "sft"}, "packing": {"seq_len": 96},
                              "data": {"train_files": [str(INSTRUCTIONS)], "max_docs": 200, "val_fraction": 0.1}})
    conversations = held_out_conversations(recipe, tokenizer, 48)
    sets = load_instructions([str(INSTRUCTIONS)], tokenizer, InstructionFormat(), 96, 0.1, "drop", 128, 200)
    assert len(conversations) == len(sets.val) < 20  # the handful the stage held out, not 48 of 1,123
    with gzip.open(INSTRUCTIONS, "rt") as handle:
        first_200 = [json.loads(line)["prompt"] for _, line in zip(range(200), handle, strict=False)]
    for messages in conversations:
        assert messages[0]["content"] in first_200
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        assert len(ids["input_ids"] if isinstance(ids, dict) else ids) <= 96


def test_with_early_stopping_when_the_run_evaluates_is_part_of_its_key(tmp_path, tokenizer):
    from lmforge.run_keys import run_identity, train_key

    def key(**trainer) -> str:
        recipe = validate_recipe({"output_dir": str(tmp_path / "o"), "trainer": trainer})
        return train_key(run_identity(recipe, tokenizer, {}))

    assert key(eval_every=2) == key(eval_every=4)  # no early stopping: the weights do not depend on it
    stopping = {"early_stopping": {"patience": 2}}
    assert key(eval_every=2, **stopping) != key(eval_every=4, **stopping)
    assert key(eval_batches=2, **stopping) != key(eval_batches=4, **stopping)


def _classify_recipe(tmp_path: Path, base_model: Path, genre_file: Path, **trainer) -> Path:
    recipe = {"output_dir": str(tmp_path / "out"), "tokenizer": {"path": str(base_model)}, "model": {"path": str(base_model)},
              "data": {"train_files": [str(genre_file)], "column": "text", "label_column": "genre",
                       "labels": ["fiction", "news"], "val_fraction": 0.25},
              "objective": {"name": "classify"}, "packing": {"seq_len": 48},
              "trainer": {"max_steps": 4, "batch_size": 8, "eval_every": 100, "progress": False, "precision": "fp32",
                          **trainer}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# slow: a plain run's evaluation (few-shot baseline, held-out answers) costs it ~40 s here; CI runs it
@pytest.mark.slow
def test_a_rerun_keeps_the_summary_and_the_model_remembers_its_data(tmp_path, base_model, genre_file):
    recipe = _classify_recipe(tmp_path, base_model, genre_file)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train"]["steps"] == 4
    # a rerun of the up-to-date run keeps how it trained (the report's wall time, tokens, memory)
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train"] == summary["train"]
    # eval and predict take the model's own column, label column and seq_len by default
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps({"text": f"words {i}", "genre": "news"}) + "\n" for i in range(4)))
    result = runner.invoke(app, ["predict", "-m", str(tmp_path / "out" / "final"), "-d", str(rows), "-o",
                                 str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    assert "seq_len 48" in result.output and "column 'text'" in result.output
    result = runner.invoke(app, ["eval", "-m", str(tmp_path / "out" / "final"), "--task", str(rows), "--few-shot", "0"])
    assert result.exit_code == 0, result.output
    assert "label_column 'genre'" in result.output


@pytest.mark.slow
def test_lmforge_run_evaluates_a_plain_run_like_a_stage(tmp_path, base_model, genre_file):
    """`lmforge run` of a recipe without stages measures it by the stage evaluation (eval.json with
    intervals, the untuned model's few-shot baseline), as docs/classify.md says; a rerun reuses it."""
    recipe = _classify_recipe(tmp_path, base_model, genre_file)
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "out" / "eval.json").read_text())
    task = next(iter(evaluation["tasks"].values()))["after"]
    assert 0 <= task["accuracy"] <= 1 and task["accuracy_ci"] and evaluation["baseline"]["shots"] >= 1
    assert "-shot baseline of the untuned model" in result.output
    stamp = (tmp_path / "out" / "eval.json").stat().st_mtime_ns
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    assert (tmp_path / "out" / "eval.json").stat().st_mtime_ns == stamp  # nothing changed: not measured again


def test_a_resumed_run_counts_every_part_of_its_time(tmp_path, tokenizer_dir, prepared):
    recipe = {"output_dir": str(tmp_path / "out"), "tokenizer": {"path": str(tokenizer_dir)},
              "data": {"prepared_dir": str(prepared.directory)},
              "model": {"family": "llama", "preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2,
                                                                           "num_attention_heads": 2, "num_key_value_heads": 2,
                                                                           "intermediate_size": 128}},
              "packing": {"seq_len": 32},
              "trainer": {"max_steps": 4, "batch_size": 4, "progress": False, "precision": "fp32", "eval_every": 100,
                          "save_every": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert runner.invoke(app, ["train", str(path), "trainer.max_steps=2"]).exit_code == 0
    state_file = tmp_path / "out" / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["train_state"]["seconds"] > 0  # the checkpoint knows how long training took
    state["train_state"]["seconds"] = 1000.0  # as if the first part had run for 1,000 s
    state_file.write_text(json.dumps(state))
    result = runner.invoke(app, ["run", str(path), "--resume"])
    assert result.exit_code == 0, result.output
    total = json.loads((tmp_path / "out" / "summary.json").read_text())["train"]["seconds"]
    assert 1000 < total < 1200  # both parts, not the last one alone


def test_a_text_file_is_one_document_unless_paragraphs_are_asked(tmp_path):
    from lmforge.data.formats import read_documents

    page = tmp_path / "page.txt"
    page.write_text("A title\n\nFirst paragraph.\n\nSecond paragraph.\n")
    assert list(read_documents(str(page))) == ["A title\n\nFirst paragraph.\n\nSecond paragraph."]
    assert list(read_documents(str(page), fmt="paragraphs")) == ["A title", "First paragraph.", "Second paragraph."]
    assert validate_recipe({"data": {"format": "paragraphs"}}).data.format == "paragraphs"


def test_check_says_what_the_objective_does_with_long_inputs(tmp_path, base_model, genre_file):
    recipe = _classify_recipe(tmp_path, base_model, genre_file)
    result = runner.invoke(app, ["check", str(recipe), "--no-measure"])
    assert "documents longer than seq_len (truncated: the text past seq_len is never seen):" in result.output, result.output
    assert "split across packed rows" not in result.output


@pytest.mark.slow
def test_vocabulary_extension_with_replay_and_forgetting_across_tokenizers(tmp_path, small_jsonl):
    """The documented replay pattern (`prepared_dir: ${stages.pretrain}/data`) with tokenizer.extend_count:
    `check` says OK and `run` stopped after pretraining (tokenizer mismatch); forgetting was skipped in
    silence. Now the replay is prepared again in the stage's tokens, and forgetting is measured per byte."""
    domain = tmp_path / "domain.jsonl"
    with gzip.open(REPO / "assets" / "corpora" / "pydocs_excerpt.jsonl.gz", "rt") as handle:
        domain.write_text("".join(line for _, line in zip(range(15), handle, strict=False)))
    tiny = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "intermediate_size": 128}
    spec = {"name": "chain", "output_dir": str(tmp_path / "runs"),
            "defaults": {"packing": {"seq_len": 64},
                         "trainer": {"batch_size": 8, "max_steps": 10, "lr": 2e-3, "progress": False, "precision": "fp32"}},
            "stages": {
                "pretrain": {"tokenizer": {"train_files": [str(small_jsonl)], "vocab_size": 400},
                             "model": {"family": "llama", "preset": "tiny", "overrides": tiny},
                             "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}},
                "continual": {"after": "pretrain",
                              "tokenizer": {"extend_files": [str(domain)], "extend_count": 20, "extend_min_frequency": 3},
                              "data": {"val_fraction": 0.15, "mixture": [
                                  {"name": "docs", "train_files": [str(domain)], "weight": 0.8},
                                  {"name": "replay", "prepared_dir": "${stages.pretrain}/data", "weight": 0.2}]}}}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec))
    checked = runner.invoke(app, ["check", str(path), "--no-measure"])
    assert checked.exit_code == 0, checked.output
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "preparing it again from its 1 source file(s)" in result.output
    probe = json.loads((tmp_path / "runs" / "continual" / "eval.json").read_text())["probes"]["general"]
    assert "skipped" not in probe["after"]
    assert probe["before"]["tokenizer"] != probe["after"]["tokenizer"]
    assert probe["change"]["measure"].startswith("bits per byte") and probe["change"]["ci"]
    assert 0 < probe["after"]["bits_per_byte"] < 8
    assert "bits/byte" in result.output and "(tokenizers differ)" in result.output


@pytest.mark.slow
def test_the_shipped_chain_runs_every_stage_with_forgetting_and_one_report(tmp_path, monkeypatch):
    """recipes/lifecycle_chain.yaml as shipped, each stage shortened on the command line: tokenizer ->
    pretrain -> continual (vocabulary extension + replay) -> SFT -> DPO -> eval, forgetting in every stage."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "chain"
    recipe = str(REPO / "recipes" / "lifecycle_chain.yaml")
    short = [f"output_dir={out}", "defaults.trainer.progress=false", "eval_batches=2", "generation_examples=2",
             "stages.pretrain.tokenizer.max_docs=60", "stages.pretrain.tokenizer.vocab_size=800",
             "stages.pretrain.data.max_docs=60", "stages.pretrain.trainer.max_steps=6",
             "stages.continual.tokenizer.extend_count=12", "stages.continual.data.max_docs=40",
             "stages.continual.trainer.max_steps=4", "stages.continual.trainer.eval_every=4",
             "stages.sft.data.max_docs=40", "stages.sft.trainer.max_steps=3",
             "stages.dpo.data.max_docs=40", "stages.dpo.trainer.max_steps=3",
             "stages.measure.eval.max_batches=2", "stages.measure.eval.max_new_tokens=4"]
    checked = runner.invoke(app, ["check", recipe, *short, "--no-measure"])
    assert checked.exit_code == 0, checked.output
    result = runner.invoke(app, ["run", recipe, *short])
    assert result.exit_code == 0, result.output
    for stage in ("pretrain", "continual", "sft", "dpo"):
        assert (out / stage / "final" / "config.json").is_file(), stage
    for stage in ("continual", "sft", "dpo"):  # each later stage measured on the general corpus, before and after
        probe = json.loads((out / stage / "eval.json").read_text())["probes"]["general"]
        assert "skipped" not in probe["after"] and "skipped" not in probe["before"], stage
        assert probe["change"]["ci"], stage
    across = json.loads((out / "continual" / "eval.json").read_text())["probes"]["general"]
    assert across["change"]["measure"].startswith("bits per byte")  # the tokenizer changed in this stage
    assert json.loads((out / "sft" / "eval.json").read_text())["probes"]["general"]["before"]["tokenizer"] == \
        across["after"]["tokenizer"]
    measured = json.loads((out / "measure" / "eval.json").read_text())
    assert set(measured["probes"]) == {"general", "domain"} and len(measured["samples"]) == 2
    answers = json.loads((out / "sft" / "eval.json").read_text())["generation"]  # held-out prompts, before and after
    assert answers["before"]["examples"] == answers["after"]["examples"] == 2
    preferred = json.loads((out / "dpo" / "eval.json").read_text())["generation"]  # DPO: against chosen vs rejected
    assert preferred["before"]["examples"] == preferred["after"]["examples"] == 2
    assert 0 <= preferred["after"]["closer_to_chosen"] <= 1 and preferred["after"]["closer_to_chosen_ci"]
    page = tmp_path / "chain.html"
    report = runner.invoke(app, ["report", str(out), "-o", str(page)])
    assert report.exit_code == 0, report.output
    html = page.read_text()
    assert all(stage in html for stage in ("pretrain", "continual", "sft", "dpo", "measure"))


# slow: a plain run's evaluation (few-shot baseline, held-out answers) costs it ~40 s here; CI runs it
@pytest.mark.slow
def test_a_classifier_that_answers_one_class_for_every_row_gets_a_run_health_verdict(tmp_path, base_model, genre_file):
    """Trained on one class only, the model gives that class to every held-out row of two: the log and the
    report say so (before: an accuracy of the majority share, without a word)."""
    rows = [json.loads(line) for line in genre_file.read_text().splitlines()]
    train, held_out = tmp_path / "news.jsonl", tmp_path / "both.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows if r["genre"] == "news"))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[::3]))
    recipe = yaml.safe_load(_classify_recipe(tmp_path, base_model, genre_file, lr=1e-3).read_text())
    recipe["data"].update(train_files=[str(train)], val_files=[str(held_out)])
    del recipe["data"]["val_fraction"]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "the classifier predicts 'news' for every one of the" in result.output
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["health"]
    page = tmp_path / "report.html"
    assert runner.invoke(app, ["report", str(tmp_path / "out"), "-o", str(page)]).exit_code == 0
    assert "run health: predicts &#x27;news&#x27; for every one" in page.read_text()


def test_the_verdict_needs_one_class_over_several():
    from lmforge.eval.classification import one_class_verdict

    assert one_class_verdict({"predicted": [1, 1, 1], "actual": [0, 1, 1]}, ["a", "b"]).startswith("predicts 'b'")
    assert one_class_verdict({"predicted": [1, 0, 1], "actual": [0, 1, 1]}, ["a", "b"]) is None
    assert one_class_verdict({"predicted": [1, 1], "actual": [1, 1]}, ["a", "b"]) is None  # one class held out
