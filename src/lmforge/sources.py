"""What the loop trains on, one builder per objective data kind: batches from a given position, the
batches in an epoch, tokens per batch, and an `evaluate(model, precision)` callback for held-out data.

packed rows (one corpus or a weighted mixture), text pairs (contrastive), sentence pairs (NSP/SOP),
labelled texts (classification), instruction examples (SFT), preference pairs (DPO) and prompts
(RL objectives: their batches become rollouts inside the objective).
"""

from __future__ import annotations

import torch

from lmforge.config import Recipe, RolloutConfig
from lmforge.data.instructions import (
    InstructionFormat,
    PackedExamples,
    ensure_chat_template,
    load_instructions,
)
from lmforge.data.labeled import load_labeled
from lmforge.data.mixing import iterate_mixture
from lmforge.data.multitask import iterate_tasks, load_tasks
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.data.pairs import load_pairs
from lmforge.data.preferences import load_preferences, load_unpaired
from lmforge.data.prepare import PreparedCorpus
from lmforge.data.prompts import load_prompts
from lmforge.data.sentence_pairs import SentencePairs
from lmforge.data.spans import load_spans
from lmforge.data.tagged import load_tagged
from lmforge.engine.distributed import say
from lmforge.engine.rollout import Rollout
from lmforge.engine.runtime import resolve_precision
from lmforge.eval.classification import classification_metrics
from lmforge.eval.perplexity import evaluate_loss
from lmforge.eval.retrieval import retrieval_metrics
from lmforge.eval.spans import span_metrics
from lmforge.eval.tagging import tagging_metrics
from lmforge.objectives import objective_data
from lmforge.objectives.dpo import attach_reference
from lmforge.rewards import Reward


def _packed_source(recipe: Recipe, objective, tokenizer, corpora: dict[str, PreparedCorpus],
                   device: torch.device) -> dict:
    """Batches of packed rows from one corpus or a weighted mixture, and per-corpus evaluation."""
    tcfg, pcfg = recipe.trainer, recipe.packing
    row_len = objective.row_length(pcfg.seq_len)
    names = list(corpora)
    train_rows = [PackedRows(corpora[n].split("train"), row_len, pcfg.document_mask) for n in names]
    val_rows = {n: PackedRows(c.split("val"), row_len, pcfg.document_mask) for n, c in corpora.items() if c.tokens("val") > row_len}

    def evaluate(m: torch.nn.Module, precision: str) -> dict:
        # with several corpora every eval reports each one: what is learned, and what is forgotten
        out = {}
        for name, rows in val_rows.items():
            metrics = evaluate_loss(m, objective, rows, tcfg.batch_size, tcfg.eval_batches, device, precision)
            out.update(metrics if len(corpora) == 1 else {f"{name}_{k}": v for k, v in metrics.items()})
        return out

    if len(names) == 1:
        def batches(start: int):
            return iterate_batches(train_rows[0], tcfg.batch_size, recipe.seed, start)
    else:
        weights = [m.weight for m in recipe.data.mixture]
        say("data: mixture " + ", ".join(f"{n} {w / sum(weights):.0%}" for n, w in zip(names, weights, strict=True)))

        def batches(start: int):
            return iterate_mixture(train_rows, weights, tcfg.batch_size, recipe.seed, start)
    return {"batches": batches, "batches_per_epoch": sum(len(r) for r in train_rows) // tcfg.batch_size,
            "tokens_per_batch": tcfg.batch_size * row_len, "evaluate": evaluate if val_rows else None,
            "source_names": names if len(names) > 1 else None}


def _in_memory_source(recipe: Recipe, rows, evaluate, tokens_per_row: float | None = None) -> dict:
    """What the loop needs from an in-memory set (text pairs, sentence pairs, labelled rows, instructions)."""
    tcfg = recipe.trainer
    return {"batches": lambda start: iterate_batches(rows, tcfg.batch_size, recipe.seed, start),
            "batches_per_epoch": len(rows) // tcfg.batch_size,
            "tokens_per_batch": round(tcfg.batch_size * (tokens_per_row or recipe.packing.seq_len)), "evaluate": evaluate}


