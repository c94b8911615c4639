"""`transformers`' own `generate`, one prompt at a time: the reference the batched engine is tested
against, and the path of the models the engine cannot run (peft's prompt learning)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def sampling_kwargs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                    temperature: float, top_k: int | None, top_p: float | None) -> dict:
    sampling = temperature > 0
    kwargs = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if sampling:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    if getattr(getattr(model, "active_peft_config", None), "peft_type", None) == "PREFIX_TUNING":
        # transformers 5.x's generate hands the model a cache of its own, and the one peft builds
        # for the prefix is then dropped: without a cache every step runs peft's own forward
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def hf_generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int],
                    max_new_tokens: int = 40, temperature: float = 0.8, top_k: int | None = 50,
                    top_p: float | None = 0.95, seed: int = 0, streamer=None, stop_strings: list[str] | None = None,
                    ignore_eos: bool = False) -> list[int]:
    """The new token ids after `ids`; temperature 0 means greedy decoding. Generation ends at EOS, after
    `max_new_tokens` (only then with `ignore_eos`), or once the text holds one of `stop_strings`. `streamer`: a transformers streamer
    that receives the text as it is generated."""
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    torch.manual_seed(seed)
    kwargs = sampling_kwargs(model, tokenizer, max_new_tokens, temperature, top_k, top_p)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens  # generate's way: EOS is masked until the budget is spent
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), streamer=streamer, **kwargs)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def sample_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, num_return_sequences: int = 1, max_new_tokens: int = 40,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions of a batch of left-padded prompts (KV-cached), `num_return_sequences` per prompt
    (prompt i's are rows i * n ... i * n + n - 1): their ids (B * n, up to max_new_tokens) and mask
    (1 up to and including each one's EOS, 0 after). `generate`'s sampling, for many prompts
    at once: rollouts of RL objectives and evaluation of their rewards."""
    model.eval()
    torch.manual_seed(seed)
    kwargs = sampling_kwargs(model, tokenizer, max_new_tokens, temperature, top_k, top_p)
    out = model.generate(input_ids, attention_mask=attention_mask, num_return_sequences=num_return_sequences, **kwargs)
    completions = out[:, input_ids.shape[1]:]
    is_eos = completions == tokenizer.eos_token_id
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # up to the first EOS, itself included
    return completions, mask.long()

