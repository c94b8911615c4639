"""Generated answers scored against references: exact match, ROUGE-L (rouge-score, stemmed F-measure) and
chrF (sacrebleu), with bootstrap intervals for the per-example ones.

`held_out_answers` takes an instruction recipe's held-out conversations (the same split training
used), has a model answer each prompt greedily with the chat template it was trained with, and scores
the answers against the conversations' last assistant turns. For a preference recipe (DPO and its
family) the reference is the chosen answer, and `closer_to_chosen` is the share of answers nearer (ROUGE-L)
to the chosen than to the rejected one: the held-out preference, read from what the model says.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer

from lmforge.config import Recipe
from lmforge.data.instructions import InstructionFormat, ensure_chat_template, load_instructions
from lmforge.data.preferences import load_preferences
from lmforge.data.tokenizer import load_tokenizer
from lmforge.eval.generate import generate_texts
from lmforge.eval.intervals import bootstrap_interval


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?")


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Exact match (after lower-casing and collapsing whitespace and end punctuation), ROUGE-L F and chrF."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("generation metrics: one prediction per reference, at least one")
    exact = np.array([float(_normal(p) == _normal(r)) for p, r in zip(predictions, references, strict=True)])
    rouge = _rouge_l(predictions, references)
    return {"exact_match": float(exact.mean()), "exact_match_ci": bootstrap_interval((exact,), np.mean),
            "rouge_l": float(rouge.mean()), "rouge_l_ci": bootstrap_interval((rouge,), np.mean),
            "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score), "examples": len(predictions)}


def held_out_conversations(recipe: Recipe, tokenizer, limit: int) -> list[list[dict]]:
    """The first `limit` held-out conversations of an instruction recipe: the rows whose answer loss
    training evaluated (load_instructions, after max_docs, seq_len and long_examples), not others."""
    cfg = recipe.data
    sets = load_instructions(cfg.train_files, tokenizer, InstructionFormat.of(cfg), recipe.packing.seq_len,
                             cfg.val_fraction, cfg.long_examples, recipe.packing.group_size, cfg.max_docs, cfg.val_files)
    return sets.val_conversations[:limit]


def held_out_pairs(recipe: Recipe, tokenizer, limit: int) -> list[tuple[list[dict], list[dict]]]:
    """The first `limit` held-out (chosen, rejected) conversations of a preference recipe: the pairs its
    held-out preference metrics were computed on (load_preferences, after max_docs, seq_len, long_examples)."""
    cfg = recipe.data
    sets = load_preferences(cfg.train_files, tokenizer, InstructionFormat.of(cfg), cfg.chosen_column, cfg.rejected_column,
                            recipe.packing.seq_len, cfg.val_fraction, cfg.long_examples, recipe.packing.group_size,
                            cfg.max_docs, val_files=cfg.val_files)
    return sets.val_pairs[:limit]


def _rouge_l(predictions: list[str], references: list[str]) -> np.ndarray:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)])


def nearer_the_chosen(predictions: list[str], chosen: list[str], rejected: list[str]) -> dict:
    """The share of answers nearer (ROUGE-L) to the chosen answer than to the rejected one, ties half."""
    to_chosen, to_rejected = _rouge_l(predictions, chosen), _rouge_l(predictions, rejected)
    closer = (to_chosen > to_rejected) + 0.5 * (to_chosen == to_rejected)
    return {"closer_to_chosen": float(closer.mean()), "closer_to_chosen_ci": bootstrap_interval((closer,), np.mean)}


@torch.no_grad()
def answer_conversations(model: torch.nn.Module, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                         rejected: list[str] | None = None) -> dict:
    """Greedy answers to each conversation's last user turn (chat template), scored against its last
    assistant turn; a few kept as samples. With `rejected` (one answer per conversation), also the share
    of answers nearer to the reference (the chosen answer) than to the rejected one, ties counting half."""
    prompts = [tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for m in conversations]
    predictions = generate_texts(model, tokenizer, prompts, max_new_tokens, desc="held-out answers")
    references = [str(m[-1]["content"]) for m in conversations]
    metrics = generation_metrics(predictions, references)
    if rejected is not None:
        metrics.update(nearer_the_chosen(predictions, references, rejected))
    metrics["samples"] = [{"prompt": str(m[-2]["content"])[:200], "reference": r[:200], "answer": p[:200]}
                          for m, p, r in zip(conversations[:4], predictions, references, strict=False)]
    return metrics


def held_out_answers(recipe: Recipe, model_dir: Path, device: torch.device, limit: int = 48,
                     max_new_tokens: int = 64) -> dict:
    """Greedy answers of the model at `model_dir` to an instruction or preference recipe's held-out
    prompts, scored (a preference recipe: against the chosen answer, and nearer the chosen or the rejected)."""
    from lmforge.models.factory import load_model
    from lmforge.objectives import objective_data

    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer, recipe.data.chat_template)
    rejected = None
    if objective_data(recipe.objective) == "preferences":
        pairs = held_out_pairs(recipe, tokenizer, limit)
        conversations, rejected = [c for c, _ in pairs], [str(r[-1]["content"]) for _, r in pairs]
    else:
        conversations = held_out_conversations(recipe, tokenizer, limit)
    if not conversations:
        return {}
    model = load_model(model_dir, "causal_lm").to(device).eval()
    return answer_conversations(model, tokenizer, conversations, max_new_tokens, rejected)
