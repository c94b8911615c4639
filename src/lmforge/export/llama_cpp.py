"""llama.cpp as the reader of a GGUF export: the file is right when the program it is written for loads it
and computes what the source computed.

transformers' GGUF loader accepts files llama.cpp refuses (it once read back a pre-tokenizer named `gpt2`,
which llama.cpp does not know), so where llama.cpp's Python binding (`llama-cpp-python`, the extra
`lmforge[llama-cpp]`) is installed it is the round trip's reader: it tokenizes the reference prompts with
the file's own vocabulary and pre-tokenizer, runs them, and continues the first greedily. Its KV cache is
kept in f32, so what is measured is the file's number format, not the cache's. Without the binding the
export falls back to transformers' reader and says so (export/gguf.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
from pathlib import Path

import torch

from lmforge.export.verify import (
    GREEDY_TOKENS,
    TOLERANCE,
    ExportError,
    Reference,
    RoundTrip,
    output_agreement,
)

F32 = 0  # ggml_type GGML_TYPE_F32: the KV cache's numbers
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum (the binding's _logger.py still lists an older numbering)
# llama.cpp multiplies a stored f16 / bf16 / q8_0 matrix by activations converted to that format (q8_0: quantized
# per 32-value block too), where transformers' reader dequantizes the weights and multiplies in fp32; so its
# outputs sit further from the source. RMS difference / spread measured (2026-12-08, AMD EPYC, llama-cpp-python
# 0.3.36): SmolLM2-135M f32 0.000%, f16 0.17%, bf16 1.26%, q8_0 4.08%; the tests' tiny Llama f16 0.03%,
# bf16 0.31%, q8_0 0.70%. The bounds leave 2-3x room over SmolLM2; a wrong tensor layout gives tens of percent.
LLAMA_CPP_TOLERANCE = {**TOLERANCE, "bf16": 0.03, "q8_0": 0.10}


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None (not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    return llama_cpp.__version__


@contextlib.contextmanager
def _collected_errors():
    """llama.cpp's error lines while the block runs (its log goes to a callback; the binding's own, restored
    after, prints them only when verbose), so that a refused file is refused with llama.cpp's reason."""
    import llama_cpp
    from llama_cpp import _logger

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def read_back(path: Path, reference: Reference, dtype: str, threads: int | None = None) -> RoundTrip:
    """The GGUF at `path`, loaded by llama.cpp, against the source's reference."""
    import llama_cpp

    inputs = reference.inputs()
    context = max(len(ids) for ids in inputs) + GREEDY_TOKENS
    with _collected_errors() as errors:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, logits_all=True, type_k=F32, type_v=F32,
                                  n_threads=threads or torch.get_num_threads(), verbose=False)
        except (ValueError, RuntimeError) as exc:
            reason = "; ".join(line for line in errors if line) or str(exc)
            raise ExportError(f"round trip: llama.cpp (llama-cpp-python {llama_cpp.__version__}) cannot load "
                              f"{path.name}: {reason}") from None
    try:
        outputs = []
        for ids in inputs:
            llm.reset()
            llm.eval(ids)
            outputs.append(torch.from_numpy(llm.scores[: len(ids)].copy()).float())
        max_diff, relative, agreement = output_agreement(reference, outputs)
        greedy_same = None
        if reference.greedy is not None:
            greedy_same = _greedy(llm, inputs[0]) == reference.greedy
        # the file's vocabulary and pre-tokenizer, as llama.cpp splits text with them (BOS as the file says)
        tokenizer_same = all(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) == ids
                             for prompt, ids in zip(reference.prompts, reference.ids, strict=True))
    finally:
        llm.close()
    return RoundTrip(dtype, max_diff, relative, LLAMA_CPP_TOLERANCE[dtype], agreement, greedy_same, tokenizer_same,
                     reader=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})")


def _greedy(llm, ids: list[int]) -> list[int]:
    """GREEDY_TOKENS new ids by argmax, stopping after an end-of-text, as transformers' greedy `generate` does."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < GREEDY_TOKENS:
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    return out
