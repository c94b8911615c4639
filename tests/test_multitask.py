"""Multi-task instruction tuning (data/multitask.py): the three samplings draw tasks at their
probabilities, batches resume exactly, per-task templates and prefixes shape the prompts, a CLI run
reports every task's held-out loss and the held-out tasks', and a task name the data lacks is named."""

import gzip
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import MultitaskConfig
from lmforge.data.formats import DataError
from lmforge.data.instructions import InstructionFormat
from lmforge.data.multitask import iterate_tasks, load_tasks, task_probabilities
from lmforge.engine.metrics import read_metrics

from .conftest import REPO, write_recipe

EXCERPT = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


@pytest.fixture
def chat_tokenizer(tokenizer):
    """The session's tokenizer with lmforge's chat template (a copy: others keep theirs)."""
    import copy

    from lmforge.data.instructions import ensure_chat_template

    chat = copy.deepcopy(tokenizer)
    ensure_chat_template(chat, None)
    return chat


def _rows(tmp_path, counts: dict[str, int]):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"task": t, "q": f"question {i} of {t}", "a": f"answer {i}"}) + "\n"
                            for t, n in counts.items() for i in range(n)))
    return path


def test_the_samplings_draw_tasks_at_their_probabilities(tmp_path, chat_tokenizer):
    counts = {"big": 240, "mid": 48, "small": 12}
    path = _rows(tmp_path, counts)
    fmt = InstructionFormat("{q}", "a")
    seen = {}
    for sampling in ("proportional", "temperature", "equal"):
        cfg = MultitaskConfig(sampling=sampling, temperature=3.0)
        sets = load_tasks([str(path)], chat_tokenizer, fmt, cfg, 64, 0.0, "drop")
        expected = task_probabilities([counts[n] for n in sets.names], sampling, 3.0)
        drawn = np.zeros(len(sets.names))
        for _, batch in zip(range(300), iterate_tasks(sets, 16, seed=0), strict=False):
            drawn += np.bincount(batch["source"].numpy(), minlength=len(sets.names))
        seen[sampling] = drawn / drawn.sum()
        np.testing.assert_allclose(seen[sampling], expected, atol=0.02)
    small = sets.names.index("small")
    assert seen["proportional"][small] < 0.06 < seen["temperature"][small] < 0.2 < seen["equal"][small]
    expected_temperature = np.array([240, 48, 12]) ** (1 / 3) / (np.array([240, 48, 12]) ** (1 / 3)).sum()
    np.testing.assert_allclose(task_probabilities([240, 48, 12], "temperature", 3.0), expected_temperature)


def test_batches_resume_where_they_stopped(tmp_path, chat_tokenizer):
    sets = load_tasks([str(_rows(tmp_path, {"a": 30, "b": 10}))], chat_tokenizer, InstructionFormat("{q}", "a"),
                      MultitaskConfig(sampling="equal"), 64, 0.0, "drop")
    straight = [b for _, b in zip(range(6), iterate_tasks(sets, 4, seed=3), strict=False)]
    resumed = [b for _, b in zip(range(2), iterate_tasks(sets, 4, seed=3, start_batch=4), strict=False)]
    for a, b in zip(straight[4:], resumed, strict=True):
        assert a["input_ids"].equal(b["input_ids"]) and a["source"].equal(b["source"])


def test_templates_and_prefixes_shape_each_tasks_prompt(tmp_path, tokenizer):
    from lmforge.data.multitask import iter_task_conversations

    path = _rows(tmp_path, {"qa": 1, "echo": 1})
    cfg = MultitaskConfig(prefix="{task}: ", templates={"echo": "Repeat: {q}"})
    rows = list(iter_task_conversations([str(path)], InstructionFormat("{q}", "a"), cfg))
    prompts = {task: messages[0]["content"] for _, task, messages in rows}
    assert prompts == {"qa": "qa: question 0 of qa", "echo": "echo: Repeat: question 0 of echo"}


def test_a_task_the_data_lacks_is_named(tmp_path, chat_tokenizer):
    path = _rows(tmp_path, {"qa": 4, "echo": 4})
    for cfg, key in ((MultitaskConfig(tasks=["qa", "sumary"]), "tasks"), (MultitaskConfig(held_out_tasks=["nope"]), "held_out_tasks"),
                     (MultitaskConfig(templates={"ecko": "{q}"}), "templates")):
        with pytest.raises(DataError, match=rf"data.multitask.{key}: '\w+' is not a task of the data \(its 'task' column has: echo, qa\)"):
            load_tasks([str(path)], chat_tokenizer, InstructionFormat("{q}", "a"), cfg, 64, 0.0, "drop")


def test_tasks_too_long_for_seq_len_are_skipped_unless_named(tmp_path, chat_tokenizer):
    path = tmp_path / "tasks.jsonl"
    rows = [{"task": "short", "q": "hi", "a": "yes"}] * 4 + [{"task": "long", "q": "word " * 200, "a": "no"}] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = InstructionFormat("{q}", "a")
    sets = load_tasks([str(path)], chat_tokenizer, fmt, MultitaskConfig(), 64, 0.0, "drop")
    assert sets.names == ["short"] and sets.skipped == ["long"]
    with pytest.raises(DataError, match=r"data.multitask.tasks: task 'long' has no training example that fits"):
        load_tasks([str(path)], chat_tokenizer, fmt, MultitaskConfig(tasks=["short", "long"]), 64, 0.0, "drop")


def test_a_multitask_run_reports_each_task_and_the_held_out_task(tmp_path, base_model):
    with gzip.open(EXCERPT, "rt") as handle:
        tasks = sorted({json.loads(line)["task"] for line in handle if "mctaco" in line})  # short examples
    unseen = tasks[0]
    recipe = write_recipe(tmp_path, base_model, {
        "objective": {"name": "sft"},
        "data": {"train_files": [str(EXCERPT)], "prompt_template": "{prompt}", "response_column": "response",
                 "val_fraction": 0.1, "multitask": {"sampling": "temperature", "temperature": 2.0, "prefix": "{task}: ",
                                                    "tasks": tasks[1:6], "held_out_tasks": [unseen]}},
        "trainer": {"max_steps": 16, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 16, "log_every": 8,
                    "precision": "fp32"}}, {"method": {"name": "full"}})
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 0, result.output
    assert "of 5 tasks (temperature sampling" in result.output and f"held-out tasks {unseen}" in result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    trained_keys = {k for k in after if k.startswith("task/")}
    assert trained_keys and all(k.split("/")[1] in tasks[1:6] for k in trained_keys)
    assert after[f"heldout/{unseen}/loss"] < before[f"heldout/{unseen}/loss"]  # the unseen task's answers too
    assert after["loss"] < before["loss"]
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")[-1]
    assert abs(sum(train[f"mix_{t}"] for t in tasks[1:6]) - 1) < 1e-6
    assert "task/" not in result.output  # each task's numbers go to metrics.jsonl, not the console
