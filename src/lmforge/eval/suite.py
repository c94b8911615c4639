"""The evaluation suite: one model folder (a full model, a LoRA or other adapter, prompt learning) measured
on what the user names, the same way for every kind of model.

- corpora: perplexity (with a bootstrap 95% interval) on each named corpus: a prepared folder (its
  validation split) or text / JSONL / CSV files (every document, prepared once under OUT/corpora).
  A causal LM is scored with the causal-LM loss, a masked LM with the masked-LM loss.
- tasks: held-out files. Labelled rows (classification): a classifier is scored directly; a model
  without a classifier head is scored as the few-shot baseline would score it (in context for a causal
  LM, by prototypes for an encoder). scikit-learn's accuracy, macro-F1, per-class precision/recall and
  confusion matrix, with intervals. Conversations with reference answers (generation): greedy answers
  scored by exact match, ROUGE-L (rouge-score) and chrF (sacrebleu). Preference pairs (prompt, chosen,
  rejected): how often the model ranks the chosen answer first (eval/preferences.py).
- baseline: an untuned model folder scored in context (or by prototypes) on the same rows, so the
  report says whether fine-tuning beat prompting.
- prompts: sample generations.

`lmforge eval --model DIR ...` and a pipeline stage with an `eval:` section both call `evaluate_model`;
the result is OUT/eval.json (one schema: probes, tasks, samples) and a record in OUT/metrics.jsonl.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import EvalConfig, EvalTaskConfig
from lmforge.data.formats import DataError, expand_inputs, file_fingerprints, parse_rows, read_all
from lmforge.data.instructions import InstructionFormat, ensure_chat_template, iter_conversations
from lmforge.data.labeled import encode_texts, iter_labeled
from lmforge.data.packing import PackedRows
from lmforge.data.preferences import iter_preference_rows
from lmforge.data.prepare import load_prepared, prepare_corpus
from lmforge.data.tokenizer import load_tokenizer
from lmforge.engine.distributed import say
from lmforge.engine.runtime import pick_device, resolve_precision
from lmforge.engine.status import LOG, append_log
from lmforge.eval.classification import classification_metrics
from lmforge.eval.fewshot import balanced_shots, few_shot_baseline
from lmforge.eval.generate import generate_texts
from lmforge.eval.generation import answer_conversations
from lmforge.eval.intervals import perplexity_interval, separated
from lmforge.eval.perplexity import evaluate_loss
from lmforge.eval.preferences import preference_accuracy
from lmforge.models.factory import load_model, saved_head
from lmforge.objectives import get_objective
from lmforge.objectives.classify import label_prompt
from lmforge.outputs import OutputError, content_hash, is_metrics_log

EVAL_FILE = "eval.json"
LM_OBJECTIVES = {"causal_lm": "clm", "masked_lm": "mlm", "pretraining": "mlm"}


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file())


def evaluation_key(model_dir: Path, cfg: EvalConfig) -> str:
    """What decides the result: the settings, the model's files and every file read."""
    files = [f for spec in cfg.corpora.values() for f in spec if not Path(f).is_dir()]
    files += [f for task in cfg.tasks.values() for f in task.files + task.shots_files]
    folders = [p for spec in cfg.corpora.values() for f in spec if Path(f).is_dir() for p in _model_files(Path(f))]
    baseline = _model_files(Path(cfg.baseline)) if cfg.baseline and Path(cfg.baseline).is_dir() else []
    return content_hash({"settings": cfg.model_dump(), "model": file_fingerprints(_model_files(model_dir)),
                         "files": file_fingerprints((expand_inputs(files) if files else []) + folders + baseline)})


def read_evaluation(out_dir: Path) -> dict:
    path = out_dir / EVAL_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _refuse_foreign(out_dir: Path) -> None:
    path = out_dir / EVAL_FILE
    if path.is_file() and read_evaluation(out_dir).get("writer") != "lmforge":
        raise OutputError(f"{path}: exists and lmforge did not write it; choose another output folder")


# ---------------------------------------------------------------- corpora
def _corpus_rows(name: str, files: list[str], tokenizer, cfg: EvalConfig, objective, cache: Path) -> PackedRows:
    if len(files) == 1 and Path(files[0]).is_dir():
        corpus, split = load_prepared(files[0], tokenizer), "val"
    else:
        corpus, split = prepare_corpus(files, tokenizer, cache / name, cfg.column, val_fraction=0.0, progress=False), "train"
    return PackedRows(corpus.split(split), objective.row_length(cfg.seq_len))


