"""Reliability round three (issue 30): nothing a user wrote is lost, no error unexplained, run health stated.
Each case failed before its fix."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

runner = CliRunner()
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 128}


def _recipe(tmp_path: Path, tokenizer_dir: Path, prepared_dir: Path, output_dir: str | None = None,
            name: str = "r.yaml", **trainer) -> Path:
    recipe = {"output_dir": output_dir or str(tmp_path / "out"), "tokenizer": {"path": str(tokenizer_dir)},
              "data": {"prepared_dir": str(prepared_dir)},
              "model": {"family": "llama", "preset": "tiny", "overrides": dict(TINY)}, "packing": {"seq_len": 32},
              "trainer": {"max_steps": 4, "batch_size": 4, "progress": False, "precision": "fp32", "eval_every": 100,
                          "log_every": 2, **trainer}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(*args, code: int = 0, pattern: str | None = None) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if pattern:
        assert re.search(pattern, result.output), result.output
    return result.output


# ------------------------------------------------------------------ data a user wrote is kept
def test_a_hand_written_recipe_yaml_in_the_output_folder_is_never_overwritten(tmp_path, tokenizer_dir, prepared,
                                                                                monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    recipe = _recipe(project, tokenizer_dir, prepared.directory, output_dir=".", name="recipe.yaml")
    mine = "# my experiment: notes I keep\n" + recipe.read_text()
    recipe.write_text(mine)
    monkeypatch.chdir(project)
    _run("train", "recipe.yaml")
    assert (project / "recipe.yaml").read_text() == mine  # comments and all
    dump = project / "recipe.lmforge.yaml"
    assert dump.read_text().startswith("# lmforge: the resolved recipe")
    assert yaml.safe_load(dump.read_text())["trainer"]["max_steps"] == 4
    from lmforge.board.runs import find_runs, run_detail

    assert find_runs(project) == [project]
    assert "max_steps: 4" in run_detail(project, project)["recipe_text"]
    assert "up to date" in _run("train", "recipe.yaml")  # and a rerun is still recognised
    assert (project / "recipe.yaml").read_text() == mine


def test_files_a_user_adds_to_lmforge_folders_survive_a_rebuild(tmp_path, tokenizer_dir, small_jsonl):
    data = tmp_path / "data"
    _run("prepare", small_jsonl, "-t", tokenizer_dir, "-o", data)
    (data / "NOTES.txt").write_text("where this corpus came from")
    (data / "manifest.json.bak").write_text("my backup")
    output = _run("prepare", small_jsonl, "-t", tokenizer_dir, "-o", data, "--val-fraction", 0.2)
    assert (data / "NOTES.txt").read_text() == "where this corpus came from"
    assert (data / "manifest.json.bak").read_text() == "my backup"
    assert "kept NOTES.txt" in output and json.loads((data / "manifest.json").read_text())["settings"]["val_fraction"] == 0.2
    tok = tmp_path / "tok"
    _run("tokenizer", small_jsonl, "--out", tok, "--vocab-size", 300)
    (tok / "NOTES.txt").write_text("why 300")
    before = (tok / "tokenizer.json").read_text()
    _run("tokenizer", small_jsonl, "--out", tok, "--vocab-size", 320)
    assert (tok / "NOTES.txt").read_text() == "why 300" and (tok / "tokenizer.json").read_text() != before


def test_a_rebuild_killed_between_the_swap_and_the_move_gives_the_users_files_back(tmp_path):
    from lmforge.outputs import WRITTEN, remove_stale_temporaries

    home = tmp_path / "data"
    home.mkdir()
    (home / "manifest.json").write_text("{}")
    aside = tmp_path / ".data.old-999999"  # a dead process's folder set aside, holding the user's file
    aside.mkdir()
    (aside / WRITTEN).write_text(json.dumps(["manifest.json"]))
    (aside / "manifest.json").write_text("{}")
    (aside / "NOTES.txt").write_text("mine")
    remove_stale_temporaries(tmp_path, [".data.tmp-", ".data.old-"], log=lambda _: None)
    assert (home / "NOTES.txt").read_text() == "mine" and not aside.exists()


def test_force_moves_the_whole_previous_run_aside_and_a_failed_rerun_pairs_nothing(tmp_path, tokenizer_dir, prepared,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    first = _recipe(tmp_path, tokenizer_dir, prepared.directory, save_every=2)
    _run("train", first)
    old = {name: (out / name).read_bytes() for name in ("recipe.yaml", "metrics.jsonl", "final/model.safetensors")}
    import lmforge.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("the machine broke while saving")

    monkeypatch.setattr(lmforge.pipeline, "save_final", broken)
    _run("train", first, "trainer.lr=0.0005", "--force", code=3)
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1
    assert {name: (aside[0] / name).read_bytes() for name in old} == old  # the whole earlier run, together
    assert (aside[0] / "checkpoints").is_dir() and (aside[0] / "status.json").is_file()
    assert not (out / "final").exists()  # the new recipe is never paired with the old model
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"]["lr"] == 0.0005


def test_a_csv_field_longer_than_pythons_default_limit_is_read_and_no_row_is_lost(tmp_path):
    from lmforge.data.labeled import iter_labeled

    path = tmp_path / "mail.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerow(["short", "ham"])
        writer.writerow(["x" * 200_000, "spam"])  # a real e-mail can be this long
        writer.writerow(["after it", "ham"])
    rows = list(iter_labeled([str(path)], "text", "label", None))
    assert [(len(t), label) for t, label in rows] == [(5, "ham"), (200_000, "spam"), (8, "ham")]


def test_an_empty_csv_text_cell_of_a_labelled_row_is_named_like_a_null(tmp_path):
    """A labelled row with no text (CSV's null) was trained on as a lone pad; JSONL's null was an error."""
    from lmforge.data.formats import DataError
    from lmforge.data.labeled import iter_labeled

    path = tmp_path / "rows.csv"
    path.write_text("text,label\nfine,a\n,b\nno label,\n")
    errors = [str(r) for r in iter_labeled([str(path)], "text", "label", None) if isinstance(r, DataError)]
    assert errors == [f"{path}:3: column 'text' is empty; a labelled row needs its text (drop the row)",
                      f"{path}:4: label column 'label' is empty"]


# ------------------------------------------------------------------ wrong or unexplained
def test_a_window_of_skipped_steps_logs_no_loss_rather_than_zero(tmp_path, tokenizer_dir, prepared, monkeypatch):
    from lmforge.objectives.clm import CausalLM

    real = CausalLM.loss
    calls = {"n": 0}

    def first_steps_nan(self, model, batch):
        calls["n"] += 1
        loss, metrics = real(self, model, batch)
        return (loss * float("nan") if calls["n"] <= 2 else loss), metrics

    monkeypatch.setattr(CausalLM, "loss", first_steps_nan)
    _run("train", _recipe(tmp_path, tokenizer_dir, prepared.directory, max_bad_steps=3))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl", "train")
    assert records[0]["step"] == 2 and records[0]["loss"] is None and records[0]["skipped_steps"] == 2
    assert records[1]["loss"] > 0 and records[1]["skipped_steps"] == 0


def test_a_full_disk_reported_by_torch_save_is_a_full_disk(tmp_path, tokenizer_dir, prepared, monkeypatch):
    from lmforge.engine import checkpoint

    def torch_save_on_a_full_disk(*args, **kwargs):  # what torch.save raises on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_on_a_full_disk)
    _run("train", _recipe(tmp_path, tokenizer_dir, prepared.directory, save_every=2), code=2,
         pattern=r"error: disk full writing .*: nothing half-written was kept")
    assert not list((tmp_path / "out" / "checkpoints").iterdir())


def test_named_chat_templates_work_or_are_refused(tmp_path, tokenizer):
    from lmforge.config import ConfigError
    from lmforge.data.formats import DataError
    from lmforge.data.instructions import ensure_chat_template
    from lmforge.recipe_files import validate_recipe

    with pytest.raises(ConfigError, match=r"data.chat_template.*'chat-ml' is neither a named template \(lmforge, chatml\)"):
        validate_recipe({"data": {"chat_template": "chat-ml"}}, "r.yaml")
    with pytest.raises(DataError, match=r"chatml ends each turn with <\|im_end\|>, but this tokenizer's EOS"):
        ensure_chat_template(tokenizer, "chatml")
    im_end = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    im_end.add_special_tokens({"eos_token": "<|im_end|>"})
    ensure_chat_template(im_end, "chatml")
    text = im_end.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unclear_inputs_get_messages_that_name_the_culprit(tmp_path, tokenizer_dir, prepared, small_jsonl):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    _run("train", empty, code=2, pattern=r"empty.yaml: the recipe is empty")
    recipe = _recipe(tmp_path, tokenizer_dir, prepared.directory)
    body = yaml.safe_load(recipe.read_text())
    body["data"] = {"train_files": [str(tmp_path)]}
    recipe.write_text(yaml.safe_dump(body))
    _run("check", recipe, code=1, pattern=rf"{re.escape(str(tmp_path))}: a folder, not a file")
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            (broken / name).write_text((tokenizer_dir / name).read_text())
    _run("prepare", small_jsonl, "-t", broken, "-o", tmp_path / "d", code=2,
         pattern=r"broken_tok/tokenizer.json: missing")
    (broken / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text()[:500])
    _run("prepare", small_jsonl, "-t", broken, "-o", tmp_path / "d", code=2,
         pattern=r"broken_tok/tokenizer.json: cannot be read as a tokenizer .* damaged or truncated")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "output_dir": str(tmp_path / "p"), "stages": {
        "pretrain": yaml.safe_load(recipe.read_text())}}))
    _run("run", pipeline, "stages.pretrian.trainer.lr=0.1", "--dry-run", code=2,
         pattern=r"no stage 'pretrian' \(stages: pretrain\); did you mean 'pretrain'")


def test_silent_cases_now_speak(tmp_path, small_jsonl):
    from lmforge.data.formats import DataError
    from lmforge.data.instructions import InstructionFormat, iter_conversations

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "I talk alone"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    rows = list(iter_conversations([str(path)], InstructionFormat()))
    errors = [str(r) for r in rows if isinstance(r, DataError)]
    assert len(errors) == 2 and all("answers no user turn" in e for e in errors) and f"{path}:2" in errors[1]
    output = _run("tokenizer", small_jsonl, "--out", tmp_path / "tok", "--vocab-size", 100_000_000)
    assert re.search(r"tokenizer: [\d,]+ tokens, not the 100,000,000 asked", output), output


def test_grpo_run_health_verdicts_have_defaults_and_are_stated():
    from lmforge.config import ObjectiveConfig
    from lmforge.objectives.grpo import GroupRelativePolicy

    cfg = ObjectiveConfig(name="grpo")
    assert cfg.max_kl == 5.0 and cfg.max_flat_steps == 20
    objective = GroupRelativePolicy(cfg)
    assert "exceeds 5 (objective.max_kl)" in objective.health_rules()
    assert "equal for 20 steps in a row" in objective.health_rules()
    assert "KL to the reference 7" in objective.unhealthy({"kl": 7.0}, 2)
    flat = {"zero_sd_groups": 1.0, "completion_length": 9.0}
    verdicts = [objective.unhealthy(flat, step) for step in range(5, 30, 5)]  # logged every 5 steps
    assert verdicts[:3] == [None, None, None] and "for 20 steps every group's completions got the same reward" in verdicts[3]
    fresh = GroupRelativePolicy(cfg)
    # a window with something to learn resets the count: flat from step 21 on, stopped at 40, not before
    assert [fresh.unhealthy(r, s) for r, s in ((flat, 10), ({"zero_sd_groups": 0.5}, 20), (flat, 30), (flat, 39))] == [None] * 4
    assert "for 20 steps" in fresh.unhealthy(flat, 40)
    off = GroupRelativePolicy(ObjectiveConfig(name="grpo", max_flat_steps=None, max_kl=None))
    assert all(off.unhealthy({**flat, "kl": 100.0}, s) is None for s in range(10, 200, 10))