def _pair_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Batches of (query, positive) pairs, and retrieval recall on the held-out pairs."""
    cfg, tcfg = recipe.data, recipe.trainer
    train_pairs, val_pairs = load_pairs(cfg.train_files, tokenizer, cfg.column, cfg.pair_column,
                                        recipe.packing.seq_len, cfg.val_fraction, cfg.val_files)
    say(f"data: {len(train_pairs)} training pairs, {len(val_pairs)} held out")

    def evaluate(m: torch.nn.Module, precision: str) -> dict:
        return retrieval_metrics(m, objective, val_pairs, tcfg.batch_size, device, precision)

    return _in_memory_source(recipe, train_pairs, evaluate if len(val_pairs) > 1 else None)


def _sentence_pair_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Document-aware sentence pairs (NSP / SOP) cut from the prepared corpus, with dynamic MLM masking."""
    if len(corpora) != 1:
        raise ValueError("objective.sentence_task: sentence pairs come from one corpus, not a mixture")
    corpus = next(iter(corpora.values()))
    tcfg, task, seq_len = recipe.trainer, recipe.objective.sentence_task, recipe.packing.seq_len
    train_pairs = SentencePairs(corpus.split("train"), tokenizer, seq_len, task, recipe.seed)
    val_pairs = SentencePairs(corpus.split("val"), tokenizer, seq_len, task, recipe.seed) if corpus.manifest["splits"]["val"]["docs"] >= 2 else None
    say(f"data: {len(train_pairs)} sentence pairs for {task}" + (f", {len(val_pairs)} held out" if val_pairs else ""))

    def evaluate(m: torch.nn.Module, precision: str) -> dict:
        return evaluate_loss(m, objective, val_pairs, tcfg.batch_size, tcfg.eval_batches, device, precision)

    return _in_memory_source(recipe, train_pairs, evaluate if val_pairs else None)


def _labeled_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Labelled texts for classification, and accuracy on the held-out rows."""
    cfg, tcfg = recipe.data, recipe.trainer
    if not cfg.label_column:
        raise ValueError("data.label_column: the classify objective needs the column that holds each row's label")
    train_set, val_set, names = load_labeled(cfg.train_files, tokenizer, cfg.column, cfg.label_column, cfg.labels,
                                             recipe.packing.seq_len, cfg.val_fraction, cfg.val_files, cfg.max_docs,
                                             recipe.objective.label_prompt or "")
    budget = f" (data.max_docs: a label budget of {cfg.max_docs})" if cfg.max_docs else ""
    say(f"data: {len(train_set)} training rows{budget}, {len(val_set)} held out, {len(names)} labels")

    def evaluate(m: torch.nn.Module, precision: str, detail: bool = False) -> dict:  # every held-out row
        return classification_metrics(m, objective, val_set, tcfg.batch_size, device, precision, names, detail,
                                      tcfg.progress)

    return _in_memory_source(recipe, train_set, evaluate if len(val_set) else None)


def _tagged_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Words with a tag each (token classification), and accuracy / entity F1 on the held-out rows."""
    cfg, tcfg = recipe.data, recipe.trainer
    if not cfg.label_column:
        raise ValueError("data.label_column: the token_classify objective needs the column of each row's tags")
    train_set, val_set, names = load_tagged(cfg.train_files, tokenizer, cfg.column, cfg.label_column, cfg.labels,
                                            recipe.packing.seq_len, cfg.val_fraction, cfg.val_files)
    say(f"data: {len(train_set)} tagged training rows, {len(val_set)} held out, {len(names)} tags")

    def evaluate(m: torch.nn.Module, precision: str) -> dict:  # every held-out row
        return tagging_metrics(m, objective, val_set, tcfg.batch_size, device, precision, names)

    return _in_memory_source(recipe, train_set, evaluate if len(val_set) else None)