def _perplexity(model, head: str, tokenizer, name: str, files: list[str], cfg: EvalConfig, cache: Path,
                device: torch.device, precision: str) -> dict:
    if head not in LM_OBJECTIVES:
        return {"skipped": f"a {head} model has no language-model head to measure perplexity with"}
    objective = get_objective(LM_OBJECTIVES[head], tokenizer)
    try:
        rows = _corpus_rows(name, files, tokenizer, cfg, objective, cache)
    except ValueError as exc:  # DataError is one: a corpus of another tokenizer, too few tokens
        raise DataError(f"corpora.{name}: {exc}") from None
    parts: list = []
    metrics = evaluate_loss(model, objective, rows, cfg.batch_size, cfg.max_batches, device, precision, parts=parts)
    metrics["ppl_ci"] = perplexity_interval(parts)
    metrics["parts"] = parts
    metrics["objective"] = LM_OBJECTIVES[head]
    return metrics


# ---------------------------------------------------------------- tasks
def task_kind(task: EvalTaskConfig, name: str) -> str:
    """classification, generation or preferences: as set, else by the first row's columns."""
    if task.kind != "auto":
        return task.kind
    for item in parse_rows(task.files, lambda path, lineno, row: (path, lineno, row), max_rows=None):
        if isinstance(item, DataError):
            raise DataError(f"tasks.{name}: {item}")
        path, lineno, row = item
        if task.label_column in row:
            return "classification"
        if task.chosen_column in row and task.rejected_column in row:
            return "preferences"
        sharegpt = task.messages_column == "messages" and "conversations" in row  # found as sft finds it
        if task.messages_column in row or task.response_column in row or sharegpt:
            return "generation"
        raise DataError(f"{path}:{lineno}: tasks.{name}: no label column '{task.label_column}' (classification), no "
                        f"'{task.messages_column}' or '{task.response_column}' column (generation) and no "
                        f"'{task.chosen_column}' + '{task.rejected_column}' columns (preferences); columns: "
                        f"{', '.join(row)} (set tasks.{name}.kind and the column names)")
    raise DataError(f"tasks.{name}: {', '.join(task.files)}: no rows")


def _labeled(files: list[str], task: EvalTaskConfig, labels: list[str] | None) -> list[tuple[str, str]]:
    return read_all(iter_labeled(files, task.column, task.label_column, labels))


def _classification(model, head: str, model_dir: Path, tokenizer, name: str, task: EvalTaskConfig, cfg: EvalConfig,
                    device: torch.device, precision: str) -> dict:
    names = ([model.config.id2label[i] for i in range(model.config.num_labels)] if head == "classifier"
             else task.labels)
    rows = _labeled(task.files, task, names)
    names = names or sorted({label for _, label in rows})
    index = {n: i for i, n in enumerate(names)}
    # shots for whoever is scored without a classifier head: k in all in context, k per class as prototypes
    scorers = ([model_dir] if head != "classifier" else []) + ([Path(cfg.baseline)] if cfg.baseline else [])
    per_class = max(cfg.few_shot, 1)
    count = 0 if not scorers else (per_class * len(names) if {saved_head(d) for d in scorers} - {"causal_lm"} else cfg.few_shot)
    shots: list[tuple[str, int]] = []
    if count and task.shots_files:
        pool = [(t, index[x]) for t, x in _labeled(task.shots_files, task, names)]
        shots = [pool[i] for i in balanced_shots([c for _, c in pool], count, cfg.seed)]
    elif count:  # drawn from the task file (seeded), and then not scored, for any model: the same rows
        chosen = balanced_shots([index[x] for _, x in rows], count, cfg.seed)
        shots = [(rows[i][0], index[rows[i][1]]) for i in chosen]
        rows = [r for i, r in enumerate(rows) if i not in set(chosen)]
    rows = rows[:task.limit] if task.limit else rows
    texts, labels = [t for t, _ in rows], [index[x] for _, x in rows]
    if head == "classifier":
        encoded = encode_texts(tokenizer, texts, labels, cfg.seq_len, label_prompt(model))  # the prompt it trained with
        out = classification_metrics(model, get_objective("classify", tokenizer), encoded,
                                     cfg.batch_size, device, precision, names, detail=True)
    else:
        out = few_shot_baseline(model_dir, shots, texts, labels, names, device, cfg.seq_len, per_class,
                                model if head in ("causal_lm", "encoder") else None)  # the model loaded for the suite
        if not out:
            raise DataError(f"tasks.{name}: every label needs at least one example to score a {head} model by")
    out["labels"] = names
    entry = {"after": out}
    if cfg.baseline is not None:
        entry["baseline"] = few_shot_baseline(Path(cfg.baseline), shots, texts, labels, names, device, cfg.seq_len, per_class)
    return entry


