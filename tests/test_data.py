import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lmforge.data.formats import DataError, iter_corpus, read_documents
from lmforge.data.prepare import load_prepared, prepare_corpus
from lmforge.data.shards import token_dtype
from lmforge.data.tokenizer import train_tokenizer


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trip_with_plain_autotokenizer(tmp_path, small_jsonl, kind):
    train_tokenizer(iter_corpus([str(small_jsonl)]), tmp_path, kind, vocab_size=600, num_sentinels=3)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The Fulton County Grand Jury said Friday an investigation of Atlanta's primary."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # it learned merges, not bytes
    assert 550 <= len(tok) <= 600
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
        assert getattr(tok, name) is not None and getattr(tok, f"{name}_id") is not None
    assert tok.convert_tokens_to_ids("<extra_id_2>") != tok.unk_token_id


def test_bpe_handles_any_unicode(tokenizer):
    text = "naïve café — 東京 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


# ---------------------------------------------------------------- formats
def test_jsonl_gzip_csv_parquet_text(tmp_path):
    docs = ["first doc", "second, with comma", "third\nline two"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs))
    import csv

    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        for i, d in enumerate(docs):
            w.writerow([i, d])
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    for name in ("a.jsonl", "a.jsonl.gz", "a.csv", "a.parquet"):
        assert list(read_documents(str(tmp_path / name), "body")) == docs, name
    # a text file is one document; data.format paragraphs splits it at blank lines
    assert list(read_documents(str(tmp_path / "a.txt"))) == ["\n\n".join(docs)]
    assert list(read_documents(str(tmp_path / "a.txt"), fmt="paragraphs")) == docs


