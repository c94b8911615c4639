"""The CLI over a table of bad inputs: each ends in one clear error (exit 2, no traceback, the culprit
named), never in an uncaught exception; and what used to pass silently is now refused or warned of."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app

from .conftest import REPO

runner = CliRunner()
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 64}
PAIRS = REPO / "assets" / "corpora" / "preferences_excerpt.jsonl.gz"


def _recipe(tmp: Path, tokenizer_dir: Path, prepared_dir: Path, text: str | None = None, **sections) -> Path:
    recipe = {"output_dir": str(tmp / "out"), "tokenizer": {"path": str(tokenizer_dir)},
              "data": {"prepared_dir": str(prepared_dir)},
              "model": {"family": "llama", "preset": "tiny", "overrides": dict(TINY)}, "packing": {"seq_len": 32},
              "trainer": {"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32", "eval_every": 100}}
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp / "r.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(recipe))
    return path


def _jsonl(tmp: Path, name: str, rows: list) -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(tmp: Path, name: str, table: pa.Table) -> str:
    pq.write_table(table, tmp / name)
    return str(tmp / name)


def _model_with_only_a_pickle(tmp: Path, base_model: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp / "pickled"
    model = AutoModelForCausalLM.from_pretrained(base_model)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def _chat(tmp: Path, messages: list) -> str:
    return _jsonl(tmp, "chat.jsonl", [{"messages": messages}] * 3)


def _sft(tmp, base, files, tokenizer=None) -> dict:
    return {"objective": {"name": "sft"}, "data": {"train_files": [files]}, "model": {"path": str(base)},
            "tokenizer": {"path": str(tokenizer or base)}}


GOOD_DOC = {"text": "A good document with several words in it."}

# (id, command builder (tmp, tokenizer_dir, prepared_dir, base_model) -> argv, pattern the error names)
CASES = [
    ("override-not-yaml", lambda t, k, p, b: ["train", _recipe(t, k, p), "trainer.lr=[1"],
     r"override 'trainer.lr=\[1': the value is not valid YAML"),
    ("list-recipe-with-override", lambda t, k, p, b: ["train", _recipe(t, k, p, text="- a\n- b\n"), "trainer.lr=1"],
     r"r.yaml: the recipe must be a mapping of sections"),
    ("duplicate-key", lambda t, k, p, b: ["train", _recipe(t, k, p, text="trainer:\n  lr: 0.1\n  lr: 0.2\n")],
     r"r.yaml:3: not valid YAML: key 'lr' given twice \(first on line 2\)"),
    ("duplicate-section", lambda t, k, p, b: ["train", _recipe(t, k, p, text="trainer: {lr: 0.1}\nmodel: {}\ntrainer: {max_steps: 2}\n")],
     r"r.yaml:3: not valid YAML: key 'trainer' given twice"),
    ("lr-inf", lambda t, k, p, b: ["train", _recipe(t, k, p), "trainer.lr=inf"], r"trainer.lr.*finite number"),
    ("eval-batch-size-0", lambda t, k, p, b: ["eval", "-m", b, "-d", p, "--batch-size", "0"], r"Invalid value for '--batch-size'"),
    ("eval-seq-len-beyond-positions", lambda t, k, p, b: ["eval", "-m", b, "-d", p, "--seq-len", "5000"],
     r"packing.seq_len: 5000 is longer than the model's 1024 positions"),
    ("generate-negative-temperature", lambda t, k, p, b: ["generate", "-m", b, "-p", "x", "--temperature", "-1"],
     r"Invalid value for '--temperature'"),
    ("generate-top-p-zero", lambda t, k, p, b: ["generate", "-m", b, "-p", "x", "--top-p", "0"], r"--top-p: must be above 0"),
    ("tokenizer-vocab-below-bytes", lambda t, k, p, b: ["tokenizer", _jsonl(t, "d.jsonl", [GOOD_DOC]), "--out", t / "tok", "--vocab-size", "100"],
     r"tokenizer.vocab_size: 100 is below 261"),
    ("corrupt-shard-ids", lambda t, k, p, b: ["train", _recipe(t, k, _corrupt_copy(t, p))], r"train_000.bin: token id 65535 at token \d+ is beyond"),
    ("chat-content-not-text", lambda t, k, p, b: ["train", _recipe(t, k, p, **_sft(t, b, _chat(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": {"text": "x"}}])))],
     r"chat.jsonl:1: message 1 \(assistant\) has content of type dict, not text"),
    ("chat-unknown-role", lambda t, k, p, b: ["train", _recipe(t, k, p, **_sft(t, b, _chat(t, [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}])))],
     r"chat.jsonl:1: message 0 has the unknown role 'human'"),
    ("response-not-text", lambda t, k, p, b: ["train", _recipe(t, k, p, **_sft(t, b, _jsonl(t, "a.jsonl", [{"prompt": "q", "response": None}] * 3)))],
     r"a.jsonl:1: column 'response' is NoneType, not text"),
    ("chosen-equals-rejected", lambda t, k, p, b: ["train", _recipe(t, k, p, **{**_sft(t, b, _jsonl(t, "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3)), "objective": {"name": "dpo"}})],
     r"p.jsonl:1: the chosen and the rejected answer are the same"),
    ("parquet-column-not-text", lambda t, k, p, b: ["train", _recipe(t, k, p, data={"train_files": [_parquet(t, "d.parquet", pa.table({"text": [1, 2, 3]}))], "prepared_dir": str(t / "prep")})],
     r"d.parquet: column 'text' holds int64, not text"),
    ("parquet-null-text", lambda t, k, p, b: ["train", _recipe(t, k, p, data={"train_files": [_parquet(t, "d.parquet", pa.table({"text": ["good words here", None]}))], "prepared_dir": str(t / "prep")})],
     r"d.parquet: row 2: column 'text' is NoneType, not text"),
    ("jsonl-null-text", lambda t, k, p, b: ["train", _recipe(t, k, p, data={"train_files": [_jsonl(t, "d.jsonl", [GOOD_DOC, {"text": None}])], "prepared_dir": str(t / "prep")})],
     r"d.jsonl:2: column 'text' is NoneType, not text"),
    ("pickle-only-model", lambda t, k, p, b: ["train", _recipe(t, k, p, **_sft(t, _model_with_only_a_pickle(t, b), str(REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"), b))],
     r"pickled: no safetensors weights \(only the pickle checkpoint pytorch_model.bin"),
    ("classify-without-label-column", lambda t, k, p, b: ["train", _recipe(t, k, p, objective={"name": "classify"}, data={"train_files": [_jsonl(t, "l.jsonl", [{"text": "good", "label": "a"}] * 3)]})],
     r"r.yaml: data.label_column: the classify objective needs the column that holds each row's label, e\.g\. data: \{label_column: label\}$"),
    ("eval-pickle-only-model", lambda t, k, p, b: ["eval", "-m", _model_with_only_a_pickle(t, b), "-d", p, "--tokenizer", k],
     r"no safetensors weights"),
]


def _corrupt_copy(tmp: Path, prepared: Path) -> str:
    import shutil

    copy = tmp / "corrupt"
    shutil.copytree(prepared, copy)
    shard = copy / "train_000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    return str(copy)


@pytest.mark.parametrize("case, argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_clear_error(tmp_path, tokenizer_dir, prepared, base_model, case, argv, pattern):
    result = runner.invoke(app, [str(a) for a in argv(tmp_path, tokenizer_dir, prepared.directory, base_model)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # caught: no uncaught exception left the CLI
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert re.search(pattern, result.output), result.output


def test_full_disk_while_writing_a_checkpoint_keeps_the_earlier_ones(tmp_path, tokenizer_dir, prepared, monkeypatch):
    from lmforge.engine import checkpoint

    save = checkpoint._save_weights
    calls = []

    def fills_the_disk(model, path, weights=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        save(model, path, weights)

    monkeypatch.setattr(checkpoint, "_save_weights", fills_the_disk)
    path = _recipe(tmp_path, tokenizer_dir, prepared.directory, trainer={"max_steps": 4, "save_every": 2})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(r"error: disk full writing .*model.safetensors: nothing half-written was kept", result.output), result.output
    checkpoints = tmp_path / "out" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000002"]  # no temporary folder left
    assert not (tmp_path / "out" / "final").exists()


def test_an_unexpected_exception_is_one_line_with_the_traceback_in_a_file(tmp_path, tokenizer_dir, prepared, monkeypatch):
    monkeypatch.setattr("lmforge.pipeline.train_stage", lambda *a, **k: {}["no such key"])
    result = runner.invoke(app, ["train", str(_recipe(tmp_path, tokenizer_dir, prepared.directory))])
    assert result.exit_code == 3 and "Traceback" not in result.output
    match = re.search(r"error: internal error KeyError: 'no such key' \(a bug in lmforge, please report it; the traceback is in (\S+)\)",
                      result.output)
    assert match, result.output
    assert "Traceback" in Path(match.group(1)).read_text()


def test_warmup_over_half_the_run_is_warned_of_and_a_fraction_follows_the_length(tmp_path, tokenizer_dir, prepared):
    """A fixed warm-up copied into a short run (20 of 24 steps once left a classifier predicting one class)
    is said before a step; warmup_fraction scales with the run, and an override of one replaces the other."""
    path = _recipe(tmp_path, tokenizer_dir, prepared.directory, trainer={"warmup_steps": 10, "log_every": 50})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning: trainer.warmup_steps 10 is 500% of the run's 2 steps" in result.output
    assert "trainer.log_every 50 > the run's 2 steps" in result.output
    result = runner.invoke(app, ["train", str(path), "trainer.warmup_fraction=0.5", "--force"])
    assert result.exit_code == 0, result.output
    assert "train: 2 steps (1 of warm-up)" in result.output and "warning: trainer.warmup" not in result.output


def test_a_warmup_fraction_is_a_share_of_the_steps():
    from lmforge.engine.optimizer import warmup_steps_of

    assert warmup_steps_of(0, 0.1, 240) == (24, None) and warmup_steps_of(0, 0.1, 24) == (2, None)
    assert warmup_steps_of(20, None, 400) == (20, None)
    steps, warning = warmup_steps_of(20, None, 24)
    assert steps == 20 and "83% of the run's 24 steps" in warning


def test_csv_and_jsonl_and_parquet_skip_empty_texts_alike(tmp_path, tokenizer):
    from lmforge.data.formats import read_documents

    texts = ["first words", "", "  ", "second words"]
    (tmp_path / "d.csv").write_text("text\n" + "\n".join(f'"{t}"' for t in texts) + "\n")
    jsonl = _jsonl(tmp_path, "d.jsonl", [{"text": t} for t in texts])
    parquet = _parquet(tmp_path, "d.parquet", pa.table({"text": texts}))
    for path in (str(tmp_path / "d.csv"), jsonl, parquet):
        assert list(read_documents(path)) == ["first words", "second words"], path
