"""GGUF checkpoints (llama.cpp's format, how some packages ship real models) as plain `transformers` folders.

A recipe's `model.path` (or `tokenizer.path`) may name a `.gguf` file or a folder holding one (and no
config.json): it is imported once, with `transformers`' own GGUF loader (weights dequantized to fp32;
the tokenizer and its chat template from the file's metadata), and saved as safetensors under the
cache ($LMFORGE_CACHE, else ~/.cache/lmforge), keyed by the file's size and mtime. The recipe then
uses that folder, so every command (check, train, eval, generate) sees an ordinary model folder, and
what it trains loads with plain `transformers` / `peft`. `lmforge import-gguf FILE -o DIR` does the
same into a folder of your choice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from lmforge.models.factory import ModelError


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder without config.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(f"{path}: {len(found)} GGUF files ({', '.join(f.name for f in found)}); name one of them")
    return found[0] if found else None


def import_gguf(source: str | Path, out: str | Path | None = None) -> Path:
    """The plain model folder of the GGUF at `source` (imported now, or earlier with the same file)."""
    from lmforge.data.formats import file_fingerprints
    from lmforge.outputs import content_hash, stamp_matches

    gguf = gguf_file(source)
    if gguf is None:
        raise ModelError(f"{source}: not a GGUF file, nor a folder holding one")
    key = content_hash({"gguf": file_fingerprints([gguf]), "format": 1})
    if out is not None:  # a folder of the user's choosing (`lmforge import-gguf -o`): one process
        return Path(out) if stamp_matches(out, key) else _import(gguf, Path(out), key)
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if stamp_matches(out, key):
        return out
    with _import_lock(out):  # the ranks of a torchrun run all ask at once: one imports, the others then reuse it
        if stamp_matches(out, key):
            return out
        return _import(gguf, out, key)


@contextlib.contextmanager
def _import_lock(out: Path):
    """An exclusive lock beside `out` in the cache (fcntl's: released when the process ends, never left stale)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for the importer (outputs.RunLock refuses instead)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(gguf: Path, out: Path, key: str) -> Path:
    from lmforge.engine.distributed import say
    from lmforge.outputs import OutputError, has_stamp, write_stamp

    if out.exists() and not has_stamp(out):
        raise OutputError(f"{out}: exists and lmforge did not write it; choose another folder")
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelError(f"{gguf}: reading GGUF needs the `gguf` package (pip install gguf)") from None
    _ensure_architecture_supported(gguf)
    say(f"model: importing {gguf} (GGUF, dequantized to fp32) into {out}; once, later runs reuse it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{gguf}: transformers cannot import this GGUF ({exc})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantized weights are plain fp32: no quantizer left
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # our own half-written import
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_stamp(tmp, key, source=str(gguf.absolute()), kind="gguf import")
    if out.exists():  # an earlier import of another version of the file: ours (stamped), replaced
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _ensure_architecture_supported(gguf: Path) -> None:
    """Refuse, before any work, a GGUF whose architecture transformers cannot dequantize into a model."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(str(gguf)).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as exc:
        raise ModelError(f"{gguf}: not a readable GGUF file ({exc})") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{gguf}: its architecture '{architecture}' cannot be imported (transformers reads GGUF "
                         f"models of: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