def _generation(model, head: str, tokenizer, name: str, task: EvalTaskConfig, cfg: EvalConfig) -> dict:
    if head != "causal_lm":
        return {"after": {"skipped": f"a {head} model does not generate answers"}}
    fmt = InstructionFormat(task.prompt_template, task.response_column, task.messages_column, task.system_prompt)
    conversations = []
    for item in iter_conversations(task.files, fmt):
        if isinstance(item, DataError):
            raise item
        if item[1] and item[1][-1]["role"] == "assistant":
            conversations.append(item[1])
        if task.limit and len(conversations) == task.limit:
            break
    if not conversations:
        raise DataError(f"tasks.{name}: {', '.join(task.files)}: no conversation ends in an answer to score against")
    ensure_chat_template(tokenizer, task.chat_template)
    return {"after": answer_conversations(model, tokenizer, conversations, cfg.max_new_tokens)}


def _preferences(model, head: str, tokenizer, task: EvalTaskConfig, cfg: EvalConfig, device: torch.device,
                 precision: str) -> dict:
    fmt = InstructionFormat(task.prompt_template, task.response_column, task.messages_column, task.system_prompt)
    return {"after": preference_accuracy(model, head, tokenizer, task.files, fmt, task.chosen_column, task.rejected_column,
                                         cfg.seq_len, cfg.batch_size, device, precision, task.limit, task.chat_template)}


def check_evaluation(cfg: EvalConfig, pending: list[Path] = (), limit: int = 20) -> list[str]:
    """What is wrong with an evaluation's inputs, found before anything runs (each file and line named).
    Paths inside `pending` folders (what earlier stages will write) are not there yet, and pass."""
    from lmforge.outputs import is_prepared_corpus

    def later(path: str) -> bool:
        return any(Path(path).absolute().is_relative_to(Path(p).absolute()) for p in pending)

    errors: list[str] = []
    for name, files in cfg.corpora.items():
        for f in files:
            if later(f) and not Path(f).exists():
                continue
            if Path(f).is_dir() and not is_prepared_corpus(Path(f)):
                errors.append(f"corpora.{name}: {f} is a folder but no prepared corpus (no lmforge manifest)")
            elif not Path(f).is_dir():
                try:
                    expand_inputs([f])
                except (DataError, FileNotFoundError) as exc:
                    errors.append(f"corpora.{name}: {exc}")
    for name, task in cfg.tasks.items():
        try:
            kind = task_kind(task, name)
        except (DataError, FileNotFoundError) as exc:
            errors.append(str(exc) if f"tasks.{name}:" in str(exc) else f"tasks.{name}: {exc}")
            continue
        fmt = InstructionFormat(task.prompt_template, task.response_column, task.messages_column, task.system_prompt)
        rows = (iter_labeled(task.files + task.shots_files, task.column, task.label_column, task.labels)
                if kind == "classification" else
                iter_preference_rows(task.files, fmt, task.chosen_column, task.rejected_column) if kind == "preferences"
                else iter_conversations(task.files, fmt))
        errors += [f"tasks.{name}: {item}" for item in rows if isinstance(item, DataError)][:limit]
    if cfg.baseline is not None and not (Path(cfg.baseline) / "config.json").is_file() \
            and not (Path(cfg.baseline) / "adapter_config.json").is_file():
        errors.append(f"baseline: {cfg.baseline} is not a model folder (no config.json)")
    return errors


