"""Continual pretraining: start from a checkpoint, mix domain data with replay, watch both sets."""

import gzip
import json
from pathlib import Path

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


@pytest.fixture(scope="module")
def general_model(tmp_path_factory, small_jsonl):
    """A tiny decoder pretrained on general English, and a domain corpus (Python docs)."""
    tmp_path = tmp_path_factory.mktemp("general")
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
    return tmp_path / "general", domain


def _cpt_recipe(tmp_path, general_dir, domain, **tokenizer):
    final = str(general_dir / "final")
    return {
        "output_dir": str(tmp_path / "domain"),
        "tokenizer": {"path": final, **tokenizer},
        "data": {"val_fraction": 0.15, "mixture": [
            {"name": "python_docs", "train_files": [domain], "weight": 0.8},
            {"name": "general", "prepared_dir": str(general_dir / "data"), "weight": 0.2}]},
        "model": {"path": final},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "eval_every": 20,
                    "eval_batches": 4, "eval_at_start": True, "log_every": 10, "progress": False, "precision": "fp32"},
        "generate": {"prompts": ["import"], "max_new_tokens": 4},
    }


def test_general_then_domain_pretraining_lowers_domain_perplexity(tmp_path, general_model):
    cpt = _cpt_recipe(tmp_path, *general_model)
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
    assert "with trust_remote_code off" in result.output  # the log says how a checkpoint was loaded


def test_tokenizer_extension_with_mean_initialised_embeddings(tmp_path, general_model):
    from lmforge.data.tokenizer import domain_tokens, extend_tokenizer, load_tokenizer
    from lmforge.models.factory import init_new_embeddings, load_model

    general_dir, domain = general_model
    base = load_tokenizer(general_dir / "final")
    texts = [json.loads(line)["text"] for line in Path(domain).read_text().splitlines()]
    new = domain_tokens(base, texts, 20, min_frequency=3)
    assert len(new) == 20 and all(t not in base.get_vocab() for t in new)
    extended = load_tokenizer(general_dir / "final")
    ids = extend_tokenizer(extended, new)
    sample = texts[0][:3000]
    assert len(extended(sample, add_special_tokens=False).input_ids) < len(base(sample, add_special_tokens=False).input_ids)
    assert extended.decode(extended(sample, add_special_tokens=False).input_ids) == sample
    model = load_model(general_dir / "final", "causal_lm")
    old = model.get_input_embeddings().weight.detach().clone()
    init_new_embeddings(model, base, new, ids)
    table = model.get_input_embeddings().weight
    assert table.shape[0] > max(ids) and torch.equal(table[: old.shape[0]], old)
    pieces = base(new[0], add_special_tokens=False).input_ids
    torch.testing.assert_close(table[ids[0]], old[pieces].mean(0))

    # and the whole continual-pretraining run with an extended tokenizer
    cpt = _cpt_recipe(tmp_path, general_dir, str(domain), extend_files=[str(domain)], extend_count=20,
                      extend_min_frequency=3)
    # the replayed general corpus was prepared with the old tokenizer: the run prepares it again from
    # its recorded source files (it stopped with a tokenizer mismatch before)
    cpt["trainer"]["max_steps"] = 10
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cpt))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "ext.yaml")])
    assert result.exit_code == 0, result.output
    assert "tokenizer: 20 domain tokens added to" in result.output and "tokens per character of held-out domain text" in result.output
    assert "was tokenized with another tokenizer" in result.output and "data mix seen: python_docs" in result.output
    replay = json.loads((tmp_path / "domain" / "retokenized_general" / "manifest.json").read_text())
    original = json.loads((general_dir / "data" / "manifest.json").read_text())
    assert replay["splits"]["val"]["docs"] == original["splits"]["val"]["docs"]  # the same documents held out
    assert replay["tokenizer_fingerprint"] != original["tokenizer_fingerprint"]
    final = load_tokenizer(tmp_path / "domain" / "final")
    assert len(final) == len(base) + 20
