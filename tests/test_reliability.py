"""Bad input, kills, signals and safety: each fails loudly, names the culprit, and corrupts nothing."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import iter_corpus
from lmforge.data.tokenizer import train_tokenizer
from lmforge.models.factory import build_model, preset_config

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 128}


def _recipe(tmp_path: Path, tokenizer_dir: Path, prepared_dir: Path, name: str = "r.yaml", **sections) -> Path:
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"prepared_dir": str(prepared_dir)},
        "model": {"family": "llama", "preset": "tiny", "overrides": dict(TINY_MODEL)},
        "packing": {"seq_len": 32},
        "trainer": {"max_steps": 4, "batch_size": 4, "progress": False, "precision": "fp32", "eval_every": 100},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ bad inputs
def _data_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _gz(text: str) -> bytes:
    return gzip.compress(text.encode())


GOOD = b'{"text": "A good document with several words in it."}\n'

# (case id, how to build the command, pattern the error must contain)
DATA_CASES = [
    ("malformed-jsonl", lambda t: _data_file(t, "d.jsonl", GOOD + b'{"text": oops}\n'), r"d\.jsonl:2: malformed JSON"),
    ("empty-file", lambda t: _data_file(t, "d.jsonl", b""), r"d\.jsonl: empty file"),
    ("missing-column", lambda t: _data_file(t, "d.jsonl", GOOD + b'{"body": "x"}\n'), r"d\.jsonl:2: no column 'text'"),
    ("non-utf8", lambda t: _data_file(t, "d.jsonl", GOOD + b'{"text": "caf\xe9"}\n'), r"d\.jsonl:2: not valid UTF-8"),
    ("only-empty-strings", lambda t: _data_file(t, "d.jsonl", b'{"text": ""}\n{"text": "  "}\n'), r"d\.jsonl: no non-empty documents"),
    ("json-array-row", lambda t: _data_file(t, "d.jsonl", GOOD + b"[1, 2]\n"), r"d\.jsonl:2: expected a JSON object"),
    ("number-not-text", lambda t: _data_file(t, "d.jsonl", GOOD + b'{"text": 12}\n'), r"d\.jsonl:2: column 'text' is int"),
    ("null-not-text", lambda t: _data_file(t, "d.jsonl", b'{"text": null}\n' + GOOD), r"d\.jsonl:1: column 'text' is NoneType"),
    ("truncated-line", lambda t: _data_file(t, "d.jsonl", GOOD + b'{"text": "cut off'), r"d\.jsonl:2: malformed JSON"),
    ("missing-file", lambda t: str(t / "nope.jsonl"), r"nope\.jsonl: no such file"),
    ("glob-matches-nothing", lambda t: str(t / "none-*.jsonl"), r"none-\*\.jsonl: no file matches"),
    ("csv-missing-column", lambda t: _data_file(t, "d.csv", b"id,body\n1,hello\n"), r"d\.csv:1: no column 'text'"),
    ("corrupt-gzip", lambda t: _data_file(t, "d.jsonl.gz", _gz(GOOD.decode() * 50)[:40]), r"d\.jsonl\.gz:\d+: cannot read"),
    ("broken-parquet", lambda t: _data_file(t, "d.parquet", b"PAR1 not really parquet"), r"d\.parquet: not a readable Parquet"),
]


@pytest.mark.parametrize("case, make, pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_refused_before_anything_is_written(tmp_path, tokenizer_dir, prepared, case, make, pattern):
    data = make(tmp_path)
    recipe = _recipe(tmp_path, tokenizer_dir, prepared.directory, data={"train_files": [data],
                                                                        "prepared_dir": str(tmp_path / "out" / "data")})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.txt").write_text("from an earlier run")
    before = _tree_digest(tmp_path / "out")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code != 0
    assert re.search(pattern, result.output), result.output
    assert _tree_digest(tmp_path / "out") == before


def _write_bert(tmp_path: Path) -> str:
    path = tmp_path / "bert"
    build_model(preset_config("bert", "tiny", 512, num_hidden_layers=1), "masked_lm").save_pretrained(path)
    return str(path)


def _other_tokenizer(tmp_path: Path, small_jsonl: Path) -> str:
    out = tmp_path / "tok2"
    train_tokenizer(iter_corpus([str(small_jsonl)], max_docs=3), out, "bpe", vocab_size=300)
    return str(out)


def _orphan_corpus(tmp_path: Path, small_jsonl: Path) -> str:
    """A corpus prepared with another tokenizer from a file that is gone since: it cannot be prepared again."""
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    source = tmp_path / "gone.jsonl"
    source.write_text(small_jsonl.read_text())
    out = tmp_path / "orphan"
    prepare_corpus([str(source)], load_tokenizer(_other_tokenizer(tmp_path, small_jsonl)), out, progress=False)
    source.unlink()
    return str(out)


RECIPE_CASES = [
    ("unknown-key", lambda t, s: {"trainer": {"warmup": 3}}, r"unknown key 'trainer.warmup'; did you mean 'trainer.warmup_steps'"),
    ("unknown-section", lambda t, s: {"trainr": {}}, r"unknown key 'trainr'; did you mean 'trainer'"),
    ("negative-lr", lambda t, s: {"trainer": {"lr": -0.1}}, r"key 'trainer.lr' = -0.1"),
    ("wrong-type", lambda t, s: {"trainer": {"batch_size": "big"}}, r"key 'trainer.batch_size' = 'big'"),
    ("two-lengths", lambda t, s: {"trainer": {"max_steps": 3, "epochs": 1}}, r"only one of max_steps, max_tokens, epochs"),
    ("unknown-objective", lambda t, s: {"objective": {"name": "gan"}}, r"key 'objective.name' = 'gan'"),
    ("unknown-family", lambda t, s: {"model": {"family": "mamba"}}, r"key 'model.family' = 'mamba'"),
    ("seq-longer-than-model", lambda t, s: {"packing": {"seq_len": 128},
                                            "model": {"overrides": {**TINY_MODEL, "max_position_embeddings": 64}}},
     r"packing.seq_len: 128 is longer than the model's 64 positions"),
    ("other-architecture-checkpoint", lambda t, s: {"model": {"path": _write_bert(t)}}, r"objective 'clm'\): a 'bert' checkpoint cannot be trained with a causal-LM objective"),
    ("family-objective-mismatch", lambda t, s: {"model": {"family": "bert", "overrides": {}}}, r"model.family: 'bert' is a masked_lm model"),
    ("model-path-not-a-model", lambda t, s: {"model": {"path": str(t)}}, r"model.path: .* \(no config.json\)"),
    # a corpus of another tokenizer is prepared again from its sources (tests/test_continual.py); without them, refused
    ("tokenizer-mismatch", lambda t, s: {"data": {"prepared_dir": _orphan_corpus(t, s)}},
     r"prepared with another tokenizer and its source files are gone"),
    ("tokenizer-missing", lambda t, s: {"tokenizer": {"path": str(t / "no-tok")}}, r"no-tok: no such folder"),
    ("model-path-mistyped", lambda t, s: {"model": {"path": str(t / "no-model")}}, r"model.path: .*no-model: no such folder"),
    ("output-dir-is-a-file", lambda t, s: {"output_dir": str(t / "out" / "earlier.txt")}, r"output_dir: .*earlier.txt exists and is a file"),
    ("no-data-at-all", lambda t, s: {"data": {"prepared_dir": str(t / "nothing")}}, r"data.train_files: no data files and no prepared corpus"),
    ("label-not-in-label-set", lambda t, s: {
        "objective": {"name": "classify"},
        "data": {"train_files": [_data_file(t, "labels.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "odd", "label": "meh"}\n')],
                 "label_column": "label", "labels": ["pos", "neg"]},
        "model": {"family": "bert", "overrides": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}}},
     r"labels\.jsonl:2: label 'meh' is not in the label set"),
    ("freeze-matches-nothing", lambda t, s: {"method": {"name": "freeze", "trainable": ["no_such_layer"]}}, r"method.trainable: .* matches no parameter"),
]


@pytest.mark.parametrize("case, sections, pattern", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_is_refused_naming_the_key(tmp_path, tokenizer_dir, prepared, small_jsonl, case, sections, pattern):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.txt").write_text("from an earlier run")
    before = _tree_digest(tmp_path / "out")
    recipe = _recipe(tmp_path, tokenizer_dir, prepared.directory, **sections(tmp_path, small_jsonl))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code != 0
    assert re.search(pattern, result.output), result.output
    assert _tree_digest(tmp_path / "out") == before


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  lr: 0.1\n  batch_size: [4\n")
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and re.search(r"broken\.yaml:\d+: not valid YAML", result.output)


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "missing.yaml: recipe file not found" in result.output


def test_full_disk_during_prepare_keeps_previous_corpus(tmp_path, tokenizer_dir, small_jsonl, monkeypatch):
    out = tmp_path / "data"
    assert runner.invoke(app, ["prepare", str(small_jsonl), "-t", str(tokenizer_dir), "-o", str(out)]).exit_code == 0
    before = _tree_digest(out)
    os.utime(small_jsonl)  # the input "changed", so prepare must run again

    def disk_full(self, docs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lmforge.data.shards.ShardWriter.add", disk_full)
    result = runner.invoke(app, ["prepare", str(small_jsonl), "-t", str(tokenizer_dir), "-o", str(out)])
    assert result.exit_code == 2
    assert f"{out}: cannot write the prepared corpus (No space left on device)" in result.output
    assert _tree_digest(out) == before
    assert not list(tmp_path.glob(".data.tmp*"))


def test_corrupt_manifest_is_named(tmp_path, tokenizer_dir, prepared):
    broken = tmp_path / "prep"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    result = runner.invoke(app, ["train", str(_recipe(tmp_path, tokenizer_dir, broken))])
    assert result.exit_code != 0 and "manifest.json: corrupt manifest" in result.output


def test_check_lists_bad_rows_with_lines_and_measures(tmp_path, tokenizer_dir, prepared):
    rows = GOOD * 3 + b'{"text": broken}\n' + GOOD + b'{"body": "x"}\n'
    data = _data_file(tmp_path, "mixed.jsonl", rows)
    recipe = _recipe(tmp_path, tokenizer_dir, prepared.directory, data={"train_files": [data], "prepared_dir": str(tmp_path / "p")})
    result = runner.invoke(app, ["check", str(recipe)])
    assert result.exit_code == 1
    assert "bad rows: 2" in result.output
    assert "mixed.jsonl:4: malformed JSON" in result.output and "mixed.jsonl:6: no column 'text'" in result.output
    good = _recipe(tmp_path, tokenizer_dir, prepared.directory, name="good.yaml")
    result = runner.invoke(app, ["check", str(good)])
    assert result.exit_code == 0, result.output
    assert re.search(r"measured: [\d.]+ s/step, [\d,]+ tokens/s, peak RSS [\d,]+ MB", result.output)
    assert "documents longer than seq_len" in result.output or "documents read" in result.output


def test_check_measures_steps_with_the_runs_activation_checkpointing(tmp_path, tokenizer_dir, prepared, llama_mlp_calls):
    from lmforge.check import measure_steps
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.recipe_files import load_recipe

    calls = llama_mlp_calls
    counts = []
    for switch in ("false", "true"):
        calls.clear()
        recipe = load_recipe(_recipe(tmp_path, tokenizer_dir, prepared.directory), [f"trainer.activation_checkpointing={switch}"])
        measure_steps(recipe, load_tokenizer(tokenizer_dir), steps=1)
        counts.append(len(calls))
    assert counts[1] == 2 * counts[0]  # the measured steps recompute the blocks, as the run will


# ------------------------------------------------------------------ kills, signals, resume
def _train_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", "train", str(recipe), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory, tokenizer_dir, prepared):
    """A run long enough to be interrupted, and its uninterrupted result."""
    root = tmp_path_factory.mktemp("long")

    def make(name: str) -> Path:
        return _recipe(root, tokenizer_dir, prepared.directory, name=f"{name}.yaml", output_dir=str(root / name),
                       trainer={"max_steps": 40, "batch_size": 8, "save_every": 2, "keep_last": 3, "deterministic": True,
                                "warmup_steps": 4, "lr": 3e-3, "log_every": 1})

    reference = make("reference")
    subprocess.run(_train_cmd(reference), env=_env(), check=True, capture_output=True, timeout=300)
    return make, load_file(root / "reference" / "final" / "model.safetensors")


def _wait_for_checkpoint(out: Path, min_step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")] if (out / "checkpoints").exists() else []
        if steps and max(steps) >= min_step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {min_step}: {proc.stdout.read()}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint in time")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def test_sigkill_at_random_step_then_resume_is_bit_identical(long_recipe):
    make, reference = long_recipe
    recipe = make(f"killed{random.randint(0, 10**6)}")
    out = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    kill_after = random.randint(4, 30)
    proc = subprocess.Popen(_train_cmd(recipe), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(out, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before the kill; nothing was tested"
    subprocess.run(_train_cmd(recipe, "--resume"), env=_env(), check=True, capture_output=True, timeout=300)
    _assert_same_weights(load_file(out / "final" / "model.safetensors"), reference)
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert steps == list(range(1, 41))  # no duplicated or missing steps in the log after resuming


def test_sigterm_checkpoints_and_exits_cleanly(long_recipe):
    make, reference = long_recipe
    recipe = make("terminated")
    out = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    proc = subprocess.Popen(_train_cmd(recipe), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    match = re.search(r"stopped by signal \d+ at step (\d+); checkpoint (\S+)\. Resume with", output)
    assert match, output
    assert Path(match.group(2)).is_dir() and match.group(2).endswith(f"step_{int(match.group(1)):08d}")
    subprocess.run(_train_cmd(recipe, "--resume"), env=_env(), check=True, capture_output=True, timeout=300)
    _assert_same_weights(load_file(out / "final" / "model.safetensors"), reference)


# ------------------------------------------------------------------ safety
def test_weights_load_only_safely():
    """Every torch.load in the package passes weights_only=True; nothing unpickles arbitrary objects."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load" not in text, path
        assert "trust_remote_code=True" not in text, path