def _span_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Questions over contexts cut into windows (extractive QA), and SQuAD's exact match / F1 on every held-out question."""
    cfg, tcfg, ocfg = recipe.data, recipe.trainer, recipe.objective
    train_set, val_set = load_spans(cfg.train_files, tokenizer, cfg.question_column, cfg.context_column,
                                    cfg.answer_column, recipe.packing.seq_len, ocfg.doc_stride, cfg.val_fraction,
                                    cfg.val_files)
    say(f"data: {len(train_set.questions)} training questions ({len(train_set)} windows), "
        f"{len(val_set.questions)} held out")

    def evaluate(m: torch.nn.Module, precision: str) -> dict:
        return span_metrics(m, objective, val_set, tcfg.batch_size, device, precision, ocfg.max_answer_tokens)

    return _in_memory_source(recipe, train_set, evaluate if len(val_set) else None)


def _multitask_source(recipe: Recipe, objective, tokenizer, device: torch.device) -> dict:
    """Instruction rows of several tasks, sampled by task; the answer loss of each task's held-out rows
    and of the held-out tasks' rows."""
    cfg, tcfg, pcfg = recipe.data, recipe.trainer, recipe.packing
    sets = load_tasks(cfg.train_files, tokenizer, InstructionFormat.of(cfg), cfg.multitask, pcfg.seq_len,
                      cfg.val_fraction, cfg.long_examples, cfg.max_docs, cfg.val_files)
    shares = sorted(zip(sets.probabilities, sets.names, strict=True), reverse=True)
    say(f"data: {len(sets.train)} training examples of {len(sets.names)} task{'s' if len(sets.names) != 1 else ''} ({cfg.multitask.sampling} sampling; "
        + ", ".join(f"{n} {p:.1%}" for p, n in shares[:4]) + (", ..." if len(shares) > 4 else "") + "), "
        f"{sum(len(v) for v in sets.val.values())} held out"
        + (f"; held-out tasks {', '.join(sets.unseen)}: {sum(len(v) for v in sets.unseen.values())} rows" if sets.unseen else "")
        + (f"; not trained (no example fits seq_len {pcfg.seq_len}): {', '.join(sets.skipped)}" if sets.skipped else ""))

    def evaluate(m: torch.nn.Module, precision: str) -> dict:  # every held-out row, task by task
        out, total, tokens = {}, 0.0, 0
        for prefix, groups in (("task", sets.val), ("heldout", sets.unseen)):
            for name, rows in groups.items():
                metrics = evaluate_loss(m, objective, rows, tcfg.batch_size, None, device, precision)
                out[f"{prefix}/{name}/loss"] = metrics["loss"]
                if prefix == "task":
                    total, tokens = total + metrics["loss"] * metrics["tokens"], tokens + metrics["tokens"]
        if tokens:
            out = {"loss": total / tokens, "tokens": tokens, **out}
        return out

    return {"batches": lambda start: iterate_tasks(sets, tcfg.batch_size, recipe.seed, start),
            "batches_per_epoch": len(sets.train) // tcfg.batch_size,
            "tokens_per_batch": round(tcfg.batch_size * float(sets.train.lengths.mean())),
            "evaluate": evaluate if (sets.val or sets.unseen) else None, "source_names": sets.names}