# ---------------------------------------------------------------- the suite
def _describe(result: dict) -> list[str]:
    lines = []
    for name, entry in result["probes"].items():
        m = entry["after"]
        if "skipped" in m:
            lines.append(f"eval: {name}: skipped ({m['skipped']})")
            continue
        ci = m.get("ppl_ci")
        lines.append(f"eval: {name} perplexity {m['ppl']:.2f}" + (f" (95% CI {ci[0]:.2f}..{ci[1]:.2f})" if ci else "")
                     + f", {m['tokens']:,} tokens")
    for name, entry in result["tasks"].items():
        m = entry["after"]
        if "skipped" in m:
            lines.append(f"eval: task {name}: skipped ({m['skipped']})")
        elif entry.get("kind") == "preferences":
            ci = m.get("accuracy_ci")
            lines.append(f"eval: task {name} preference accuracy {m['accuracy']:.3f}"
                         + (f" (95% CI {ci[0]:.3f}..{ci[1]:.3f})" if ci else "")
                         + f", ties {m['ties']:.3f}, {m['pairs']} pairs (by {m['scored_by']})")
        elif "accuracy" in m:
            ci = m.get("accuracy_ci")
            line = (f"eval: task {name} accuracy {m['accuracy']:.3f}" + (f" (95% CI {ci[0]:.3f}..{ci[1]:.3f})" if ci else "")
                    + f", macro-F1 {m['macro_f1']:.3f}, {m['examples']} examples")
            b = entry.get("baseline")
            if b:
                line += f"; baseline {b['accuracy']:.3f} ({b['kind']})"
                if ci and b.get("accuracy_ci"):
                    line += ": the difference is " + ("larger" if separated(ci, b["accuracy_ci"]) else "not larger") + " than the intervals"
            lines.append(line)
        else:
            lines.append(f"eval: task {name} exact match {m['exact_match']:.3f}, ROUGE-L {m['rouge_l']:.3f}, "
                         f"chrF {m['chrf']:.1f} ({m['examples']} answers)")
    return lines


def evaluate_model(model_dir: Path | str, cfg: EvalConfig, out_dir: Path | str | None = None, force: bool = False,
                   log=say) -> dict:
    """Measure the model at `model_dir` as `cfg` says (see the module's docstring); with `out_dir`, write
    eval.json and a metrics.jsonl record there, and reuse them when nothing changed."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else None
    head = saved_head(model_dir)
    key = evaluation_key(model_dir, cfg)
    if out is not None:
        _refuse_foreign(out)
        existing = read_evaluation(out)
        if not force and existing.get("key") == key:
            log(f"eval: {out / EVAL_FILE} is up to date")
            return existing
    device = pick_device()
    precision = resolve_precision("auto", device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, "masked_lm" if head == "pretraining" else head).to(device).eval()
    result: dict = {"writer": "lmforge", "model": str(model_dir), "head": head, "key": key,
                    "probes": {}, "tasks": {}, "samples": []}
    with tempfile.TemporaryDirectory() as scratch:
        cache = out / "corpora" if out is not None else Path(scratch)
        for name, files in cfg.corpora.items():
            result["probes"][name] = {"after": _perplexity(model, head, tokenizer, name, files, cfg, cache, device, precision)}
    for name, task in cfg.tasks.items():
        kind = task_kind(task, name)
        result["tasks"][name] = (_classification(model, head, model_dir, tokenizer, name, task, cfg, device, precision)
                                 if kind == "classification" else
                                 _preferences(model, head, tokenizer, task, cfg, device, precision) if kind == "preferences"
                                 else _generation(model, head, tokenizer, name, task, cfg))
        result["tasks"][name]["kind"] = kind
    if head == "causal_lm" and cfg.prompts:
        answers = generate_texts(model, tokenizer, list(cfg.prompts), cfg.max_new_tokens, desc="samples")
        result["samples"] += [{"prompt": p, "answer": a} for p, a in zip(cfg.prompts, answers, strict=True)]
    for line in _describe(result):
        log(line)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / EVAL_FILE).write_text(json.dumps(result, indent=1))
        log_evaluation(out, result, {"model": str(model_dir)})
    return result


def log_evaluation(folder: Path, result: dict, extra: dict) -> None:
    """One `eval` record in FOLDER/metrics.jsonl: each probe's and task's numbers after (and their
    changes, where measured before too), flat, for whatever reads the log."""
    record = {"split": "eval", **extra}
    for group in ("probes", "tasks"):
        for name, entry in result.get(group, {}).items():
            record.update({f"{name}/{k}": v for k, v in entry.get("after", {}).items() if isinstance(v, (int, float))})
            change = entry.get("change") or (entry.get("flips") or {}).get("accuracy_change") or {}
            for k in ("relative_change", "change"):
                if isinstance(change.get(k), (int, float)):
                    record[f"{name}/{k}"] = change[k]
    path = folder / "metrics.jsonl"
    if path.exists() and not is_metrics_log(path):
        return  # someone else's file: never appended to
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if (folder / LOG).is_file():  # a run's log (the board's log box) says it was evaluated, as metrics.jsonl does
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
        append_log(folder, f"{time.strftime('%H:%M:%S')} evaluated: {shown or 'nothing to score'}")
