"""Sequence classification: labels from data, a fixed label set refusing strangers, training."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import DataError
from lmforge.data.labeled import iter_labeled, labeled_split, load_labeled
from lmforge.engine.metrics import read_metrics

TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def test_label_set_from_data_and_refusal_of_unknown_labels(tmp_path, genre_file, tokenizer):
    train, val, names = load_labeled([str(genre_file)], tokenizer, "text", "genre", None, 64, 0.2)
    assert names == ["fiction", "news"] and len(train) > len(val) > 0
    assert set(train.labels) == {0, 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "genre": "news"}\n{"text": "b", "genre": "poetry"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: label 'poetry' is not in the label set"):
        load_labeled([str(bad)], tokenizer, "text", "genre", ["fiction", "news"], 64, 0.0)
    # a scan goes on past a malformed line and lists every bad row
    bad.write_text('{"text": "a", "genre": "news"}\n{broken\n{"text": "c", "genre": "poetry"}\n')
    errors = [str(r) for r in iter_labeled([str(bad)], "text", "genre", ["fiction", "news"]) if isinstance(r, DataError)]
    assert len(errors) == 2 and "bad.jsonl:2: malformed JSON" in errors[0] and "bad.jsonl:3: label 'poetry'" in errors[1]


def test_classifier_trains_and_loads_with_plain_transformers(tmp_path, genre_file, tokenizer_dir):
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train_files": [str(genre_file)], "column": "text", "label_column": "genre",
                 "labels": ["fiction", "news"], "val_fraction": 0.2},
        "objective": {"name": "classify"},
        "model": {"family": "bert", "preset": "tiny", "overrides": TINY_BERT},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 60, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "eval_every": 60,
                    "eval_at_start": True, "log_every": 10, "progress": False, "precision": "fp32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    before, after = read_metrics(tmp_path / "out" / "metrics.jsonl", "val")
    assert after["accuracy"] > max(before["accuracy"], 0.7)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / "final"))
    assert model.config.id2label == {0: "fiction", 1: "news"}
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)


def test_held_out_metrics_cover_every_row_and_equal_scikit_learn(genre_file, tokenizer, capsys):
    """All held-out rows are scored (not eval_batches x batch_size of them), with macro-F1, per-class
    precision/recall and the confusion matrix as scikit-learn computes them from the same predictions."""
    from sklearn.metrics import confusion_matrix, f1_score, recall_score

    from lmforge.config import ObjectiveConfig
    from lmforge.eval.classification import classification_metrics
    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives import get_objective

    _, val, names = load_labeled([str(genre_file)], tokenizer, "text", "genre", None, 64, 0.5)
    torch.manual_seed(1)
    model = build_model(preset_config("bert", "tiny", (len(tokenizer) + 63) // 64 * 64, 128, num_labels=2, **TINY_BERT),
                        "classifier", tokenizer).eval()
    objective = get_objective(ObjectiveConfig(name="classify"), tokenizer)
    metrics = classification_metrics(model, objective, val, 3, torch.device("cpu"), "fp32", names)
    assert metrics["tokens"] == len(val) > 3 * 2  # batch size 3: every batch, not a sample
    with torch.no_grad():
        predicted = objective.logits(model, val.batch(list(range(len(val))))).argmax(-1).tolist()
    assert metrics["macro_f1"] == pytest.approx(f1_score(val.labels, predicted, average="macro"))
    recalls = recall_score(val.labels, predicted, average=None, labels=[0, 1], zero_division=0)
    assert [metrics["recall_fiction"], metrics["recall_news"]] == pytest.approx(list(recalls))
    assert metrics["confusion"] == confusion_matrix(val.labels, predicted, labels=[0, 1]).tolist()
    assert metrics["support_fiction"] + metrics["support_news"] == len(val)
    capsys.readouterr()
    one_by_one = classification_metrics(model, objective, val, 1, torch.device("cpu"), "fp32", names)
    assert one_by_one["confusion"] == metrics["confusion"]
    assert "classify held-out rows" in capsys.readouterr().err  # many batches: a progress bar with an ETA


def test_a_lora_classifier_loads_with_plain_peft_with_its_labels(tmp_path, genre_file, base_model, monkeypatch, capsys):
    """The adapter folder of a LoRA classifier (head trained too) loads with plain
    AutoPeftModelForSequenceClassification: its label map, a head of the right size, lmforge's logits."""
    from peft import AutoPeftModelForSequenceClassification

    from lmforge.models.factory import load_model

    monkeypatch.chdir(tmp_path)
    recipe = {
        "output_dir": "out", "tokenizer": {"path": str(base_model)}, "model": {"path": str(base_model)},
        "data": {"train_files": [str(genre_file)], "label_column": "genre", "labels": ["news", "fiction", "other"],
                 "val_fraction": 0.2},
        "objective": {"name": "classify"}, "method": {"name": "lora", "lora": {"rank": 4, "base_dtype": "fp32"}},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 4, "batch_size": 8, "eval_every": 100, "progress": False, "precision": "fp32"},
    }
    Path("r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", "r.yaml"])
    assert result.exit_code == 0, result.output
    config = json.loads(Path("out/final/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "out/final/base"
    plain = AutoPeftModelForSequenceClassification.from_pretrained("out/final").eval()
    assert plain.config.id2label == {0: "news", 1: "fiction", 2: "other"}
    capsys.readouterr()
    ours = load_model("out/final", "classifier").eval()
    assert "newly initialised" not in capsys.readouterr().out  # its trained head is in the adapter
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
    # the base's weights are linked, not copied: the folder stays adapter-sized on one file system
    assert Path("out/final/base/model.safetensors").stat().st_ino == (base_model / "model.safetensors").stat().st_ino


def test_a_label_budget_keeps_the_held_out_rows_and_nests_the_training_rows(genre_file):
    """data.max_docs on labelled data: that many training rows (smaller budgets inside larger ones, both
    classes), the held-out rows those of the whole file: a label-budget curve scores every run on one set."""
    whole_train, whole_val, _ = labeled_split([str(genre_file)], "text", "genre", None, 0.25)
    small, small_val, _ = labeled_split([str(genre_file)], "text", "genre", None, 0.25, max_rows=16)
    large, large_val, _ = labeled_split([str(genre_file)], "text", "genre", None, 0.25, max_rows=40)
    assert small_val == large_val == whole_val and len(whole_val) > 0
    assert len(small) == 16 and len(large) == 40 < len(whole_train)
    assert set(small) <= set(large) <= set(whole_train)
    assert {label for _, label in small} == {"fiction", "news"}


def test_the_few_shot_baseline_draws_the_same_shots_for_every_seed(monkeypatch, genre_file, base_model):
    """Each seed once drew its own 8 shots, so the baseline ranged 0.25-0.50 across seeds: they are fixed."""
    from lmforge.eval import fewshot
    from lmforge.recipe_files import validate_recipe

    drawn = []
    monkeypatch.setattr(fewshot, "few_shot_baseline", lambda _m, shots, *a, **k: drawn.append(shots) or {})

    def baseline(seed: int, budget: int | None = None) -> dict:
        recipe = validate_recipe({"seed": seed, "objective": {"name": "classify"},
                                  "data": {"train_files": [str(genre_file)], "column": "text", "label_column": "genre",
                                           "val_fraction": 0.25, "max_docs": budget}})
        return fewshot.recipe_baseline(recipe, base_model, torch.device("cpu"))

    assert baseline(0)["shot_seed"] == baseline(7)["shot_seed"] == fewshot.SHOT_SEED
    assert drawn[0] == drawn[1] and len(drawn[0]) == 8
    baseline(0, budget=16)  # shots come from the rows the stage could train on
    budget_rows, _, _ = labeled_split(
        [str(genre_file)], "text", "genre", None, 0.25, max_rows=16)
    assert {text for text, _ in drawn[2]} <= {text for text, _ in budget_rows}
    # and from the first rows of the nested sample: the budgets of a curve that have them share one baseline
    whole = len(labeled_split([str(genre_file)], "text", "genre", None, 0.25)[0])
    assert whole > fewshot.SHOT_POOL + 8
    baseline(0, budget=fewshot.SHOT_POOL)
    baseline(0, budget=whole - 4)
    assert drawn[3] == drawn[4] == drawn[0] != drawn[2]


def test_a_label_prompt_starts_the_classifier_as_the_language_models_own_guess(tmp_path, genre_file, base_model,
                                                                               monkeypatch, tokenizer):
    """objective.label_prompt (prompt-based fine-tuning): at step 0 the classifier's held-out loss and accuracy
    are the causal LM's own, from its logits for " fiction" / " news" after "TEXT\\nLabel:"; the prompt is kept
    in the saved config, and predict adds it (the probabilities equal plain transformers' on text + prompt)."""
    from lmforge.config import Recipe
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, load_model, preset_config
    from lmforge.objectives.classify import label_word_head

    monkeypatch.chdir(tmp_path)
    prompt = "\nLabel:"
    recipe = {
        "output_dir": "out", "tokenizer": {"path": str(base_model)}, "model": {"path": str(base_model)},
        "data": {"train_files": [str(genre_file)], "label_column": "genre", "val_fraction": 0.2},
        "objective": {"name": "classify", "label_prompt": prompt}, "packing": {"seq_len": 24},
        "trainer": {"max_steps": 2, "batch_size": 8, "eval_at_start": True, "eval_every": 100, "progress": False,
                    "precision": "fp32"},
    }
    Path("r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", "r.yaml"])
    assert result.exit_code == 0, result.output
    start = next(r for r in read_metrics(Path("out/metrics.jsonl")) if r.get("split") == "val" and r["step"] == 0)

    tok, lm = load_tokenizer(base_model), load_model(base_model, "causal_lm").eval()
    _, val, names = load_labeled([str(genre_file)], tok, "text", "genre", None, 24, 0.2, prompt=prompt)
    tail = tok(prompt, add_special_tokens=False).input_ids
    assert all(row[-len(tail):] == tail and len(row) <= 24 for row in val.ids)  # the text is cut, not the prompt
    words = [tok(f" {n}", add_special_tokens=False).input_ids[0] for n in names]
    with torch.no_grad():
        restricted = torch.stack([lm(input_ids=torch.tensor([row])).logits[0, -1, words] for row in val.ids])
    labels = torch.tensor(val.labels)
    assert start["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(restricted, labels)), rel=1e-4)
    assert start["accuracy"] == pytest.approx(float((restricted.argmax(-1) == labels).float().mean()))

    saved = json.loads(Path("out/final/config.json").read_text())
    assert saved["lmforge_label_prompt"] == prompt
    code = CliRunner().invoke(app, ["predict", "-m", "out/final", "-d", str(genre_file), "-o", "p.jsonl"])
    assert code.exit_code == 0, code.output
    plain = AutoModelForSequenceClassification.from_pretrained("out/final").eval()
    rows = [json.loads(x) for x in Path("p.jsonl").read_text().splitlines()][:8]
    unprompted = []
    for row in rows:  # predict runs in bf16 where this machine is faster in it: agreement to 5e-3
        ids = tok(row["text"], truncation=True, max_length=24 - len(tail)).input_ids
        with torch.no_grad():
            probs = plain(input_ids=torch.tensor([ids + tail])).logits[0].softmax(-1)
            unprompted.append(plain(input_ids=torch.tensor([ids])).logits[0].softmax(-1))
        assert [row["p_fiction"], row["p_news"]] == pytest.approx(probs.tolist(), abs=5e-3)
    assert max(abs(row["p_fiction"] - float(u[0])) for row, u in zip(rows, unprompted, strict=True)) > 0.02
    # eval adds the prompt too: its accuracy on the file is predict's
    code = CliRunner().invoke(app, ["eval", "-m", "out/final", "--task", f"g={genre_file}", "--label-column", "genre",
                                    "-o", "ev"])
    assert code.exit_code == 0, code.output
    predicted = [json.loads(x) for x in Path("p.jsonl").read_text().splitlines()]
    agree = sum(r["predicted_label"] == r["genre"] for r in predicted) / len(predicted)
    assert json.loads(Path("ev/eval.json").read_text())["tasks"]["g"]["after"]["accuracy"] == pytest.approx(agree)

    with pytest.raises(ValueError, match="objective.label_prompt: starts a classifier head"):
        Recipe.model_validate({**recipe, "objective": {"name": "clm", "label_prompt": prompt}})
    bert = build_model(preset_config("bert", "tiny", (len(tokenizer) + 63) // 64 * 64, 128, num_labels=2, **TINY_BERT),
                       "classifier", tokenizer)
    with pytest.raises(ValueError, match="needs a decoder"):
        label_word_head(bert, tokenizer, names, prompt, bert.get_input_embeddings().weight)
