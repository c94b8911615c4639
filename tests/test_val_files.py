"""`data.val_files`: the user's own held-out file, read by every loader instead of a hashed share of
train_files; every training row trains, every metric reads the held-out file, a change re-prepares."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.instructions import InstructionFormat
from lmforge.data.labeled import load_labeled
from lmforge.data.pairs import load_pairs
from lmforge.data.preferences import load_preferences
from lmforge.data.prepare import prepare_corpus
from lmforge.engine.metrics import read_metrics
from lmforge.recipe_files import load_recipe


def _jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_in_memory_loader_holds_out_exactly_the_val_files(tmp_path, tokenizer):
    labelled = [{"text": f"row {i} words", "genre": "ab"[i % 2]} for i in range(40)]
    train, val = _jsonl(tmp_path / "t.jsonl", labelled[:30]), _jsonl(tmp_path / "v.jsonl", labelled[30:])
    tr, va, names = load_labeled([train], tokenizer, "text", "genre", None, 32, 0.5, val_files=[val])
    assert (len(tr), len(va), names) == (30, 10, ["a", "b"])  # no training row held out despite val_fraction
    tr, va = load_pairs([train], tokenizer, "text", None, 32, 0.5, val_files=[val])
    assert (len(tr), len(va)) == (30, 10)
    pairs = [{"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"} for i in range(12)]
    train, val = _jsonl(tmp_path / "pt.jsonl", pairs[:9]), _jsonl(tmp_path / "pv.jsonl", pairs[9:])
    from lmforge.data.instructions import ensure_chat_template, load_instructions

    ensure_chat_template(tokenizer, None)
    fmt = InstructionFormat(prompt_template="{prompt}", response_column="chosen")
    sets = load_preferences([train], tokenizer, fmt, "chosen", "rejected", 64, 0.5, val_files=[val])
    assert (len(sets.train), len(sets.val)) == (9, 3)
    sets = load_instructions([train], tokenizer, fmt, 64, 0.5, val_files=[val])
    assert (len(sets.train), len(sets.val)) == (9, 3)
    # without val_files the same loader holds out a share of train_files (row 0 always)
    sets = load_instructions([train], tokenizer, fmt, 64, 0.5)
    assert len(sets.train) + len(sets.val) == 9 and len(sets.val) >= 1


def test_prepared_corpus_takes_its_val_split_from_val_files_and_reprepares_when_they_change(tmp_path, tokenizer):
    docs = [{"text": f"document number {i} " * 5} for i in range(50)]
    train, val = _jsonl(tmp_path / "t.jsonl", docs[:40]), _jsonl(tmp_path / "v.jsonl", docs[40:])
    corpus = prepare_corpus([train], tokenizer, tmp_path / "p", val_fraction=0.2, progress=False, val_files=[val])
    splits = corpus.manifest["splits"]
    assert (splits["train"]["docs"], splits["val"]["docs"]) == (40, 10)
    _jsonl(tmp_path / "v.jsonl", docs[40:45])  # a changed held-out file: never the stale split
    corpus = prepare_corpus([train], tokenizer, tmp_path / "p", val_fraction=0.2, progress=False, val_files=[val])
    assert corpus.manifest["splits"]["val"]["docs"] == 5


def test_classifier_run_scores_the_val_file(tmp_path, genre_file, tokenizer_dir):
    """The held-out metrics count the val file's rows: all of them, and only them."""
    rows = [json.loads(line) for line in genre_file.read_text().splitlines() if line.strip()]
    train, val = _jsonl(tmp_path / "t.jsonl", rows[:-25]), _jsonl(tmp_path / "v.jsonl", rows[-25:])
    recipe = {
        "output_dir": str(tmp_path / "out"), "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train_files": [train], "val_files": [val], "label_column": "genre"},
        "objective": {"name": "classify"},
        "model": {"family": "bert", "preset": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                                    "num_attention_heads": 2, "intermediate_size": 64}},
        "packing": {"seq_len": 32},
        "trainer": {"max_steps": 4, "batch_size": 8, "eval_every": 4, "progress": False, "precision": "fp32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert f"{len(rows) - 25} training rows, 25 held out" in result.output
    assert read_metrics(tmp_path / "out" / "metrics.jsonl", "val")[-1]["examples"] == 25


def test_val_files_with_val_fraction_or_a_mixture_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_files": ["a.jsonl"], "val_files": ["b.jsonl"], "val_fraction": 0.1}}))
    with pytest.raises(Exception, match="val_files.*val_fraction.*not both"):
        load_recipe(path)
