"""A user's data is never deleted or mixed up: folders lmforge did not write, stale outputs, runs sharing
a folder, resumes of changed recipes, non-finite weights, two processes on one folder, leftovers."""

from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import Recipe
from lmforge.engine.metrics import read_metrics
from lmforge.outputs import RunLock
from lmforge.recipe_files import validate_recipe
from lmforge.run_keys import flat_settings, not_in_train_key, run_identity, train_key

from .conftest import REPO

runner = CliRunner()
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 128}
INSTRUCTIONS = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text("years of work")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "notes.md").write_text("more work")
    return _contents(path)


def _contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _pretrain(tmp_path: Path, tokenizer_dir: Path, prepared_dir: Path, name: str = "r.yaml", **trainer) -> Path:
    recipe = {"output_dir": str(tmp_path / "out"), "tokenizer": {"path": str(tokenizer_dir)},
              "data": {"prepared_dir": str(prepared_dir)},
              "model": {"family": "llama", "preset": "tiny", "overrides": dict(TINY)}, "packing": {"seq_len": 32},
              "trainer": {"max_steps": 4, "batch_size": 4, "progress": False, "precision": "fp32", "eval_every": 100,
                          "log_every": 1, **trainer}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _refused(*args, pattern: str, code: int = 2) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert re.search(pattern, result.output), result.output
    assert "Traceback" not in result.output
    return result.output


# ------------------------------------------------------------------ 1. never delete a user's folder
def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, tokenizer_dir, small_jsonl):
    user = tmp_path / "mine"
    before = _user_folder(user)
    _refused("prepare", small_jsonl, "-t", tokenizer_dir, "-o", user, pattern=r"mine: exists and is a folder lmforge did not write")
    assert _contents(user) == before
    # its own corpus it replaces (changed settings), and an empty folder it fills
    (tmp_path / "empty").mkdir()
    _ok("prepare", small_jsonl, "-t", tokenizer_dir, "-o", tmp_path / "empty")
    _ok("prepare", small_jsonl, "-t", tokenizer_dir, "-o", tmp_path / "empty", "--val-fraction", 0.2)
    manifest = json.loads((tmp_path / "empty" / "manifest.json").read_text())
    assert manifest["writer"] == "lmforge" and manifest["settings"]["val_fraction"] == 0.2


