"""Data presets (`data.preset`) and the dataset registry (`data.dataset`, datasets.yaml)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ConfigError
from lmforge.data.formats import read_all
from lmforge.data.instructions import InstructionFormat, iter_conversations
from lmforge.recipe_files import load_recipe


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, data: dict, objective: str = "sft", name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"data": data, "objective": {"name": objective}}))
    return path


def test_alpaca_and_sharegpt_presets_map_their_columns(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                                          {"instruction": "Say hi.", "input": "", "output": "hi"}])
    recipe = load_recipe(_recipe(tmp_path, {"train_files": [alpaca], "preset": "alpaca"}))
    rows = [m for _, m in read_all(iter_conversations([alpaca], InstructionFormat.of(recipe.data)))]
    assert rows[0][0] == {"role": "user", "content": "Add.\n\n2 and 3"} and rows[0][1]["content"] == "5"
    assert rows[1][0]["content"] == "Say hi."  # an empty input leaves no blank tail
    sharegpt = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "Be kind."},
                                                                {"from": "human", "value": "Hello"},
                                                                {"from": "gpt", "value": "Hi!"}]}])
    recipe = load_recipe(_recipe(tmp_path, {"train_files": [sharegpt], "preset": "sharegpt"}))
    (_, messages), = read_all(iter_conversations([sharegpt], InstructionFormat.of(recipe.data)))
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    # without the preset alpaca's columns are not found: the preset is what makes those rows readable
    plain = load_recipe(_recipe(tmp_path, {"train_files": [alpaca]}))
    with pytest.raises(Exception, match="no column 'prompt', 'response'"):
        read_all(iter_conversations([alpaca], InstructionFormat.of(plain.data)))


def test_a_preset_that_does_not_fit_the_objective_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.preset 'labelled' holds labelled texts .*objective 'sft' reads conversations"):
        load_recipe(_recipe(tmp_path, {"train_files": ["x.jsonl"], "preset": "labelled"}))
    with pytest.raises(ConfigError, match="data.preset 'alpacca' is unknown; did you mean 'alpaca'"):
        load_recipe(_recipe(tmp_path, {"train_files": ["x.jsonl"], "preset": "alpacca"}))


def test_the_registry_names_files_and_columns_and_the_recipe_wins(tmp_path, monkeypatch):
    data = tmp_path / "sets"
    data.mkdir()
    (data / "datasets.yaml").write_text(yaml.safe_dump({
        "support_chats": {"files": ["chats/train.jsonl"], "val_files": ["chats/test.jsonl"], "preset": "sharegpt",
                          "description": "our help desk"},
        "reviews": {"files": ["reviews.csv"], "preset": "labelled", "label_column": "stars"}}))
    monkeypatch.setenv("LMFORGE_DATASETS", str(data / "datasets.yaml"))
    recipe = load_recipe(_recipe(tmp_path, {"dataset": "support_chats"}))
    assert recipe.data.train_files == [str(data / "chats" / "train.jsonl")]  # relative to the registry file
    assert recipe.data.val_files == [str(data / "chats" / "test.jsonl")] and recipe.data.messages_column == "conversations"
    recipe = load_recipe(_recipe(tmp_path, {"dataset": "reviews", "label_column": "grade"}, "classify"))
    assert recipe.data.label_column == "grade" and recipe.data.column == "text"  # the recipe's key wins, the preset fills
    with pytest.raises(ConfigError, match="data.dataset 'support_chat' is not in .*datasets.yaml; did you mean 'support_chats'"):
        load_recipe(_recipe(tmp_path, {"dataset": "support_chat"}))
    monkeypatch.delenv("LMFORGE_DATASETS")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="datasets.yaml: no dataset registry here"):
        load_recipe(_recipe(tmp_path, {"dataset": "support_chats"}))


def test_a_classifier_trains_from_a_registered_dataset(tmp_path, genre_file, tokenizer_dir, monkeypatch):
    rows = [json.loads(line) for line in genre_file.read_text().splitlines() if line.strip()]
    _jsonl(tmp_path / "genres.jsonl", [{"text": r["text"], "label": r["genre"]} for r in rows])
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump({"genres": {"files": ["genres.jsonl"], "preset": "labelled"}}))
    monkeypatch.chdir(tmp_path)
    recipe = {"output_dir": str(tmp_path / "out"), "tokenizer": {"path": str(tokenizer_dir)},
              "data": {"dataset": "genres", "val_fraction": 0.2}, "objective": {"name": "classify"},
              "model": {"family": "bert", "preset": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                                          "num_attention_heads": 2, "intermediate_size": 64}},
              "packing": {"seq_len": 32}, "trainer": {"max_steps": 3, "batch_size": 8, "progress": False, "precision": "fp32"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", "r.yaml"])
    assert result.exit_code == 0, result.output
    assert "2 labels" in result.output


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_every_row_reader_takes_jsonl_csv_and_parquet(tmp_path, tokenizer, fmt):
    """Labelled rows, text pairs, conversations and preference pairs from each file format: the same rows."""
    import pandas as pd

    from lmforge.data.instructions import ensure_chat_template, load_instructions
    from lmforge.data.labeled import load_labeled
    from lmforge.data.pairs import load_pairs
    from lmforge.data.preferences import load_preferences

    rows = [{"text": f"text {i}", "label": "ab"[i % 2], "positive": f"pos {i}", "prompt": f"q {i}",
             "response": f"answer {i}", "chosen": "good", "rejected": "bad"} for i in range(10)]
    path = tmp_path / f"rows.{fmt}"
    frame = pd.DataFrame(rows)
    {"jsonl": lambda: _jsonl(path, rows), "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    files = [str(path)]
    train, val, names = load_labeled(files, tokenizer, "text", "label", None, 32, 0.2)
    assert len(train) + len(val) == 10 and names == ["a", "b"]
    train, val = load_pairs(files, tokenizer, "text", "positive", 32, 0.2)
    assert len(train) + len(val) == 10
    ensure_chat_template(tokenizer, None)
    sets = load_instructions(files, tokenizer, InstructionFormat(), 64, 0.2)
    assert len(sets.train) + len(sets.val) == 10
    sets = load_preferences(files, tokenizer, InstructionFormat(), "chosen", "rejected", 64, 0.2)
    assert len(sets.train) + len(sets.val) == 10
