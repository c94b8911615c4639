"""Token masking for masked-LM objectives (BERT's 80/10/10), token- or whole-word-level."""

from __future__ import annotations

import torch


def word_start_table(tokenizer) -> torch.Tensor:
    """For each token id: does it begin a word? (byte-level BPE marks a leading space with 'Ġ',
    Metaspace tokenizers with '▁', WordPiece marks continuations with '##')."""
    vocab = tokenizer.get_vocab()
    wordpiece = any(token.startswith("##") for token in vocab)
    table = torch.ones(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    for token, idx in vocab.items():
        if wordpiece:
            table[idx] = not token.startswith("##")
        else:  # punctuation and other non-alphanumeric pieces count as their own words
            table[idx] = token.startswith(("Ġ", "▁")) or not token[:1].isalnum()
    return table


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    word_starts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted inputs, labels): labels hold the original id at selected positions, -100 elsewhere.

    Selected positions become the mask token with `mask_fraction`, a random token with
    `random_fraction`, and stay unchanged otherwise. Special tokens are never selected. With
    `word_starts` (a per-id table), whole words are selected together.
    """
    device = input_ids.device
    candidates = ~torch.isin(input_ids, special_ids.to(device))
    if word_starts is None:
        draw = torch.rand(input_ids.shape, generator=generator, device=device)
        selected = (draw < probability) & candidates
    else:
        starts = word_starts.to(device)[input_ids] | ~candidates
        word_index = starts.long().cumsum(dim=1)  # tokens of one word share an index
        word_draw = torch.rand((input_ids.shape[0], input_ids.shape[1] + 1), generator=generator, device=device)
        selected = (word_draw.gather(1, word_index) < probability) & candidates
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels
