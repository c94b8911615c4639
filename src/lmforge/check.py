"""Pre-launch check: everything that can be known about a run before it starts.

`lmforge check RECIPE` streams through every data file (bad rows listed with file:line), shows
the document-length histogram and how many documents exceed the sequence length, checks the
tokenizer / prepared corpus / checkpoint / output folder for mismatches, and measures peak memory
and time per step with a few real training steps. `lmforge train` runs the same checks on a
sample of each file (without the measurement) and refuses to start on an error.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import Recipe
from lmforge.data.formats import (
    DataError,
    detect_format,
    expand_inputs,
    parse_rows,
    read_documents,
    scan_jsonl,
)
from lmforge.data.instructions import InstructionFormat, iter_conversations
from lmforge.data.labeled import iter_labeled
from lmforge.data.multitask import iter_task_conversations
from lmforge.data.preferences import iter_preference_rows, iter_unpaired_rows
from lmforge.data.prepare import read_manifest, recorded_sources
from lmforge.data.prompts import prompt_row
from lmforge.data.spans import iter_span_questions
from lmforge.data.tagged import iter_tagged
from lmforge.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmforge.eval.leakage import describe, stage_leakage

# The rendered pre-launch report of each recipe checked in this process, by its output folder: a run
# that starts writes it beside its recipe (check.txt), where the board shows it.
PRELAUNCH_REPORTS: dict[str, str] = {}


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)
    bad_row_count: int = 0
    documents: int = 0
    training_documents: int = 0  # of data.train_files: what an epoch goes over (before max_docs and the held-out split)
    histogram: dict[str, int] = field(default_factory=dict)
    longer_than_seq: int = 0
    long_fate: str = "split across packed rows"
    length_unit: str = "tokens"
    step_seconds: float | None = None
    peak_rss_mb: float | None = None
    tokens_per_second: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.bad_row_count == 0

    def render(self, max_listed: int = 5) -> str:
        lines = [f"documents read: {self.documents:,}"]
        if self.bad_row_count:
            lines.append(f"bad rows: {self.bad_row_count} (first {min(max_listed, len(self.bad_rows))}):")
            lines += [f"  {row}" for row in self.bad_rows[:max_listed]]
        if self.histogram:
            lines.append(f"document length ({self.length_unit}):")
            width = max(self.histogram.values())
            for bucket, count in self.histogram.items():
                lines.append(f"  {bucket:>13} {count:>8,} {'#' * max(1, round(30 * count / width)) if count else ''}")
            share = self.longer_than_seq / max(sum(self.histogram.values()), 1)
            lines.append(f"documents longer than seq_len ({self.long_fate}): {self.longer_than_seq:,} ({share:.0%})")
        if self.step_seconds is not None:
            lines.append(f"measured: {self.step_seconds:.3f} s/step, {self.tokens_per_second:,.0f} tokens/s, "
                         f"peak RSS {self.peak_rss_mb:,.0f} MB")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"error: {e}" for e in self.errors]
        lines.append("check: OK" if self.ok else "check: FAILED")
        return "\n".join(lines)


def _histogram(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    edges = [0, 16, 64, 256, 1024, 4096, 16384]
    counts = np.histogram(lengths, bins=[*edges, max(max(lengths) + 1, edges[-1] + 1)])[0]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [f">={edges[-1]}"]
    return dict(zip(labels, counts.tolist(), strict=True))


def _sources(recipe: Recipe) -> list[tuple[str, str, bool]]:
    """(file or glob, text column, is it the run's main data) for every input the recipe reads."""
    cfg = recipe.data
    out = [(f, cfg.column, True) for f in [*cfg.train_files, *cfg.val_files]]  # val_files: the same columns
    out += [(f, m.column, False) for m in cfg.mixture for f in m.train_files]
    out += [(f, recipe.tokenizer.column, False) for f in [*recipe.tokenizer.train_files, *recipe.tokenizer.extend_files]]
    return list(dict.fromkeys(out))


def _rows(path: str, column: str, main: bool, fmt: str, recipe: Recipe, sample_rows: int | None):
    from lmforge.objectives import objective_data

    cfg = recipe.data
    if fmt != "jsonl":
        return _guarded_rows(path, column, fmt, sample_rows)
    if main and objective_data(recipe.objective) == "instructions" and cfg.multitask is not None:  # each task's own template
        tasks = iter_task_conversations([path], InstructionFormat.of(cfg), cfg.multitask, sample_rows)
        return (c if isinstance(c, DataError) else "\n".join(str(m["content"]) for m in c[2]) for c in tasks)
    if main and objective_data(recipe.objective) == "instructions":  # conversations: prompt columns, answer column or messages
        conversations = iter_conversations([path], InstructionFormat.of(cfg), sample_rows)
        return (c if isinstance(c, DataError) else "\n".join(str(m["content"]) for m in c[1]) for c in conversations)
    if main and recipe.objective.name == "kto":  # a conversation and its desirable flag
        examples = iter_unpaired_rows([path], InstructionFormat.of(cfg), cfg.label_column or "label", sample_rows)
        return (e if isinstance(e, DataError) else "\n".join(str(m["content"]) for m in e[1]) for e in examples)
    if main and objective_data(recipe.objective) == "preferences":  # the prompt's columns and both answers' columns
        pairs = iter_preference_rows([path], InstructionFormat.of(cfg), cfg.chosen_column, cfg.rejected_column, sample_rows)
        return (p if isinstance(p, DataError) else "\n".join(str(m["content"]) for m in p[1]) for p in pairs)
    if main and objective_data(recipe.objective) == "prompts":  # RL prompts: the prompt's columns (the answer optional)
        prompts = parse_rows([path], lambda p, n, r: prompt_row(p, n, r, InstructionFormat.of(cfg)), sample_rows)
        return (p if isinstance(p, DataError) else "\n".join(str(m["content"]) for m in p[1]) for p in prompts)
    if main and recipe.objective.name == "extractive_qa":  # a question, its context, answers found in it
        questions = iter_span_questions([path], cfg.question_column, cfg.context_column, cfg.answer_column, sample_rows)
        return (q if isinstance(q, DataError) else f"{q.question}\n{q.context}" for q in questions)
    if main and recipe.objective.name == "token_classify" and cfg.label_column:  # word lists with a tag each
        tagged = iter_tagged([path], column, cfg.label_column, cfg.labels, sample_rows)
        return (r if isinstance(r, DataError) else " ".join(r[1]) for r in tagged)
    if main and cfg.label_column:  # labels too, against the label set when one is given
        labeled = iter_labeled([path], column, cfg.label_column, cfg.labels, sample_rows)
        return (r if isinstance(r, DataError) else r[0] for r in labeled)
    rows = scan_jsonl(path, column, sample_rows)
    if main and cfg.pair_column:  # the positives' column must be there too
        positives = (r for r in scan_jsonl(path, cfg.pair_column, sample_rows) if isinstance(r, DataError))
        rows = itertools.chain(rows, positives)
    return rows


def _scan_files(recipe: Recipe, report: CheckReport, sample_rows: int | None) -> list[str]:
    """Read every input file (or its first `sample_rows` rows); returns a sample of the main documents."""
    sample: list[str] = []
    cfg = recipe.data
    sources = _sources(recipe)
    if not sources and not cfg.mixture and not recipe.prepared_dir.joinpath("manifest.json").is_file():
        report.errors.append("data.train_files: no data files and no prepared corpus at " + str(recipe.prepared_dir))
    seen: set[tuple[str, str]] = set()
    for pattern, column, main in sources:
        try:
            files = expand_inputs([pattern])
        except DataError as exc:
            report.errors.append(str(exc))
            continue
        for path in files:
            if (path, column) in seen:
                continue
            seen.add((path, column))
            fmt = detect_format(path) if cfg.format == "auto" else cfg.format
            if fmt == "hf":
                report.notes.append(f"{path}: a `datasets` name, not scanned (needs the network)")
                continue
            if Path(path).stat().st_size == 0:
                report.errors.append(f"{path}: empty file")
                continue
            found, bad_before = 0, report.bad_row_count
            for row in _rows(path, column, main, fmt, recipe, sample_rows):
                if isinstance(row, DataError):
                    report.bad_row_count += 1
                    report.bad_rows.append(str(row))
                elif row.strip():
                    found += 1
                    if main and len(sample) < 2000:
                        sample.append(row)
            report.documents += found
            if main and pattern in cfg.train_files:
                report.training_documents += found
            if found == 0 and report.bad_row_count == bad_before:
                report.errors.append(f"{path}: no non-empty documents")
    return sample


def _guarded_rows(path: str, column: str, fmt: str, limit: int | None):
    try:
        for i, doc in enumerate(read_documents(path, column, fmt)):
            if limit is not None and i >= limit:
                return
            yield doc
    except DataError as exc:
        yield exc


def _check_lengths(recipe: Recipe, report: CheckReport, sample: list[str]):
    tokenizer = None
    source = recipe.tokenizer.path or (recipe.tokenizer_dir if recipe.tokenizer_dir.joinpath("tokenizer.json").is_file() else None) \
        or recipe.model.path
    if source is not None:
        try:
            tokenizer = load_tokenizer(source, recipe.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            report.errors.append(f"tokenizer {source}: cannot load ({exc})")
    if tokenizer is not None and sample:
        lengths = [len(ids) for ids in tokenizer(sample, add_special_tokens=False, verbose=False).input_ids]  # lengths are the point
    else:
        lengths = [len(doc) // 4 for doc in sample]  # rough: ~4 characters per token before a tokenizer exists
        report.length_unit = "tokens, estimated as characters/4 (tokenizer not trained yet)"
    report.histogram = _histogram(lengths)
    report.longer_than_seq = sum(n > recipe.packing.seq_len for n in lengths)
    from lmforge.objectives import OBJECTIVES, objective_data

    report.long_fate = OBJECTIVES[recipe.objective.name].long_inputs  # the objective's own data handling says
    if objective_data(recipe.objective) in ("instructions", "preferences"):  # examples are never split: see data.long_examples
        report.long_fate = f"data.long_examples: {recipe.data.long_examples}"
    if tokenizer is not None:
        prepared = [] if recipe.data.train_files else [recipe.prepared_dir]
        prepared += [Path(m.prepared_dir) for m in recipe.data.mixture if m.prepared_dir and not m.train_files]
        for folder in prepared:
            try:
                manifest = read_manifest(folder) if folder.is_dir() else None
            except DataError as exc:
                report.errors.append(str(exc))
                continue
            if not manifest or manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer):
                continue
            sources, gone = recorded_sources(manifest)
            if sources and not gone:  # data/prepare.retokenized prepares it again at run time
                report.notes.append(f"{folder}: prepared with another tokenizer; the run prepares it again from its "
                                    f"{len(sources)} source file(s)")
            else:
                report.errors.append(f"{folder}/manifest.json: prepared with another tokenizer and its source files are "
                                     f"gone ({', '.join(gone) or 'none recorded'}); prepare it again with this tokenizer")
    return tokenizer


def _check_paths(recipe: Recipe, report: CheckReport) -> None:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        report.errors.append(f"output_dir: {out} exists and is a file")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                report.errors.append(f"output_dir: {parent} (a parent of {out}) is a file")
            break
    if recipe.model.path and not Path(recipe.model.path).exists():
        report.errors.append(f"model.path: {recipe.model.path}: no such folder")
    elif recipe.model.path and not Path(recipe.model.path, "config.json").is_file():
        report.errors.append(f"model.path: {recipe.model.path} is not a model directory (no config.json)")
    elif recipe.model.path and not Path(recipe.model.path, "adapter_config.json").is_file():
        from lmforge.models.factory import ModelError, ensure_safe_weights

        try:
            ensure_safe_weights(Path(recipe.model.path))
        except ModelError as exc:
            report.errors.append(f"model.path: {exc}")
    report.notes.append(f"trust_remote_code: {'ON (recipe asks for it)' if recipe.model.trust_remote_code else 'off'}")


def _check_model(recipe: Recipe, report: CheckReport, vocab_size: int | None) -> None:
    """Architecture and length problems, found from the config alone, before anything is built."""
    from transformers import AutoConfig

    from lmforge.models.factory import (
        ModelError,
        ensure_family_fits,
        ensure_fits_length,
        ensure_head_fits,
        preset_config,
    )
    from lmforge.objectives import objective_head

    cfg = recipe.model
    try:
        head = objective_head(recipe.objective)
        if cfg.path:
            if not Path(cfg.path, "config.json").is_file():
                return  # reported by _check_paths
            config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
            ensure_head_fits(config, head, f"model.path: {cfg.path} (objective '{recipe.objective.name}')")
        else:
            ensure_family_fits(cfg.family, head, recipe.objective.name)
            config = preset_config(cfg.family, cfg.preset, vocab_size or 256, max(1024, recipe.packing.seq_len), **cfg.overrides)
        ensure_fits_length(config, recipe.packing.seq_len, recipe.method.virtual_positions)
    except (ModelError, ValueError, TypeError, OSError) as exc:
        report.errors.append(str(exc))


def measure_steps(recipe: Recipe, tokenizer, steps: int = 3, stand_in: bool = False) -> tuple[float, float, float]:
    """(seconds per step, tokens/s, peak RSS MB) from real forward/backward/optimizer steps."""
    from lmforge.engine.optimizer import build_optimizer
    from lmforge.engine.runtime import autocast, checkpoint_activations, pick_device, resolve_precision
    from lmforge.methods import apply_method
    from lmforge.objectives import get_objective, objective_data
    from lmforge.stage_inputs import model_stage

    objective = get_objective(recipe.objective, tokenizer)
    model = model_stage(recipe, tokenizer, objective.head)
    if stand_in and not getattr(model, "name_or_path", ""):  # the parent's final model will be a saved checkpoint
        model.name_or_path = "(the parent stage's final model)"
    model, groups = apply_method(model, recipe.method, recipe.trainer.weight_decay)
    t = recipe.trainer
    optimizer = build_optimizer(groups, t.lr, t.betas, t.eps, t.optimizer_impl)
    device = pick_device()
    precision = resolve_precision(t.precision, device)
    model.to(device).train()
    checkpoint_activations(model, t.activation_checkpointing)  # it sets the memory the run will need
    vocab = len(tokenizer)
    row = objective.row_length(recipe.packing.seq_len)
    # ordinary ids only: objectives treat special tokens (sentinels, EOS) specially
    # a batch of preference pairs holds both answers of each pair: twice the rows
    rows = t.batch_size * (2 if objective_data(recipe.objective) == "preferences" else 1)
    tokens = torch.randint(len(tokenizer.all_special_ids) + 8, vocab, (rows, row + 1), device=device)
    ones = torch.ones_like(tokens[:, :-1])
    # every objective finds its keys: packed rows (input_ids, labels) or pairs (input_ids, _b, masks)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "attention_mask": ones,
             "input_ids_b": tokens[:, 1:], "attention_mask_b": ones}
    if objective.head == "classifier":  # one class per row, not a token per position
        batch["labels"] = torch.randint(0, model.config.num_labels, (rows,), device=device)
    if objective.head == "token_classifier":  # a tag per position
        batch["labels"] = torch.randint(0, model.config.num_labels, (rows, row), device=device)
    if objective.head == "question_answering":  # an answer's first and last token per row
        batch["start_positions"] = torch.randint(0, row, (rows,), device=device)
        batch["end_positions"] = torch.randint(0, row, (rows,), device=device)
    if getattr(objective, "needs_reference", False):  # DPO: the reference's log-probabilities travel with the batch
        batch["reference_logps"] = torch.zeros(rows, device=device)
    if getattr(objective, "unpaired", False):  # kto: desirable and undesirable examples alike
        batch["desirable"] = torch.arange(rows, device=device) // 2 % 2 == 0
    if objective_data(recipe.objective) == "prompts":  # RL: each step samples, so measure real rollouts of random prompts
        batch = _stand_in_rollout(recipe, objective, tokenizer, model, tokens)
    timings = []
    for _ in range(steps + 1):  # the first step warms up kernels and allocators
        start = time.perf_counter()
        for _ in range(t.grad_accum):
            with autocast(device, precision):
                loss, _ = objective.loss(model, batch)
            (loss / t.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    step = statistics.median(timings[1:])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return step, rows * t.grad_accum * row / step, peak


def _stand_in_rollout(recipe: Recipe, objective, tokenizer, model, tokens: torch.Tensor) -> dict:
    """A prompt batch of random tokens (as long as prompts may be), bound to `objective` with a
    constant reward: the sampling, the policy and reference passes are timed, the recipe's reward is not."""
    from lmforge.config import RewardConfig, RewardTermConfig, RolloutConfig
    from lmforge.data.prompts import Prompt, PromptSet
    from lmforge.engine.rollout import Rollout
    from lmforge.rewards import Reward

    rollout_cfg = recipe.rollout or RolloutConfig()
    width = max(1, recipe.packing.seq_len - rollout_cfg.max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = PromptSet([Prompt("stand-in", [], "", np.asarray(row[:width].tolist()), {}) for row in tokens], pad)
    reward = Reward(RewardConfig(terms=[RewardTermConfig(kind="regex", pattern=".*")]), recipe.data.response_column)
    objective.bind(Rollout(rollout_cfg, tokenizer, reward, prompts, prompts), objective.reference_for(model), model,
                   tokens.device)
    batch = prompts.batch(list(range(len(prompts))))
    return {k: v.to(tokens.device) for k, v in batch.items() if k != "num_tokens"}


def check_recipe(recipe: Recipe, sample_rows: int | None = None, measure: bool = True,
                 stand_in: bool = False, lineage: list[tuple[str, Recipe]] | None = None) -> CheckReport:
    """`stand_in`: the model is a pipeline's root architecture standing in for a parent stage's final model
    (not trained yet), so adapters may be measured on it. `lineage`: a pipeline stage's earlier stages and
    itself, (name, recipe), whose training text its held-out rows are looked for in (a full check only)."""
    report = CheckReport()
    _check_paths(recipe, report)
    sample = _scan_files(recipe, report, sample_rows)
    if sample_rows is None and not report.errors and not report.bad_row_count:
        report.notes += [f"leakage: {line}" for line in describe(stage_leakage(recipe, lineage or [("", recipe)]))]
    tokenizer = _check_lengths(recipe, report, sample)
    _check_model(recipe, report, len(tokenizer) if tokenizer is not None else None)
    if measure and not report.errors:
        if tokenizer is None:
            report.notes.append("time/memory not measured: no tokenizer yet (train it first)")
        else:
            try:
                report.step_seconds, report.tokens_per_second, report.peak_rss_mb = measure_steps(recipe, tokenizer, stand_in=stand_in)
            except (ValueError, RuntimeError) as exc:
                report.errors.append(f"model: {exc}")
    return report
