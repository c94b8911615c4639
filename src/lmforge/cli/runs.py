"""Verbs that build and run: check, tokenizer, prepare, train, run (a recipe or a pipeline), recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.app import (
    Overrides,
    RecipeArg,
    app,
    fail,
    guarded,
    pipeline_or_none,
    precheck,
    recipe_from,
    recipes_dir,
)

PANEL = "Build and run"  # where --help lists these verbs


@app.command(rich_help_panel=PANEL)
def check(recipe: RecipeArg, overrides: Overrides = None,
          measure: Annotated[bool, typer.Option(help="Measure time and memory per step with real steps.")] = True) -> None:
    """Validate a recipe, scan all its data, and measure time and memory per step."""
    from lmforge.check import check_recipe

    pipeline = pipeline_or_none(recipe, overrides)
    if pipeline is not None:
        from lmforge.lifecycle import check_pipeline

        reports = guarded(check_pipeline, pipeline, pipeline.runs, None, measure)
        for stage, report in reports:
            typer.echo(f"== stage {stage}\n{report.render()}")
        if not all(report.ok for _, report in reports):
            raise typer.Exit(code=1)
        return
    cfg = recipe_from(recipe, overrides)
    report = guarded(check_recipe, cfg, None, measure)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command(rich_help_panel=PANEL)
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

    tok = guarded(lambda: train_tokenizer(iter_corpus(inputs, column), out, kind, vocab_size, min_frequency, num_sentinels))
    typer.echo(f"tokenizer: {len(tok)} tokens saved to {out}")


@app.command(rich_help_panel=PANEL)
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

    corpus = guarded(run)
    splits = corpus.manifest["splits"]
    typer.echo(f"prepare: {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val tokens in {out} "
               f"({corpus.manifest['tokens_per_second']:,} tokens/s)")


@app.command(rich_help_panel=PANEL)
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest valid checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the final model is up to date.")] = False,
) -> None:
    """Train the recipe's model (training the tokenizer and preparing data first if needed)."""
    from lmforge import pipeline
    from lmforge.stage_inputs import inputs_stage

    cfg = recipe_from(recipe, overrides)
    precheck(cfg)

    def run():
        tok, corpora = inputs_stage(cfg)
        return pipeline.train_stage(cfg, tok, corpora, resume=resume, force=force)

    outcome = guarded(run)
    if outcome.result is not None and outcome.result.interrupted:
        raise typer.Exit(code=130)


@app.command(rich_help_panel=PANEL)
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
    from lmforge.lifecycle import run_single

    pipeline = pipeline_or_none(recipe, overrides)
    if pipeline is not None:
        _run_pipeline(pipeline, resume, force, only, start, dry_run)
        return
    if only or start or dry_run:
        fail(f"{recipe}: --only, --from and --dry-run are for pipelines (a recipe with stages:)")
    cfg = recipe_from(recipe, overrides)
    precheck(cfg)
    summary = guarded(run_single, cfg, resume, force)
    if summary.get("interrupted"):
        raise typer.Exit(code=130)


def _run_pipeline(pipeline, resume: bool, force: bool, only: str | None, start: str | None, dry_run: bool) -> None:
    from lmforge import lifecycle

    if only and start:
        fail("give --only or --from, not both")
    selected = guarded(pipeline.select, only, start)
    steps = guarded(lifecycle.plan, pipeline, selected, resume, force)
    todo = [s.run for s in steps if s.action != "skip"]
    reports = guarded(lifecycle.check_pipeline, pipeline, todo, None if dry_run else 1000, dry_run)
    failed = [(stage, r) for stage, r in reports if not r.ok]
    for stage, report in failed:
        typer.echo(f"== stage {stage}\n{report.render()}", err=True)
    if failed:
        fail(f"pre-launch check failed for stage(s) {', '.join(s for s, _ in failed)}; nothing was run")
    lifecycle.estimate(steps, dict(reports))
    typer.echo(lifecycle.render_plan(steps))
    if dry_run:
        return
    results = guarded(lifecycle.run_pipeline, pipeline, steps, force, typer.echo)
    if "interrupted" in results:
        raise typer.Exit(code=130)
    typer.echo(f"pipeline: {len(steps)} stage run(s) in {pipeline.output_dir}; `lmforge report {pipeline.output_dir}` "
               "compares them")


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


@app.command("recipes", rich_help_panel=PANEL)
def recipes_command(
    name: Annotated[str | None, typer.Argument(help="A bundled recipe to describe (or copy with --copy).")] = None,
    copy: Annotated[Path | None, typer.Option("--copy", help="Write the recipe here, as a starting point of your own.")] = None,
) -> None:
    """List the bundled recipes, describe one, or copy one to start from."""
    folder = recipes_dir()
    found = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    if name is None:
        width = max(map(len, found))
        for stem, path in found.items():
            text = _first_comment(path)
            typer.echo(f"{stem:<{width}}  {text[:110] + ('...' if len(text) > 110 else '')}")
        return
    key = name.removesuffix(".yaml")
    if key not in found:
        fail(f"no bundled recipe '{name}' (bundled: {', '.join(found)})")
    if copy is None:
        typer.echo(found[key].read_text())
        return
    target = copy / found[key].name if copy.is_dir() else copy
    if target.exists():
        fail(f"{target}: exists; lmforge does not overwrite it (choose another --copy)")
    target.write_text(found[key].read_text())
    typer.echo(f"recipes: {key} copied to {target}; edit its paths and run `lmforge run {target}`")
