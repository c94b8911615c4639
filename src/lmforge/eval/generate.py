"""Sampling from a causal LM: temperature, top-k, top-p, via `transformers`' `generate`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 40,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0,
                  streamer=None) -> str:
    """The prompt's continuation; temperature 0 means greedy decoding. `streamer`: a transformers
    streamer that receives the text as it is generated (lmforge chat)."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]], device=device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = {"do_sample": sampling, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if sampling:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    if getattr(getattr(model, "active_peft_config", None), "peft_type", None) == "PREFIX_TUNING":
        # transformers 5.x's generate hands the model a cache of its own, and the one peft builds
        # for the prefix is then dropped: without a cache every step runs peft's own forward
        kwargs["use_cache"] = False
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
