"""Verbs that measure: eval, predict, harness (lm-eval), report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.app import Threads, app, fail, guarded, model_folder, trained_defaults, use_threads

PANEL = "Measure"  # where --help lists these verbs


@app.command("eval", rich_help_panel=PANEL)
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model: a folder (full model, adapter, checkpoint), a .gguf, or a hub id org/name.")],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="A prepared corpus (loss and perplexity of its validation split), or a data file scored as --task.")] = None,
    corpus: Annotated[list[str] | None, typer.Option("--corpus", "-c", help="NAME=PATH: perplexity on a prepared folder or text/JSONL/CSV files (repeatable).")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help="[NAME=]FILE: a held-out labelled (classification) or conversation (generation) file (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A YAML of the suite (corpora, tasks, prompts, ...), as an eval stage's eval: section.")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt to answer greedily, as a sample (repeatable).")] = None,
    column: Annotated[str | None, typer.Option(help="Text column of corpora and task files (default: the one the model trained on, else text).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column of classification task files (default: the model's, else label).")] = None,
    few_shot: Annotated[int, typer.Option(min=0, help="In-context examples for a model without a classifier head (per class for prototypes).")] = 8,
    baseline: Annotated[Path | None, typer.Option(help="An untuned model scored few-shot on the same rows.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for eval.json and metrics.jsonl.")] = None,
    objective: Annotated[str, typer.Option(help="--data: the objective whose loss to measure.")] = "clm",
    seq_len: Annotated[int | None, typer.Option(min=2, help="Sequence length (default: the model's training seq_len, else 256).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 8,
    max_batches: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many batches per corpus.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="--data: tokenizer directory, when the model folder has none.")] = None,
    threads: Threads = None,
) -> None:
    """Evaluate a model folder: perplexity on named corpora, held-out task files (classification with
    scikit-learn metrics, generation with exact match / ROUGE-L / chrF), a few-shot baseline, samples."""
    model = model_folder(model)
    use_threads(threads)
    column, label_column, seq_len = trained_defaults(model, column=column, label_column=label_column, seq_len=seq_len)
    baseline = model_folder(baseline) if baseline is not None else None
    if data is not None and data.is_file():  # your own file: the metric follows from its columns and the model
        task = [*(task or []), str(data)]
        data = None
    if data is not None and not (corpus or task or config or prompt):
        from lmforge.data.prepare import load_prepared
        from lmforge.pipeline import eval_stage

        metrics = guarded(lambda: eval_stage(model, load_prepared(data), objective, seq_len, batch_size, max_batches,
                                              tokenizer_dir=tokenizer))
        typer.echo(f"eval: loss {metrics['loss']:.4f} nats/token, perplexity {metrics['ppl']:.2f}, "
                   f"unigram entropy {metrics['unigram_entropy']:.4f} ({metrics['tokens']:,} tokens)")
        return
    from lmforge.config import read_yaml, validate_eval
    from lmforge.eval.suite import evaluate_model

    raw: dict = dict(guarded(read_yaml, config)) if config is not None else {}
    if not isinstance(raw, dict):
        fail(f"{config}: expected a mapping (corpora, tasks, prompts, ...)")
    raw.setdefault("corpora", {})
    raw.setdefault("tasks", {})
    if data is not None:
        raw["corpora"]["data"] = str(data)
    for item in corpus or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            fail(f"--corpus {item}: expected NAME=PATH, e.g. --corpus general=data/brown.jsonl")
        raw["corpora"][name] = [p for p in path.split(",") if p]
    for item in task or []:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name.split(".")[0], item)
        raw["tasks"][name] = {"files": [path], "column": column, "label_column": label_column}
    raw.setdefault("prompts", list(prompt or []))
    for key, value in (("few_shot", few_shot), ("baseline", str(baseline) if baseline else None), ("seq_len", seq_len),
                       ("batch_size", batch_size), ("max_batches", max_batches), ("column", column)):
        if value is not None:
            raw.setdefault(key, value)
    if not (raw["corpora"] or raw["tasks"] or raw["prompts"]):
        fail("nothing to evaluate: give --corpus, --task, --prompt, --data or --config")
    cfg = guarded(validate_eval, raw, str(config or "lmforge eval"))
    result = guarded(evaluate_model, model, cfg, out, False, typer.echo)
    for sample in result["samples"]:
        typer.echo(f"{sample['prompt']}\n-> {sample['answer']}")
    if out is not None:
        typer.echo(f"eval: wrote {out / 'eval.json'}")


@app.command(rich_help_panel=PANEL)
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model: a classifier, a reward model, a causal LM (or their adapters), a .gguf, a hub id.")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="JSONL or CSV file(s) of rows to predict (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions: .jsonl or .csv (the input rows plus the prediction).")],
    column: Annotated[str | None, typer.Option(help="The text column (a causal LM also reads a messages column; default: the model's, else text).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch (classifiers, reward models).")] = 16,
    max_len: Annotated[int | None, typer.Option(min=2, help="Tokens of each text kept (classifiers, reward models; default: the model's training seq_len, else 512).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens of each answer (causal LMs).")] = 64,
    threads: Threads = None,
) -> None:
    """Predictions on your own file: labels with probabilities, reward scores, or greedy answers."""
    from lmforge.eval.predict import predict as run_predict

    model = model_folder(model)
    use_threads(threads)
    column, max_len = trained_defaults(model, column=column, seq_len=max_len, fallback_seq_len=512)
    result = guarded(run_predict, model, data, out, column, batch_size, max_len, max_new_tokens)
    typer.echo(f"predict: {result['rows']} rows ({result['kind']}) written to {out}")


@app.command(rich_help_panel=PANEL)
def harness(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model folder (a full model or an adapter folder).")],
    tasks_dir: Annotated[Path, typer.Option("--tasks-dir", help="Folder of lm-eval task YAMLs (with their local data).")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name (repeatable).")],
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="In-context examples per prompt.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many documents per task.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results JSON to write, as lm-eval writes it "
                                             "(default: a new harness_<time>.json here).")] = None,
) -> None:
    """Benchmarks through the lm-evaluation-harness on local task files, the model loaded as lmforge loads it:
    lm-eval's table, and its results JSON."""
    import time

    from lmforge.eval.harness import ensure_new_file, harness_table, run_harness, write_harness_json

    out = out or Path(time.strftime("harness_%Y%m%d_%H%M%S.json", time.gmtime()))
    guarded(ensure_new_file, out)  # refused before the minutes of scoring, not after
    results = guarded(run_harness, model, tasks_dir, task, num_fewshot, limit)
    typer.echo(harness_table(results))
    path = guarded(write_harness_json, results, out)
    typer.echo(f"harness: results written to {path}")


@app.command(rich_help_panel=PANEL)
def report(
    folders: Annotated[list[Path], typer.Argument(help="Pipeline or run folders to report on (and compare).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """A self-contained HTML report: stages, curves, task metrics with intervals, forgetting, branches compared."""
    from lmforge.eval.report import write_report

    path = guarded(write_report, folders, out)
    typer.echo(f"report: {path} ({path.stat().st_size / 1024:,.0f} KiB, open it in a browser)")
