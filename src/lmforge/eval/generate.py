"""Sampling from a causal LM: temperature, top-k, top-p, stop strings.

The small functions every command calls; the sampling itself is the one batched engine's
(generation/engine.py), which `generate`, `chat`, the eval suite's samples and answers, `predict` and
`serve` share. `hf_generate_ids` is `transformers`' own `generate`: the reference the engine is tested
against, and the path of models the engine cannot run (peft's prompt learning)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.generation.engine import Request, generate_many
from lmforge.generation.hf import hf_generate_ids, sample_batch
from lmforge.generation.limits import Limits
from lmforge.generation.prompt import prompt_ids

__all__ = ["hf_generate_ids", "generate_ids", "generate_texts", "generate_text", "prompt_ids", "sample_batch"]


def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int = 40,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                 on_text: Callable[[str], None] | None = None, stop_strings: list[str] | None = None) -> list[int]:
    """The new token ids after `ids` (through the engine, one row: what `generate` gives for the same seed);
    temperature 0 means greedy decoding. Generation ends at EOS, after `max_new_tokens`, or once the text
    holds one of `stop_strings`. `on_text(piece)` receives the text as it is sampled (lmforge chat)."""
    request = Request(list(ids), max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_strings or ()), on_text)
    return generate_many(model, tokenizer, [request])[0].new_ids


def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   max_new_tokens: int = 40, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int = 0, max_batch: int = 32, desc: str | None = None,
                   stop_strings: list[str] | None = None) -> list[str]:
    """Each prompt's continuation as text, the prompts decoded together (batched, length-aware); every row
    samples from its own generator seeded `seed`, so an answer does not depend on the other prompts.
    `desc`: a progress bar with an ETA under that name."""
    from tqdm.auto import tqdm

    context = Limits.of(model).context
    requests = []
    for p in prompts:  # an answer never runs past the model's positions; a prompt that fills them gets none
        ids = prompt_ids(tokenizer, p)
        requests.append(Request(ids, min(max_new_tokens, context - len(ids)), temperature, top_k, top_p, seed,
                                tuple(stop_strings or ())))
    too_long = sum(r.max_new_tokens < 1 for r in requests)
    if too_long:
        print(f"generate: {too_long} of {len(requests)} prompts fill the model's context of {context} tokens; "
              "they get no answer")
    with tqdm(total=len(requests), desc=desc, unit="answer", disable=desc is None or len(requests) < 2,
              dynamic_ncols=True) as bar:
        generate_many(model, tokenizer, requests, max_batch, bar.update)
    return [r.text for r in requests]


def generate_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 40,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                  on_text: Callable[[str], None] | None = None) -> str:
    """The prompt's continuation as text (special tokens left out)."""
    request = Request(prompt_ids(tokenizer, prompt), max_new_tokens, temperature, top_k, top_p, seed, (), on_text)
    return generate_many(model, tokenizer, [request])[0].text
