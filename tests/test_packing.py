import numpy as np
import pytest
import torch

from lmforge.data.packing import PackedRows, document_positions, epoch_order, iterate_batches
from lmforge.data.shards import Shard
from lmforge.models.factory import build_model, preset_config


def _shard(docs: list[list[int]]) -> Shard:
    tokens = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
    ends = np.cumsum([len(d) for d in docs]).astype(np.uint64)
    return Shard(tokens, ends)


def test_rows_cover_stream_without_padding(prepared):
    shards = prepared.split("train")
    rows = PackedRows(shards, seq_len=64)
    stream = np.asarray(shards[0].tokens, dtype=np.int64)
    assert len(rows) == (len(stream) - 1) // 64
    batch = rows.batch([0, 1])
    assert torch.equal(batch["input_ids"][1], torch.from_numpy(stream[64:128]))
    assert torch.equal(batch["labels"][0], torch.from_numpy(stream[1:65]))  # next-token targets
    assert (batch["input_ids"] != prepared.manifest.get("pad_id", -1)).all()


def test_document_positions_restart_at_boundaries():
    ends = np.array([3, 7, 12], dtype=np.uint64)
    assert document_positions(ends, 0, 12).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert document_positions(ends, 5, 4).tolist() == [2, 3, 0, 1]


def test_epoch_order_and_resume_position():
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert not np.array_equal(epoch_order(10, 0, 0), epoch_order(10, 0, 1))
    rows = PackedRows([_shard([list(range(1, 200))])], seq_len=4)
    full = iterate_batches(rows, 3, seed=1)
    first = [next(full)["input_ids"] for _ in range(40)]  # crosses an epoch (16 batches per epoch)
    resumed = iterate_batches(rows, 3, seed=1, start_batch=25)
    for expected in first[25:]:
        assert torch.equal(next(resumed)["input_ids"], expected)


def test_too_short_corpus_is_clear_error():
    with pytest.raises(ValueError, match="too few for one row"):
        PackedRows([_shard([[1, 2, 3]])], seq_len=8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_document_mask_keeps_attention_inside_documents(family):
    """With restarted position ids, a packed document's logits equal those of the document alone."""
    torch.manual_seed(0)
    model = build_model(preset_config(family, "tiny", 64, 128, num_hidden_layers=2) if family == "llama"
                        else preset_config(family, "tiny", 64, 128, n_layer=2), "causal_lm").eval()
    doc_a, doc_b = list(range(5, 15)), list(range(20, 32))
    rows = PackedRows([_shard([doc_a, doc_b, [1] * 10])], seq_len=22, document_mask=True)
    batch = rows.batch([0])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([doc_b]), use_cache=False).logits[0]
        unmasked = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[10:22], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unmasked[10:22], alone, atol=1e-3)  # without the mask, doc b sees doc a
