"""The docs' examples run as written: each fenced block titled with a path (```yaml datasets.yaml) is
written into an empty folder, then each line of the page's ```bash blocks runs there."""

import re
import shlex

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

from .conftest import REPO

# pages of reference and measurements, no workflow to run: the others each have a test here
REFERENCE_PAGES = ("performance.md", "recipe-keys.md", "architecture.md", "training.md")
FENCE = re.compile(r"^```(\w+)(?: (\S+))?\n(.*?)^```", re.S | re.M)


def run_page(page, folder, monkeypatch) -> list[str]:
    """Every command's output, in order; a failing command fails the test with its output."""
    text = (REPO / "docs" / page).read_text()
    commands = []
    for lang, path, body in FENCE.findall(text):
        if path:
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        elif lang == "bash":
            commands += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    assert commands, f"docs/{page}: no commands to run"
    monkeypatch.chdir(folder)
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "lmforge", command
        if argv[1] == "chat":
            continue  # interactive: tests/test_sft.py drives it
        result = CliRunner().invoke(app, argv[1:])
        assert result.exit_code == 0, f"docs/{page}: `{command}` failed:\n{result.output}"
        outputs.append(result.output)
    return outputs


def test_your_data_page_runs(tmp_path, monkeypatch):
    check, run, evaluate = run_page("your-data.md", tmp_path, monkeypatch)
    assert "data: 4 training examples" in run and ", 2 held out" in run  # the held-out pair is the test file's
    from lmforge.engine.metrics import read_metrics

    before, after = read_metrics(tmp_path / "runs" / "support" / "metrics.jsonl", "val")
    assert after["loss"] < before["loss"]
    assert "rouge" in evaluate.lower()


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name not in REFERENCE_PAGES))
def test_every_docs_page_has_a_test(page):
    assert f'"{page}"' in (REPO / "tests" / "test_docs.py").read_text(), f"docs/{page} has no test running its example"


def test_the_recipe_key_reference_is_current():
    """docs/recipe-keys.md is generated from config.py's models: a key added, renamed or re-commented
    without regenerating it fails here (python -m lmforge.recipe_reference > docs/recipe-keys.md)."""
    from lmforge.config import DataConfig, Recipe
    from lmforge.recipe_reference import reference

    text = reference()
    assert (REPO / "docs" / "recipe-keys.md").read_text() == text, "stale: regenerate docs/recipe-keys.md"
    for section, model in (("data", DataConfig), ("trainer", type(Recipe().trainer))):
        for key in model.model_fields:  # every key the validator accepts is in the reference
            table = text.split(f"## `{section}`", 1)[1]
            assert f"| `{key}` |" in table or f"## `{section}.{key}" in text, f"{section}.{key} missing"
