"""The `lmforge` command line: the Typer app, and what every verb shares (clear one-line errors, a
recipe or pipeline read, a model folder located, the pre-launch check). The verbs live by family in
runs.py, measure.py, generation.py and tools.py."""

from __future__ import annotations

import logging
import os
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


# CPU threads of a command that runs a model (training has trainer.num_threads): torch's default is one per
# physical core, which fits a machine running nothing else; fewer leave cores to other work
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: one per core).")]


def use_threads(threads: int | None) -> None:
    """--threads, set before the model runs."""
    from lmforge.engine.runtime import configure_threads

    configure_threads(threads)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def guarded(fn, *args, **kwargs):
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
    except KeyboardInterrupt:  # any command's (a run's final evaluation, samples, export; a model loading): no traceback
        typer.secho("\ninterrupted (Ctrl-C): what had finished is kept, nothing half-written (a run: the same command "
                    "again skips what is up to date; --resume continues training from its last checkpoint)",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if isinstance(exc, (ConfigError, DataError, ModelError, CheckpointError, TrainingDiverged, ValueError)):
            fail(str(exc))  # their messages name the file or key already
        if is_disk_full(exc):
            where = getattr(exc, "filename", None)
            fail(f"disk full{f' writing {where}' if where else ''}: nothing half-written was kept; free some space "
                  "and run again (--resume continues a training run from its last checkpoint)")
        if isinstance(exc, FileNotFoundError) and not exc.filename:
            fail(str(exc))
        if isinstance(exc, OSError):
            where = getattr(exc, "filename", None)
            fail(f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc))
        crash(exc)


def crash(exc: BaseException) -> None:
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


def model_folder(spec: Path | str) -> Path:
    """A model folder from what the user named: a folder, a .gguf (imported once), a hub id (models/locate.py)."""
    from lmforge.models.locate import locate_model

    return guarded(locate_model, str(spec))


def trained_defaults(model: Path, fallback_seq_len: int = 256, **given):
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


def recipe_from(path: Path | None, overrides: list[str] | None):
    from lmforge.recipe_files import load_recipe

    return guarded(load_recipe, path, overrides or [])


def pipeline_or_none(path: Path, overrides: list[str] | None):
    """The pipeline a recipe file describes (it lists stages:), else None."""
    from lmforge.config import is_pipeline, read_yaml
    from lmforge.pipeline_recipe import load_pipeline

    if not is_pipeline(guarded(read_yaml, path)):
        return None
    return guarded(load_pipeline, path, overrides or [])


def precheck(cfg) -> None:
    """The pre-launch check on a sample of each data file; a run never starts on known-bad input."""
    from lmforge.check import PRELAUNCH_REPORTS, check_recipe

    report = guarded(check_recipe, cfg, sample_rows=1000, measure=False)
    PRELAUNCH_REPORTS[str(Path(cfg.output_dir).absolute())] = report.render()
    if not report.ok:
        typer.echo(report.render(), err=True)
        fail("pre-launch check failed; nothing was written (details above; `lmforge check` scans every row)")


def recipes_dir() -> Path:
    """The bundled recipes: the repository's recipes/ (an editable install), else the installed package's."""
    import lmforge

    here = Path(lmforge.__file__).resolve().parent
    for folder in (here.parents[1] / "recipes", here / "recipes"):
        if folder.is_dir():
            return folder
    fail("the bundled recipes are not installed with this lmforge (see the repository's recipes/)")
    raise AssertionError
