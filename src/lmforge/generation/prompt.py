"""A prompt's token ids as generation sees them (shared by the engine's callers: eval, chat, serve, rollouts)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's ids as generation sees them (no special tokens added: a chat template writes its own);
    an empty prompt starts from BOS (or EOS)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
