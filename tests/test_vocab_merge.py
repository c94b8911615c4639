"""Vocabulary extension for text without spaces (issue 32): sub-word pieces a BPE model learns from the
domain text, merged into the base tokenizer's own merges (Chinese-LLaMA's way), against whole-word
added tokens, which add clauses for Chinese and shorten little."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.tokenizer import (
    domain_tokens,
    extend_tokenizer,
    load_tokenizer,
    merge_domain_pieces,
    tokens_per_character,
)
from lmforge.outputs import read_stamp

from .conftest import REPO

runner = CliRunner()
CHINESE = REPO / "assets" / "corpora" / "chinese_reviews_excerpt.jsonl.gz"


@pytest.fixture(scope="module")
def reviews() -> tuple[list[str], list[str]]:
    with gzip.open(CHINESE, "rt") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    return texts[:1500], texts[1500:]  # learn from these, measure on those


def test_merged_pieces_shorten_chinese_and_load_with_plain_transformers(tmp_path, tokenizer_dir, reviews):
    learn, held_out = reviews
    base = load_tokenizer(tokenizer_dir)
    before = tokens_per_character(base, held_out)
    tokenizer = load_tokenizer(tokenizer_dir)
    backend, new_tokens, new_ids, pieces = merge_domain_pieces(tokenizer, learn, 300, 3)
    tokenizer._tokenizer = backend
    assert len(new_tokens) == len(set(new_tokens)) == 300 and new_ids == list(range(len(base), len(base) + 300))
    after = tokens_per_character(tokenizer, held_out)
    assert before / after >= 1.5, (before, after)
    for text in held_out[:50]:  # the same text back, every character
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    vocab = base.get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    for token, parts in zip(new_tokens, pieces, strict=True):  # each piece is spelled by the base tokens it starts from
        assert "".join(inverse[i] for i in parts) == token and len(parts) >= 2
    tokenizer.save_pretrained(tmp_path / "merged")
    plain = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert plain(held_out[0], add_special_tokens=False).input_ids == tokenizer(held_out[0], add_special_tokens=False).input_ids
    assert any(i >= len(base) for i in plain(held_out[0], add_special_tokens=False).input_ids)


def test_whole_words_shorten_chinese_far_less_than_pieces(tokenizer_dir, reviews):
    """Chinese has no spaces: a pre-tokenized "word" is a clause, seen once; whole-word added tokens barely help."""
    learn, held_out = reviews
    words = load_tokenizer(tokenizer_dir)
    extend_tokenizer(words, domain_tokens(words, learn, 300, 3))
    merged = load_tokenizer(tokenizer_dir)
    merged._tokenizer = merge_domain_pieces(merged, learn, 300, 3)[0]
    base = tokens_per_character(load_tokenizer(tokenizer_dir), held_out)
    assert base / tokens_per_character(words, held_out) < 1.2 < 1.5 <= base / tokens_per_character(merged, held_out)


def test_a_continual_stage_with_merged_pieces_starts_their_rows_from_their_parts(tmp_path, base_model, reviews):
    from lmforge.models.factory import load_model

    recipe = {"output_dir": str(tmp_path / "out"),
              "tokenizer": {"path": str(base_model), "extend_files": [str(CHINESE)], "extend_count": 200,
                            "extend_min_frequency": 3, "extend_method": "bpe"},
              "model": {"path": str(base_model)}, "data": {"train_files": [str(CHINESE)], "max_docs": 200},
              "packing": {"seq_len": 64},
              "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-12, "weight_decay": 0.0, "progress": False, "precision": "fp32",
                          "eval_every": 100}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("tokenizer: 200 pieces merged into its BPE"))
    before, after = (float(v) for v in line.split("held-out domain text ")[1].split(";")[0].split(" (")[0].split(" -> "))
    assert before / after >= 1.5
    stamp = read_stamp(tmp_path / "out" / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    assert len(tokenizer) == len(load_tokenizer(base_model)) + 200
    start = load_model(base_model, "causal_lm").get_input_embeddings().weight
    trained = load_model(tmp_path / "out" / "final", "causal_lm").get_input_embeddings().weight
    assert trained.shape[0] >= len(tokenizer)
    assert len(stamp["new_pieces"]) == 200  # the rows of the new pieces: their base tokens' rows' mean (lr ~0)
    for idx, parts in list(zip(stamp["new_ids"], stamp["new_pieces"], strict=True))[:20]:
        torch.testing.assert_close(trained[idx], start[parts].mean(0), atol=1e-4, rtol=1e-3)
