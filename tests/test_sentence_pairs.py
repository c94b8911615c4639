"""NSP / SOP: document-aware pairs, the loss against BertForPreTraining's own, and training."""

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ObjectiveConfig
from lmforge.data.sentence_pairs import SentencePairs, _documents
from lmforge.engine.metrics import read_metrics
from lmforge.models.factory import build_model, preset_config
from lmforge.objectives import get_objective

TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    text, pattern = haystack.tobytes(), needle.astype(np.int64).tobytes()
    return any(text[i:i + len(pattern)] == pattern for i in range(0, len(text) - len(pattern) + 1, 8))


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pairs_are_document_aware_and_balanced(prepared, tokenizer, task):
    shards = prepared.split("train")
    pairs = SentencePairs(shards, tokenizer, 64, task, seed=0)
    docs = _documents(shards)
    labels = np.array([label for _, _, label in pairs.examples])
    assert len(pairs) > 200 and abs(labels.mean() - 0.5) < 0.08
    for a, b, label in pairs.examples[:60]:
        assert len(a) + len(b) <= 61
        joined_true = np.concatenate([a, b])
        joined_swapped = np.concatenate([b, a])
        follows = any(_contains(d, joined_true) for d in docs)
        if label == 0:
            assert follows  # B is the real continuation of A in one document
        elif task == "sop":
            assert any(_contains(d, joined_swapped) for d in docs) and not follows
        else:
            assert not follows  # B comes from another document
    batch = pairs.batch([0, 1, 2])
    row = batch["input_ids"][0]
    a_len = len(pairs.examples[0][0])
    assert row[0] == tokenizer.bos_token_id and row[a_len + 1] == tokenizer.eos_token_id
    assert batch["token_type_ids"][0, : a_len + 2].sum() == 0 and batch["token_type_ids"][0, a_len + 2] == 1


def test_mlm_plus_nsp_loss_matches_bert_for_pretraining(prepared, tokenizer):
    objective = get_objective(ObjectiveConfig(name="mlm", sentence_task="nsp"), tokenizer)
    assert objective.head == "pretraining"
    torch.manual_seed(0)
    model = build_model(preset_config("bert", "tiny", len(tokenizer), 128, **TINY_BERT), "pretraining").eval()
    batch = SentencePairs(prepared.split("train"), tokenizer, 64, "nsp", seed=0).batch(list(range(8)))
    inputs, labels = objective.corrupt(batch["input_ids"])
    assert not (labels[batch["attention_mask"] == 0] != -100).any()  # padding is never masked
    with torch.no_grad():
        ours, metrics = objective.masked_loss(model, inputs, labels, batch)
        theirs = model(input_ids=inputs, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                       labels=labels, next_sentence_label=batch["next_sentence_label"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert metrics["sentences"] == 8


def test_mlm_with_sop_trains_and_reports_sentence_accuracy(tmp_path, tokenizer_dir, prepared):
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"prepared_dir": str(prepared.directory)},
        "objective": {"name": "mlm", "sentence_task": "sop"},
        "model": {"family": "bert", "preset": "tiny", "overrides": TINY_BERT},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "warmup_steps": 4, "log_every": 10,
                    "eval_every": 40, "eval_batches": 4, "progress": False, "precision": "fp32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl", "train")]
    assert losses[-1] < losses[0]
    val = read_metrics(tmp_path / "out" / "metrics.jsonl", "val")[-1]
    assert 0.0 <= val["sentence_accuracy"] <= 1.0 and "accuracy" in val
    assert "sentence_accuracy" in result.output