def test_prepare_into_the_current_folder_keeps_its_files(tmp_path, tokenizer_dir, small_jsonl, monkeypatch):
    before = _user_folder(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    _refused("prepare", small_jsonl, "-t", tokenizer_dir, "-o", ".", pattern=r"exists and is a folder lmforge did not write")
    assert _contents(tmp_path / "cwd") == before


def test_recipe_prepared_dir_and_tokenizer_out_refuse_user_folders(tmp_path, tokenizer_dir, small_jsonl):
    user = tmp_path / "mine"
    before = _user_folder(user)
    recipe = _pretrain(tmp_path, tokenizer_dir, user)
    text = yaml.safe_load(recipe.read_text())
    text["data"]["train_files"] = [str(small_jsonl)]
    recipe.write_text(yaml.safe_dump(text))
    _refused("train", recipe, pattern=r"mine: exists and is a folder lmforge did not write")
    _refused("tokenizer", small_jsonl, "--out", user, "--vocab-size", 300, pattern=r"not a tokenizer lmforge trained")
    assert _contents(user) == before


def test_a_run_into_a_folder_of_user_files_of_its_names_is_refused(tmp_path, tokenizer_dir, prepared):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("my own notes: not a recipe dump\n")
    (out / "final").mkdir()
    (out / "final" / "weights.bin").write_text("someone's model")
    before = _contents(out)
    _refused("train", _pretrain(tmp_path, tokenizer_dir, prepared.directory),
             pattern=r"holds final, not written by lmforge")  # a user's recipe.yaml is no clash: see round 3
    assert _contents(out) == before


# ------------------------------------------------------------------ 2. the train key holds every setting
def _other_values(annotation, value):
    """Candidate values unlike `value` for a field of this annotation (the first valid one is used)."""
    options = [a for a in typing.get_args(annotation) if not isinstance(a, type)]
    for arg in typing.get_args(annotation):
        options += [a for a in typing.get_args(arg) if not isinstance(a, type) and a is not None]
    candidates = [o for o in options if o != value and not isinstance(o, typing.TypeVar)]
    if isinstance(value, bool):
        candidates.append(not value)
    elif isinstance(value, int):
        candidates += [value + 1, value * 2, max(value - 1, 1)]
    elif isinstance(value, float):
        candidates += [value / 2, value * 2, value + 0.1, 0.5]
    elif isinstance(value, str):
        candidates += [value + "x", "x{prompt}", ["q_proj"]]
    elif isinstance(value, list):
        candidates += [value + ["x"], value[:-1], ["x"]]
    elif isinstance(value, dict):
        candidates.append({**value, "extra_setting": 1})
    elif value is None:
        # an optional section (trainer.early_stopping, rollout) switched on with its defaults; reward's
        # defaults are empty (training the same as none), so one with a term
        sections = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        candidates += [{"terms": [{"kind": "numeric_match"}]} if s.__name__ == "RewardConfig" else {} for s in sections]
        candidates += [2, 0.5, "x", ["x"], True, 1, "{{ messages }}"]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        candidates.insert(0, [value[0] / 2, value[1]])  # betas
    return candidates


def _field_annotation(key: str):
    model: type[BaseModel] = Recipe
    annotation = None
    for part in key.split("."):
        field = model.model_fields[part]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return annotation


def test_every_setting_that_can_change_the_weights_is_in_the_train_key(tmp_path, tokenizer):
    """Change each recipe key alone: the train key changes for all but the documented few that cannot
    change the trained weights (declared outside or naming in config/); none is left out by a hand-kept list."""
    base_raw = {"output_dir": str(tmp_path / "out"), "objective": {"name": "sft"},
                "data": {"train_files": [str(INSTRUCTIONS)]}, "model": {"path": str(tmp_path)}}
    base = validate_recipe(base_raw)
    reference = train_key(run_identity(base, tokenizer, {}))
    untested, wrong = [], []
    for key, value in flat_settings(base).items():
        changed = None
        for candidate in _other_values(_field_annotation(key), value):
            raw = base.model_dump(mode="json")
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = candidate
            try:
                changed = validate_recipe(raw)
            except ValueError:
                continue
            if flat_settings(changed).get(key, "(a section now)") != value:
                break
            changed = None
        if changed is None:
            untested.append(key)
            continue
        moved = train_key(run_identity(changed, tokenizer, {})) != reference
        exempt = any(key == e or key.startswith(e + ".") for e in not_in_train_key())
        if moved == exempt:
            wrong.append(key)
    assert not wrong, f"train key wrong for: {wrong}"
    # each of these is valid only with another key changed with it (mixture without train_files, ewc with
    # fisher_data, dataset with a registry file, label_prompt with the classify objective); every other key
    # was changed alone
    assert set(untested) <= {"data.mixture", "regularize.ewc", "data.dataset", "objective.label_prompt"}, untested
    assert len(flat_settings(base)) > 90


def test_changed_sft_data_settings_retrain_and_generation_settings_do_not(tmp_path, base_model):
    from .conftest import write_recipe

    recipe = write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(INSTRUCTIONS)], "val_fraction": 0.05, "max_docs": 64}, "objective": {"name": "sft"},
        "trainer": {"max_steps": 2, "batch_size": 4, "eval_every": 100}}, {})
    _ok("train", recipe)
    assert "up to date" in _ok("train", recipe)
    assert "up to date" in _ok("train", recipe, "generate.max_new_tokens=9", "trainer.log_every=1")
    for change in ("data.system_prompt=Be brief.", "data.val_fraction=0.1", "data.response_column=output"):
        output = runner.invoke(app, ["train", recipe, change]).output
        assert "up to date" not in output, (change, output)


# ------------------------------------------------------------------ 3. / 4. one run per folder; resume checks
def test_a_fresh_run_refuses_another_runs_checkpoints_and_force_moves_them_aside(tmp_path, tokenizer_dir, prepared):
    first = _pretrain(tmp_path, tokenizer_dir, prepared.directory, save_every=2)
    _ok("train", first)
    checkpoints = tmp_path / "out" / "checkpoints"
    kept = _contents(checkpoints)
    other = _pretrain(tmp_path, tokenizer_dir, prepared.directory, "other.yaml", save_every=2, lr=5e-4)
    _refused("train", other, pattern=r"checkpoints of another run .*--force starts over and moves them aside")
    _refused("train", other, "--resume", pattern=r"--resume would continue another run; changed since that checkpoint:\s+"
                                                   r"trainer.lr: 0.001 -> 0.0005")
    assert _contents(checkpoints) == kept
    output = _ok("train", other, "--force")
    aside = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and _contents(aside[0] / "checkpoints") == kept and str(aside[0]) in output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]


