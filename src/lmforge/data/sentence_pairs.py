"""Document-aware sentence pairs for next-sentence (BERT NSP) and sentence-order (ALBERT SOP) prediction.

Built from prepared token shards, whose document boundaries are known: each document is cut
into sentences at sentence-final tokens, consecutive sentences are grouped into segments of about
half the sequence, and each example is `[BOS] A [EOS] B [EOS]` with segment ids 0/1. Label 0 means
"B really follows A"; label 1 means B is from another document (NSP) or A and B are swapped (SOP),
each with probability 1/2. The pairs are drawn once, from the run's seed (dynamic MLM masking is
applied on top at every step by the objective).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.shards import Shard

SENTENCE_ENDS = (".", "!", "?", "Ġ.", "Ċ", "ĊĊ")


def _documents(shards: list[Shard]) -> list[np.ndarray]:
    docs = []
    for shard in shards:
        starts = np.concatenate([[0], shard.doc_ends[:-1]]).astype(np.int64)
        for start, end in zip(starts, shard.doc_ends.astype(np.int64), strict=True):
            docs.append(np.asarray(shard.tokens[start : end - 1], dtype=np.int64))  # drop the EOS
            shard.check_ids(docs[-1], start)
    return docs


def _sentences(doc: np.ndarray, end_ids: np.ndarray, min_tokens: int = 4) -> list[np.ndarray]:
    """Split at sentence-final tokens; fragments (a lone newline, "Mr.") join the sentence before them."""
    sentences: list[np.ndarray] = []
    for piece in np.split(doc, np.flatnonzero(np.isin(doc, end_ids)) + 1):
        if sentences and len(piece) < min_tokens:
            sentences[-1] = np.concatenate([sentences[-1], piece])
        elif len(piece):
            sentences.append(piece)
    return sentences


class SentencePairs:
    def __init__(self, shards: list[Shard], tokenizer, seq_len: int, task: str, seed: int):
        if task not in ("nsp", "sop"):
            raise ValueError(f"objective.sentence_task: unknown task '{task}' (nsp or sop)")
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        vocab = tokenizer.get_vocab()
        end_ids = np.array([vocab[t] for t in SENTENCE_ENDS if t in vocab], dtype=np.int64)
        rng = np.random.default_rng([seed, 7])
        docs = [_sentences(d, end_ids) for d in _documents(shards)]
        docs = [d for d in docs if len(d) >= 2]
        if len(docs) < 2:
            raise ValueError("sentence pairs need at least two documents of two or more sentences")
        self.examples: list[tuple[np.ndarray, np.ndarray, int]] = []
        budget = seq_len - 3  # [BOS] A [EOS] B [EOS]
        for index, sentences in enumerate(docs):
            for a, b in self._segments(sentences, budget, rng):
                label = int(rng.random() < 0.5)
                if label and task == "nsp":
                    other = docs[(index + rng.integers(1, len(docs))) % len(docs)]
                    start = int(rng.integers(0, len(other)))
                    b = np.concatenate(other[start:])[: len(b)]  # as long as the real B
                elif label:  # sop: the same two segments, in the wrong order
                    a, b = b, a
                self.examples.append((a, b, label))

    @staticmethod
    def _segments(sentences: list[np.ndarray], budget: int, rng: np.random.Generator):
        """Consecutive sentence groups (A, B) of about `budget` tokens, split at a random sentence."""
        chunk: list[np.ndarray] = []
        for sentence in sentences:
            chunk.append(sentence)
            if sum(len(s) for s in chunk) >= budget or sentence is sentences[-1]:
                if len(chunk) >= 2:
                    cut = int(rng.integers(1, len(chunk)))
                    a, b = np.concatenate(chunk[:cut]), np.concatenate(chunk[cut:])
                    while len(a) + len(b) > budget:  # trim the longer side, as BERT does, away from
                        if len(a) > len(b):     # the A|B seam, so that B still starts where A ends
                            a = a[1:]
                        else:
                            b = b[:-1]
                    if len(a) and len(b):
                        yield a, b
                chunk = []

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        width = max(len(a) + len(b) + 3 for a, b, _ in chosen)
        ids = torch.full((len(chosen), width), self.pad, dtype=torch.long)
        segments = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for row, (a, b, _) in enumerate(chosen):
            tokens = np.concatenate([[self.bos], a, [self.eos], b, [self.eos]])
            ids[row, : len(tokens)] = torch.from_numpy(tokens)
            segments[row, len(a) + 2 : len(tokens)] = 1
            mask[row, : len(tokens)] = 1
        labels = torch.tensor([label for _, _, label in chosen])
        return {"input_ids": ids, "token_type_ids": segments, "attention_mask": mask, "next_sentence_label": labels}