def test_ctrl_c_is_acknowledged_at_once_and_a_second_stops_now(capsys):
    """A step can take minutes: the first Ctrl-C says what will happen (stop after this step, checkpoint
    kept), the second stops at once."""
    import os
    import signal

    from lmforge.engine.loop import StopFlag

    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal == signal.SIGINT
        assert "SIGINT: stopping after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_during_a_long_evaluation_stops_it_at_once_and_keeps_the_step(tmp_path, prepared):
    """An evaluation inside training can run for minutes and changes no weight: the first Ctrl-C stops it
    at once (before, it ran to its end), and the step it was evaluating is checkpointed for --resume."""
    import os
    import signal

    import torch

    from lmforge.config import TrainerConfig
    from lmforge.data.packing import PackedRows, iterate_batches
    from lmforge.engine.checkpoint import list_checkpoints
    from lmforge.engine.loop import train
    from lmforge.engine.optimizer import decay_groups
    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives.clm import CausalLM

    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", prepared.vocab_size, 128, **TINY_MODEL), "causal_lm")
    rows = PackedRows(prepared.split("train"), 32)
    cfg = TrainerConfig(max_steps=10, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, eval_every=3,
                        save_every=100, progress=False, precision="fp32")
    batches_seen = []

    def long_evaluation(model, precision):
        batches_seen.append(0)
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C a moment into it
        for _ in range(300):  # 30 s of "evaluating", unless stopped
            batches_seen[-1] += 1
            time.sleep(0.1)
        return {"loss": 1.0}

    lines = []
    start = time.perf_counter()
    result = train(model, CausalLM(), decay_groups(model.named_parameters(), 0.1), cfg, tmp_path,
                   batches=lambda skip: iterate_batches(rows, 4, 0, skip), batches_per_epoch=len(rows) // 4,
                   tokens_per_batch=4 * 32, evaluate=long_evaluation, log=lines.append)
    assert time.perf_counter() - start < 20  # not the evaluation's 30 s
    assert len(batches_seen) == 1 and batches_seen[0] < 5 and result.interrupted and result.state.step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]  # resumable from the step evaluated
    assert any("step 3: evaluation stopped by the signal" in line for line in lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