def test_resume_refuses_changes_that_break_exactness_and_accepts_more_steps(tmp_path, tokenizer_dir, prepared):
    recipe = _pretrain(tmp_path, tokenizer_dir, prepared.directory, save_every=2)
    _ok("train", recipe)
    for change, shown in (("trainer.lr=0.002", "trainer.lr: 0.001 -> 0.002"), ("packing.seq_len=16", "packing.seq_len: 32 -> 16"),
                          ("trainer.batch_size=2", "trainer.batch_size: 4 -> 2"), ("seed=1", "seed: 0 -> 1")):
        output = _refused("train", recipe, change, "--resume", pattern=re.escape(shown))
        assert "--resume would continue another run" in output
    output = _ok("train", recipe, "trainer.max_steps=6", "--resume")
    assert "resume: accepted changes since the checkpoint: trainer.max_steps: 4 -> 6" in output
    assert read_metrics(tmp_path / "out" / "metrics.jsonl", "train")[-1]["step"] == 6


def test_resume_without_a_valid_checkpoint_stops(tmp_path, tokenizer_dir, prepared):
    _refused("train", _pretrain(tmp_path, tokenizer_dir, prepared.directory), "--resume",
             pattern=r"no valid checkpoint to resume from; run without --resume to start over")
    assert not (tmp_path / "out" / "final").exists()


# ------------------------------------------------------------------ 5. non-finite settings and weights
def test_non_finite_hyperparameters_are_config_errors(tmp_path, tokenizer_dir, prepared):
    for value in ("inf", "nan", "-inf"):
        _refused("train", _pretrain(tmp_path, tokenizer_dir, prepared.directory), f"trainer.lr={value}",
                 pattern=r"key 'trainer.lr' = .*finite number")


def test_non_finite_weights_are_never_saved(tmp_path, tokenizer_dir, prepared, monkeypatch):
    from lmforge.engine import loop

    step = loop.StepGuard.step
    calls = []

    def poisoning(self, optimizer, step_loss, grad_norm):  # step 3 leaves an inf in a weight
        skipped = step(self, optimizer, step_loss, grad_norm)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return skipped

    monkeypatch.setattr(loop.StepGuard, "step", poisoning)
    _refused("train", _pretrain(tmp_path, tokenizer_dir, prepared.directory, save_every=2),
             pattern=r"step 4: the weights are no longer finite .*last good checkpoint: .*step_00000002")
    assert not (tmp_path / "out" / "final").exists()
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step_00000002"]


# ------------------------------------------------------------------ 6. one process per folder
def test_a_second_process_on_a_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, tokenizer_dir, prepared):
    recipe = _pretrain(tmp_path, tokenizer_dir, prepared.directory)
    with RunLock(tmp_path / "out"):
        _refused("train", recipe, pattern=rf"out: in use by pid {os.getpid()} on .*one lmforge process per output folder")
    assert not (tmp_path / "out").exists()  # a lock that never saw a run started leaves nothing behind
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RunLock.NAME).write_text(json.dumps({"pid": 999999999, "host": "gone", "since": "then"}))
    output = _ok("train", recipe)
    assert "taking over the stale lock of pid 999999999 on gone" in output