def test_globs_and_max_docs(tmp_path):
    for i in range(3):
        (tmp_path / f"p{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    assert list(iter_corpus([str(tmp_path / "p*.jsonl")])) == ["doc 0", "doc 1", "doc 2"]
    assert list(iter_corpus([str(tmp_path / "p*.jsonl")], max_docs=2)) == ["doc 0", "doc 1"]
    with pytest.raises(DataError, match="no file matches"):
        list(iter_corpus([str(tmp_path / "none*.jsonl")]))


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": broken}\n', r"bad.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: no column 'text'"),
        (b'{"text": "ok"}\n{"text": 5}\n', r"bad.jsonl:2: column 'text' is int"),
        (b'{"text": "ok"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"bad.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents(str(path)))


def test_csv_missing_column(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"x.csv:1: no column 'text'"):
        list(read_documents(str(tmp_path / "x.csv")))


# ---------------------------------------------------------------- prepare + shards
def test_prepare_writes_shards_with_boundaries(prepared, tokenizer, small_jsonl):
    m = prepared.manifest
    assert m["dtype"] == "uint16" and token_dtype(70000).name == "uint32"
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 30
    assert m["splits"]["val"]["docs"] >= 1
    docs = [json.loads(line)["text"] for line in small_jsonl.read_text().splitlines()]
    expected = [tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for d in docs]
    got = []
    for split in ("train", "val"):
        for shard in prepared.split(split):
            starts = np.concatenate([[0], shard.doc_ends[:-1]]).astype(int)
            got += [shard.tokens[s:e].tolist() for s, e in zip(starts, shard.doc_ends.astype(int), strict=True)]
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert 0 < m["unigram_entropy_nats"] < np.log(len(tokenizer))


def test_prepare_twice_is_noop_and_tokenizer_change_detected(tmp_path, small_jsonl, tokenizer, tokenizer_dir):
    out = tmp_path / "d"
    prepare_corpus([str(small_jsonl)], tokenizer, out, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare_corpus([str(small_jsonl)], tokenizer, out, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    other = train_tokenizer(iter_corpus([str(small_jsonl)], max_docs=5), tmp_path / "tok2", "bpe", vocab_size=300)
    with pytest.raises(DataError, match="prepare the corpus again"):
        load_prepared(out, other)
    prepare_corpus([str(small_jsonl)], other, out, progress=False)
    assert load_prepared(out, other).vocab_size == len(other)


def test_prepare_many_shards_streams(tmp_path, small_jsonl, tokenizer):
    corpus = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "d", shard_tokens=5000, progress=False)
    shards = corpus.manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert sum(len(s.tokens) for s in corpus.split("train")) == corpus.tokens("train")


def test_prepare_in_many_pipelined_batches_keeps_document_order(tmp_path, small_jsonl, tokenizer, monkeypatch):
    import lmforge.data.prepare as prepare

    one_batch = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "one", val_fraction=0.2, progress=False)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)  # a few documents per batch: encoding runs ahead of writing
    many = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "many", val_fraction=0.2, progress=False)
    docs = [json.loads(line)["text"] for line in small_jsonl.read_text().splitlines()]
    for split in ("train", "val"):
        expected = [t for i, d in enumerate(docs) if prepare.is_validation(i, 0.2) == (split == "val")
                    for t in tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
        assert np.concatenate([s.tokens for s in many.split(split)]).tolist() == expected
    assert many.manifest["unigram_entropy_nats"] == one_batch.manifest["unigram_entropy_nats"]


def test_prepare_empty_input_is_error_and_leaves_nothing(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training documents"):
        prepare_corpus([str(empty)], tokenizer, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp*"))


def test_truncated_shard_detected(tmp_path, small_jsonl, tokenizer):
    corpus = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "d", progress=False)
    shard = tmp_path / "d" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        corpus.split("train")


def test_fingerprint_ignores_per_call_truncation(tokenizer_dir):
    from lmforge.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tokenizer_dir)
    before = tokenizer_fingerprint(tok)
    tok(["some text here"], truncation=True, max_length=3)
    assert tokenizer_fingerprint(tok) == before


def test_hf_dataset_names_stream_through_datasets(monkeypatch):
    """`hf:NAME:CONFIG@SPLIT` goes to `datasets.load_dataset` in streaming mode (network in real use)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first"}, {"text": ""}, {"text": "second"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(read_documents("hf:wikitext:wikitext-2-raw-v1@validation")) == ["first", "second"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    with pytest.raises(DataError, match="hf:plain: no column 'body'"):
        list(read_documents("hf:plain", column="body"))


def test_prefetcher_yields_everything_then_stops_and_surfaces_errors():
    from lmforge.data.prefetch import Prefetcher

    items = Prefetcher(iter(range(50)), depth=2)
    assert list(items) == list(range(50))
    with pytest.raises(StopIteration):
        next(items)  # stays exhausted
    items.close()

    def broken():
        yield 1
        raise DataError("corpus.jsonl:7: not valid JSON")

    failing = Prefetcher(broken())
    assert next(failing) == 1
    with pytest.raises(DataError, match="corpus.jsonl:7"):
        next(failing)
    failing.close()

    endless = Prefetcher(iter(int, 1), depth=2)  # the consumer stops early: close() must not hang
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()


def test_prepare_ignores_truncation_and_padding_a_tokenizer_carries(tmp_path, small_jsonl, tokenizer_dir):
    """A tokenizer.json with truncation and fixed padding (as sentence-transformers ship MiniLM's) must not
    cut or pad the documents of a corpus."""
    import json as json_module

    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    plain = prepare_corpus([str(small_jsonl)], load_tokenizer(tokenizer_dir), tmp_path / "plain", val_fraction=0.1,
                           progress=False)
    carrying = tmp_path / "tok"
    carrying.mkdir()
    for f in tokenizer_dir.iterdir():
        (carrying / f.name).write_bytes(f.read_bytes())
    spec = json_module.loads((carrying / "tokenizer.json").read_text())
    spec["truncation"] = {"max_length": 32, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    spec["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<pad>"}
    (carrying / "tokenizer.json").write_text(json_module.dumps(spec))
    tokenizer = load_tokenizer(carrying)
    tokenizer(["a long text " * 50], truncation=True, max_length=8)  # a call that switches truncation on
    corpus = prepare_corpus([str(small_jsonl)], tokenizer, tmp_path / "carrying", val_fraction=0.1, progress=False)
    assert corpus.manifest["splits"] == plain.manifest["splits"]
    assert corpus.manifest["splits"]["train"]["tokens"] > 30 * 32 * 5
