"""`--format hf`: the merged model as a plain `transformers` folder (safetensors, config, tokenizer
with its chat template), read back by `transformers` alone for the round trip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.export.verify import RoundTrip, compare

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def write_hf(source, folder: Path, dtype: str, say: Callable[[str], None]) -> tuple[RoundTrip, list[str]]:
    from transformers import AutoTokenizer

    from lmforge.data.tokenizer import save_portable
    from lmforge.models.factory import AUTO_CLASSES

    model = source.model.to(TORCH_DTYPES[dtype])
    model.config.dtype = TORCH_DTYPES[dtype]
    if source.adapter == "bottleneck":
        from lmforge.methods.adapters import save_adapted
        from lmforge.models.factory import load_adapted

        save_adapted(model, folder, standalone=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    save_portable(source.tokenizer, folder)
    files = sorted(p.name for p in folder.iterdir())
    # read back as a user would: transformers' Auto class for the head (bottleneck adapters: the
    # documented one-liner), computing in fp32
    if source.adapter == "bottleneck":
        exported = load_adapted(folder, source.head, dtype=torch.float32)
    else:
        exported = AUTO_CLASSES[source.head].from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return compare(source.reference, exported, tokenizer, dtype), files