def _instruction_source(recipe: Recipe, objective, tokenizer, corpora, device: torch.device) -> dict:
    """Chat-templated examples with prompt-masked labels, grouped by length or packed; answer loss on the held-out ones."""
    cfg, tcfg, pcfg = recipe.data, recipe.trainer, recipe.packing
    ensure_chat_template(tokenizer, cfg.chat_template)  # saved with the model: inference renders the same way
    if cfg.multitask is not None:
        return _multitask_source(recipe, objective, tokenizer, device)
    sets = load_instructions(cfg.train_files, tokenizer, InstructionFormat.of(cfg), pcfg.seq_len, cfg.val_fraction,
                             cfg.long_examples, pcfg.group_size, cfg.max_docs, cfg.val_files)
    train_set = sets.train
    skipped = f"; {sets.dropped} longer than seq_len {pcfg.seq_len} dropped" if sets.dropped else ""
    skipped += f"; {sets.truncated} truncated" if sets.truncated else ""
    if pcfg.examples == "grouped":
        rows, per_row = train_set, float(train_set.lengths.mean())
        layout = f"grouped by length, {train_set.padding_fraction(tcfg.batch_size, recipe.seed):.1%} padding"
    else:
        rows, per_row = PackedExamples(train_set, pcfg.seq_len, pcfg.document_mask, recipe.seed), None
        layout = f"packed into {len(rows)} rows of {pcfg.seq_len}"
    say(f"data: {len(train_set)} training examples ({int(train_set.lengths.sum()):,} tokens, {layout}), "
        f"{len(sets.val)} held out{skipped}")

    def evaluate(m: torch.nn.Module, precision: str) -> dict:  # every held-out example
        return evaluate_loss(m, objective, sets.val, tcfg.batch_size, None, device, precision)

    return _in_memory_source(recipe, rows, evaluate if len(sets.val) else None, per_row)


def _preference_source(recipe: Recipe, objective, tokenizer, model: torch.nn.Module, device: torch.device,
                       reference: torch.nn.Module | None = None, held_out_only: bool = False) -> dict:
    """(chosen, rejected) pairs (for DPO with the reference model's log-probabilities); the loss and
    the accuracy (held-out pairs whose chosen answer is rewarded above the rejected one). The reference
    is `model` as training starts (adapters off), or `reference` (the stage's start model, when a final
    model is evaluated after training); `held_out_only`: only the held-out pairs get its log-probabilities."""
    cfg, tcfg, pcfg = recipe.data, recipe.trainer, recipe.packing
    ensure_chat_template(tokenizer, cfg.chat_template)
    if getattr(objective, "unpaired", False):  # kto: answers marked desirable or not, one by one
        sets = load_unpaired(cfg.train_files, tokenizer, InstructionFormat.of(cfg), cfg.label_column or "label",
                             pcfg.seq_len, cfg.val_fraction, cfg.long_examples, pcfg.group_size, cfg.max_docs, cfg.val_files)
    else:
        sets = load_preferences(cfg.train_files, tokenizer, InstructionFormat.of(cfg), cfg.chosen_column,
                                cfg.rejected_column, pcfg.seq_len, cfg.val_fraction, cfg.long_examples, pcfg.group_size,
                                cfg.max_docs, whole_rows=getattr(objective, "scores_whole_rows", False),
                                val_files=cfg.val_files)
    skipped = f"; {sets.dropped} dropped (longer than seq_len {pcfg.seq_len}, or nothing to learn)" if sets.dropped else ""
    needs_reference = getattr(objective, "needs_reference", False)
    what = "examples (with a mismatched pair each)" if getattr(objective, "unpaired", False) else "preference pairs"
    say(f"data: {len(sets.train)} {what}, {len(sets.val)} held out{skipped}"
        + ("; computing the reference model's log-probabilities" if needs_reference else ""))
    if needs_reference:  # in the run's precision (auto resolves as in the loop): reference and policy agree at step 0
        precision = resolve_precision(tcfg.precision, device)
        for pairs in (sets.val,) if held_out_only else (sets.train, sets.val):
            attach_reference(reference if reference is not None else model, pairs, tcfg.batch_size, device, precision)

    def evaluate(m: torch.nn.Module, precision: str) -> dict:  # every held-out pair
        return evaluate_loss(m, objective, sets.val, tcfg.batch_size, None, device, precision)

    return _in_memory_source(recipe, sets.train, evaluate if len(sets.val) else None,
                             2 * float(sets.train.lengths.mean()))


