"""Verbs that talk: generate, chat, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.app import Threads, app, fail, guarded, model_folder, use_threads

PANEL = "Generate and serve"  # where --help lists these verbs


@app.command(rich_help_panel=PANEL)
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
    threads: Threads = None,
) -> None:
    """Sample continuations from a causal LM (a final model or a training checkpoint), or chat replies."""
    from lmforge.pipeline import generate_stage

    if top_p is not None and top_p <= 0:
        fail("--top-p: must be above 0 (0 would keep no token); 1 keeps them all")
    model = model_folder(model)
    use_threads(threads)
    texts = guarded(lambda: generate_stage(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer, chat))
    for p, text in zip(prompt, texts, strict=True):
        typer.echo(f"{p}\n-> {text}" if chat else p + text)


@app.command(rich_help_panel=PANEL)
def chat(
    model: Annotated[Path, typer.Argument(help="An instruction-tuned model: a folder, a .gguf, or a hub id org/name.")],
    compare: Annotated[Path | None, typer.Option("--compare", help="A second model: every turn goes to both, their "
                                                "replies one under the other (e.g. a stage's output and its start).")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system prompt for the whole conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens of each reply, at most.")] = 256,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature; 0 = greedy, the one to "
                                                      "compare models with. Default 0.7, or 0 with --compare.")] = None,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0, help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: Threads = None,
) -> None:
    """Talk to a model: multi-turn, with its chat template, replies streamed (/reset, /exit); --compare OTHER
    sends every turn to both models."""
    from lmforge.chat import chat_loop

    def ask(prompt: str) -> str | None:
        try:
            return input(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave quietly
            return None

    def write(text: str) -> None:
        typer.echo(text, nl=False)

    folders = [model_folder(model)] + ([model_folder(compare)] if compare is not None else [])
    if temperature is None:
        temperature = 0.0 if compare is not None else 0.7
    use_threads(threads)
    guarded(chat_loop, folders, ask, write, system, max_new_tokens, temperature, top_p, seed)  # Ctrl-C: chat.py


@app.command(rich_help_panel=PANEL)
def serve(
    model: Annotated[Path, typer.Argument(help="A causal LM: a folder (full or adapter), a .gguf, or a hub id org/name.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="The address to listen on; 0.0.0.0 opens it to other machines.")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(help="The model's id in the API (default: the folder's name).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens of a reply when a request gives no max_tokens.")] = 256,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together (continuous batching).")] = 32,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting beyond max-batch; more get 503 at once.")] = 64,
    threads: Threads = None,
) -> None:
    """An OpenAI-compatible API over a model: /v1/chat/completions (streaming too), /v1/completions, /v1/models."""
    from lmforge.serve import bind
    from lmforge.serve import serve as run_server

    guarded(lambda: bind(host, port).close())  # a busy port fails before the model loads
    folder = model_folder(model)
    guarded(run_server, folder, host, port, name, max_tokens, typer.echo, max_batch, max_queue, threads)