# ------------------------------------------------------------------ 9. / 10. previous files kept, leftovers removed
def test_a_failure_after_the_check_keeps_the_previous_runs_files(tmp_path, tokenizer_dir, small_jsonl, tokenizer):
    from lmforge.data.prepare import prepare_corpus

    corpus = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "data", val_fraction=0.1, progress=False)
    recipe = _pretrain(tmp_path, tokenizer_dir, corpus.directory)
    _ok("train", recipe)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("recipe.yaml", "metrics.jsonl")}
    shard = corpus.directory / "train_000.bin"
    shard.write_bytes((60000).to_bytes(2, "little") * (shard.stat().st_size // 2))  # far beyond 512 ids
    _refused("train", recipe, "trainer.lr=0.002", "trainer.max_steps=400",
             pattern=r"train_000.bin: token id 60000 at token \d+ is beyond the tokenizer's \d+ ids")
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before


def test_truncated_document_ends_are_refused(tmp_path, tokenizer_dir, small_jsonl, tokenizer):
    from lmforge.data.prepare import prepare_corpus

    corpus = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "data", val_fraction=0.1, progress=False)
    docs = corpus.directory / "train_000.docs"
    docs.write_bytes(docs.read_bytes()[:-8])
    _refused("train", _pretrain(tmp_path, tokenizer_dir, corpus.directory), pattern=r"train_000.docs: \d+ document ends, manifest says")


def test_temporary_folders_of_killed_runs_are_removed_at_the_next_start(tmp_path, tokenizer_dir, prepared):
    recipe = _pretrain(tmp_path, tokenizer_dir, prepared.directory, save_every=2)
    out = tmp_path / "out"
    leftovers = [out / ".final.tmp-999999999", out / "checkpoints" / ".tmp-step_00000002-999999999"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("half written")
    (out / ".lmforge.lock").write_text("")
    mine = out / ".my.tmp-999999999"  # not a name lmforge writes: left alone
    mine.mkdir()
    output = _ok("train", recipe)
    assert "cleanup: removed 1 temporary folder(s)" in output
    assert not any(folder.exists() for folder in leftovers) and mine.exists()


def test_lora_log_counts_the_adapter_and_its_config_keeps_the_base_path_as_given(tmp_path, base_model, monkeypatch):
    from .conftest import write_recipe

    monkeypatch.chdir(base_model.parent)
    recipe = write_recipe(tmp_path, Path(base_model.name), {
        "data": {"train_files": [str(INSTRUCTIONS)], "max_docs": 64}, "objective": {"name": "sft"},
        "method": {"name": "lora", "lora": {"rank": 4, "base_dtype": "fp32"}},
        "trainer": {"max_steps": 2, "batch_size": 4, "eval_every": 100}}, {})
    output = _ok("train", recipe)
    total, trainable = re.search(r"model: llama ([\d.]+)M parameters \(([\d.]+)M trainable\)", output).groups()
    assert float(trainable) < 0.1 * float(total)
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_model.name and config["task_type"] == "CAUSAL_LM"


# ------------------------------------------------------------------ 11. interop
def test_tokenizer_folders_name_a_class_transformers_4_knows(tmp_path, small_jsonl):
    _ok("tokenizer", small_jsonl, "--out", tmp_path / "tok", "--vocab-size", 300)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")("a b").input_ids == \
        AutoTokenizer.from_pretrained(tmp_path / "tok")("a b").input_ids


# ------------------------------------------------------------------ 12. precision switch
def test_auto_precision_can_be_forced_for_a_whole_run(monkeypatch):
    from lmforge.engine.runtime import resolve_precision

    cpu = torch.device("cpu")
    for forced in ("bf16", "fp32"):
        monkeypatch.setenv("LMFORGE_AUTO_PRECISION", forced)
        assert resolve_precision("auto", cpu) == forced
        assert resolve_precision("fp32", cpu) == "fp32"  # an explicit choice stays
    monkeypatch.setenv("LMFORGE_AUTO_PRECISION", "fp16")
    with pytest.raises(ValueError, match="LMFORGE_AUTO_PRECISION"):
        resolve_precision("auto", cpu)


def test_a_key_added_unset_leaves_earlier_train_keys_alone(tmp_path, tokenizer):
    """Outputs trained before lmforge grew a key (unset by default) stay up to date: unset values are
    left out of the train key, while setting the key changes it."""
    base_raw = {"output_dir": str(tmp_path / "out"), "objective": {"name": "sft"},
                "data": {"train_files": [str(INSTRUCTIONS)]}, "model": {"path": str(tmp_path)}}
    key = train_key(run_identity(validate_recipe(base_raw), tokenizer, {}))
    identity = run_identity(validate_recipe(base_raw), tokenizer, {})
    assert "data.val_files" not in identity["settings"] and "data.preset" not in identity["settings"]
    assert all(v is not None and v != [] for v in identity["settings"].values())
    explicit = {**base_raw, "data": {**base_raw["data"], "val_files": [], "preset": None}}
    assert train_key(run_identity(validate_recipe(explicit), tokenizer, {})) == key
    own = {**base_raw, "data": {**base_raw["data"], "val_files": [str(INSTRUCTIONS)]}}
    assert train_key(run_identity(validate_recipe(own), tokenizer, {})) != key
