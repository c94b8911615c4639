"""The batched generation engine (generation/engine.py) against transformers' own `generate`."""

from __future__ import annotations

import pytest
import torch

from .conftest import excerpt_docs


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from lmforge.models.factory import build_model, preset_config

    torch.manual_seed(0)
    return build_model(preset_config("llama", "tiny", (len(tokenizer) + 63) // 64 * 64, 1024), "causal_lm", tokenizer).eval()


def _prompts(tokenizer, n: int = 12) -> list[list[int]]:
    lengths = [5, 40, 120, 13, 77, 200, 9, 300, 31, 64, 150, 2]
    return [tokenizer(d[:k], add_special_tokens=False).input_ids for d, k in zip(excerpt_docs(n), lengths, strict=True)]


@pytest.mark.parametrize("sampling", [(0.0, None, None), (0.8, 50, 0.95), (1.3, None, 0.9)])
def test_batched_rows_equal_generate_one_by_one(tiny, tokenizer, sampling):
    """Greedy and sampled answers, prompts of 2 to 300 tokens joining a batch of 4 as slots free up, each
    row with its own seed and budget: every answer is what `generate` gives for that prompt and seed."""
    from lmforge.generation.engine import BatchedGenerator, Request
    from lmforge.generation.hf import hf_generate_ids

    temperature, top_k, top_p = sampling
    prompts = _prompts(tokenizer)
    budgets = [30 - (i % 4) * 6 for i in range(len(prompts))]
    expected = [hf_generate_ids(tiny, tokenizer, ids, n, temperature, top_k, top_p, seed=i)
                for i, (ids, n) in enumerate(zip(prompts, budgets, strict=True))]
    requests = [Request(ids, n, temperature, top_k, top_p, seed=i) for i, (ids, n) in enumerate(zip(prompts, budgets, strict=True))]
    engine = BatchedGenerator(tiny, tokenizer, max_batch=4, prefill_tokens=300)
    engine.run(requests)
    assert [r.new_ids for r in requests] == expected
    assert all(r.finish_reason == "length" and len(r.new_ids) == n for r, n in zip(requests, budgets, strict=True))
    assert engine.steps < sum(budgets)  # rows shared steps


def test_stop_strings_streaming_and_cancel(tiny, tokenizer):
    from lmforge.generation.engine import BatchedGenerator, Request

    ids = _prompts(tokenizer)[1]
    whole = BatchedGenerator(tiny, tokenizer).run([Request(ids, 24, temperature=1.0, seed=5)])[0]
    stop = next(whole.text[i:i + 3] for i in range(8, len(whole.text)) if whole.text.find(whole.text[i:i + 3]) >= 8)
    pieces: list[str] = []
    cut = Request(ids, 24, temperature=1.0, seed=5, stop_strings=(stop,), on_text=pieces.append)
    cancelled = Request(ids, 24)
    engine = BatchedGenerator(tiny, tokenizer)
    for request in (cut, cancelled):
        engine.submit(request)
    engine.step()
    cancelled.cancelled = True
    while engine.busy:
        engine.step()
    assert cut.text == whole.text[: whole.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text and len(pieces) > 1
    assert cancelled.finish_reason == "cancelled" and len(cancelled.new_ids) == 1
    assert engine.cache is None and not engine.active


def test_ignore_eos_runs_to_the_budget(tiny, tokenizer):
    """vLLM's `ignore_eos` (the fixed-length answers of serving benchmarks): EOS ends an answer only without it."""
    from lmforge.generation.engine import BatchedGenerator, Request

    ids = _prompts(tokenizer)[2]
    plain = BatchedGenerator(tiny, tokenizer).run([Request(ids, 8, temperature=1.0, seed=1)])[0].new_ids
    k = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    engine = BatchedGenerator(tiny, tokenizer)
    engine.eos = plain[k]  # the model's sampled answer reaches this "EOS" at token k
    stopped, ignored = engine.run([Request(ids, 8, temperature=1.0, seed=1),
                                   Request(ids, 8, temperature=1.0, seed=1, ignore_eos=True)])
    assert stopped.new_ids == plain[:k + 1] and stopped.finish_reason == "stop"
    assert ignored.new_ids == plain and ignored.finish_reason == "length"


def test_streamed_chinese_never_splits_a_character(tiny, tokenizer):
    """A byte-level tokenizer samples a Chinese character in pieces; the stream waits for the whole one."""
    from lmforge.generation.engine import BatchedGenerator, Request

    zh = tokenizer("中文的句子，好。", add_special_tokens=False).input_ids
    pieces: list[str] = []
    request = Request(_prompts(tokenizer)[0] + zh, 40, temperature=1.5, seed=3, on_text=pieces.append)
    BatchedGenerator(tiny, tokenizer).run([request])
    assert "".join(pieces) == request.text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_generate_texts_is_batched_and_equals_one_by_one(tiny, tokenizer):
    from lmforge.eval.generate import generate_text, generate_texts

    prompts = [d[:60] for d in excerpt_docs(6)]
    assert generate_texts(tiny, tokenizer, prompts, 12, max_batch=3) == [
        generate_text(tiny, tokenizer, p, 12, temperature=0.0, top_k=None, top_p=None) for p in prompts]


def test_request_limits():
    from lmforge.generation.limits import LimitError, Limits, check_seed, check_stops

    limits = Limits(context=100, default_max_tokens=256)
    assert limits.budget(90, None) == 10 and limits.budget(10, 90) == 90
    with pytest.raises(LimitError, match="max_tokens: this model's context is 100"):
        limits.budget(10, 91)
    with pytest.raises(LimitError, match="prompt: 100 tokens"):
        limits.budget(100, None)
    assert check_stops(["", "x"]) == ("x",)
    with pytest.raises(LimitError, match="at most 16"):
        check_stops(["a"] * 17)
    with pytest.raises(LimitError, match="seed"):
        check_seed(2**64)


def test_the_growing_cache_holds_what_transformers_cache_holds():
    """Appends past the buffer's room, row selection and cropping: the same keys and values as DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    from lmforge.generation.cache import GrowingLayer

    torch.manual_seed(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(4, 2, n, 8) for n in (5, 1, 1, 70, 1, 100, 1)]
    rows = 4
    for i, new in enumerate(steps):
        new = new[:rows]
        for layer in (ours, theirs):
            keys, values = layer.update(new, -new)
        assert torch.equal(keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        if i == 2:
            rows = 2
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([0, 3]))
        if i == 4:
            for layer in (ours, theirs):
                layer.keys, layer.values = layer.keys[..., 3:, :], layer.values[..., 3:, :]
    assert ours.get_seq_length() == theirs.get_seq_length() == 176
    assert ours._k.shape[-2] > 176  # room to grow: the next token is written in place
