"""Continual pretraining: start from a checkpoint, mix domain data with replay, watch both sets."""

import gzip
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.mixing import iterate_mixture
from lmforge.data.packing import PackedRows
from lmforge.data.shards import Shard
from lmforge.engine.metrics import read_metrics

from .conftest import REPO

PYDOCS = REPO / "assets" / "corpora" / "pydocs_excerpt.jsonl.gz"
TINY = {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 256}


def _rows(value: int, n: int = 400) -> PackedRows:
    return PackedRows([Shard(np.full(n, value, dtype=np.uint16), np.array([n], dtype=np.uint64))], 4)


def test_mixture_is_deterministic_weighted_and_resumable():
    sources = [_rows(1), _rows(2)]
    stream = iterate_mixture(sources, [0.8, 0.2], 32, seed=3)
    batches = [next(stream) for _ in range(60)]
    share = torch.cat([b["source"] for b in batches]).float().mean().item()  # fraction from source 1
    assert abs(share - 0.2) < 0.03
    for b in batches:
        assert ((b["input_ids"][:, 0] == 1) == (b["source"] == 0)).all()  # rows really come from their source
    resumed = iterate_mixture(sources, [0.8, 0.2], 32, seed=3, start_batch=40)
    assert torch.equal(next(resumed)["input_ids"], batches[40]["input_ids"])


def _write(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_general_then_domain_pretraining_lowers_domain_perplexity(tmp_path, small_jsonl):
    with gzip.open(PYDOCS, "rt") as handle:
        domain = _write(tmp_path / "domain.jsonl", [json.loads(line)["text"] for line in handle][:15])
    general = {
        "output_dir": str(tmp_path / "general"),
        "tokenizer": {"train_files": [str(small_jsonl)], "vocab_size": 512},
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
        "model": {"family": "llama", "preset": "tiny", "overrides": TINY},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 60,
                    "eval_batches": 4, "progress": False, "precision": "fp32"},
        "generate": {"prompts": ["The"], "max_new_tokens": 4},
    }
    (tmp_path / "general.yaml").write_text(yaml.safe_dump(general))
    assert CliRunner().invoke(app, ["run", str(tmp_path / "general.yaml")]).exit_code == 0
    final = str(tmp_path / "general" / "final")
    cpt = {
        "output_dir": str(tmp_path / "domain"),
        "tokenizer": {"path": final},
        "data": {"val_fraction": 0.15, "mixture": [
            {"name": "python_docs", "train_files": [domain], "weight": 0.8},
            {"name": "general", "prepared_dir": str(tmp_path / "general" / "data"), "weight": 0.2}]},
        "model": {"path": final},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "eval_every": 20,
                    "eval_batches": 4, "eval_at_start": True, "log_every": 10, "progress": False, "precision": "fp32"},
        "generate": {"prompts": ["import"], "max_new_tokens": 4},
    }
    (tmp_path / "domain.yaml").write_text(yaml.safe_dump(cpt))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "domain.yaml")])
    assert result.exit_code == 0, result.output
    evals = read_metrics(tmp_path / "domain" / "metrics.jsonl", "val")
    assert [e["step"] for e in evals] == [0, 20, 40]
    before, after = evals[0], evals[-1]
    assert after["python_docs_ppl"] < 0.8 * before["python_docs_ppl"]
    assert {"general_loss", "general_ppl"} <= set(after)  # forgetting is measured at every eval
    mix = [r["mix_python_docs"] for r in read_metrics(tmp_path / "domain" / "metrics.jsonl", "train")]
    assert sum(mix) / len(mix) == pytest.approx(0.8, abs=0.06)
    summary = json.loads((tmp_path / "domain" / "summary.json").read_text())
    assert set(summary["eval"]) == {"python_docs", "general"}
    assert summary["eval_before"]["python_docs_loss"] > summary["eval"]["python_docs"]["loss"]
    assert "data mix seen: python_docs" in result.output