def _prompt_source(recipe: Recipe, objective, tokenizer, model: torch.nn.Module, device: torch.device) -> dict:
    """Prompts for an RL objective, bound to it with the rollout settings, the reward and the reference
    (a frozen copy of the start model under full fine-tuning with beta > 0; under adapters the policy
    with them off). Each prompt batch is one rollout, sent as many times as the rollout has parts (its
    epochs x minibatches x grad_accum slices), numbered, with its sampling seed: a resumed run draws the
    same completions. Held-out measure: the mean reward of greedy completions of the held-out prompts."""
    cfg, tcfg = recipe.data, recipe.trainer
    rollout_cfg = recipe.rollout or RolloutConfig()
    reward = Reward(recipe.reward, cfg.response_column)  # checked now, before any sampling
    ensure_chat_template(tokenizer, cfg.chat_template)
    max_prompt = recipe.packing.seq_len - rollout_cfg.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"rollout.max_new_tokens: {rollout_cfg.max_new_tokens} leaves no room for a prompt within "
                         f"packing.seq_len {recipe.packing.seq_len}")
    sets = load_prompts(cfg.train_files, tokenizer, InstructionFormat.of(cfg), max_prompt, cfg.val_fraction,
                        cfg.max_docs, cfg.val_files)
    skipped = f"; {sets.dropped} longer than {max_prompt} tokens dropped" if sets.dropped else ""
    rollout = Rollout(rollout_cfg, tokenizer, reward, sets.train, sets.val, tcfg.grad_accum)
    objective.bind(rollout, objective.reference_for(model), model, device)
    parts = objective.buffer.parts
    say(f"data: {len(sets.train)} prompts x {rollout_cfg.num_generations} completions, {len(sets.val)} held out{skipped}; "
        f"reward: {' + '.join(f'{t.weight:g} {n}' for n, t, _ in reward.terms)}"
        + (f"; each rollout serves {parts // tcfg.grad_accum} optimizer steps" if parts > tcfg.grad_accum else ""))
    say(objective.health_rules())

    def batches(start: int):
        first, part = divmod(start, parts)
        for number, batch in enumerate(iterate_batches(sets.train, tcfg.batch_size, recipe.seed, first), first):
            # one seed per batch and row: each process samples its own rows' completions from its first row's
            rows = len(batch["prompt_index"])
            batch["rollout_seed"] = recipe.seed * 1_000_003 + number * tcfg.batch_size + torch.arange(rows)
            tokens = batch.pop("num_tokens")
            for index in range(part, parts):
                yield {**batch, "rollout_part": torch.full((rows,), index),
                       "num_tokens": tokens if index == 0 else torch.tensor(0)}
            part = 0

    def evaluate(m: torch.nn.Module, precision: str) -> dict:  # every held-out prompt
        return rollout.evaluate(m, tcfg.batch_size, device, precision)

    return {"batches": batches, "batches_per_epoch": len(sets.train) // tcfg.batch_size * parts,
            "tokens_per_batch": max(1, tcfg.batch_size * rollout_cfg.num_generations * rollout_cfg.max_new_tokens // parts),
            "evaluate": evaluate if len(sets.val) else None}


def training_source(recipe: Recipe, objective, tokenizer, corpora: dict[str, PreparedCorpus], device: torch.device,
                    model: torch.nn.Module | None = None, reference: torch.nn.Module | None = None,
                    held_out_only: bool = False) -> dict:
    """The keyword arguments `engine.loop.train` takes about data, for this recipe's objective (DPO
    also needs the model: its starting point is the reference; see _preference_source)."""
    kind = objective_data(recipe.objective)
    if kind == "preferences":
        return _preference_source(recipe, objective, tokenizer, model, device, reference, held_out_only)
    if kind == "prompts":
        return _prompt_source(recipe, objective, tokenizer, model, device)
    builders = {"packed": _packed_source, "pairs": _pair_source, "sentence_pairs": _sentence_pair_source,
                "labeled": _labeled_source, "tagged": _tagged_source, "spans": _span_source, "instructions": _instruction_source}
    return builders[kind](recipe, objective, tokenizer, corpora, device)
