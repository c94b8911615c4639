"""`--format torchao --dtype int8|int4`: post-training quantization (models/qat.py's scheme: int8
dynamic activations, int8 per-channel or int4 per-group weights on the blocks' linear layers) written
as a `transformers` folder of torchao tensors, which plain `AutoModel*.from_pretrained` reads (torchao
installed). The round trip compares the folder, read back, with the quantized model in memory: the
same numbers, to float rounding. How far quantization moved the outputs from the float source is
measured too and written to `quantization.json` (it is the price of the format, not an export error).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.export.verify import RoundTrip, compare, reference_outputs


def write_torchao(source, folder: Path, dtype: str, say: Callable[[str], None],
                  group_size: int = 32) -> tuple[RoundTrip, list[str]]:
    from transformers import AutoTokenizer

    from lmforge.data.tokenizer import save_portable
    from lmforge.models.factory import AUTO_CLASSES
    from lmforge.models.qat import quantized_from_pretrained, torchao

    torchao()
    auto = AUTO_CLASSES[source.head]
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".float-") as float_dir:
        source.model.to(torch.float32).save_pretrained(float_dir, safe_serialization=True)
        quantized = quantized_from_pretrained(float_dir, auto, dtype, group_size)
        expected = reference_outputs(quantized, source.tokenizer)
        drift = compare(source.reference, quantized, source.tokenizer, dtype)
        quantized.save_pretrained(folder, safe_serialization=True)
    save_portable(source.tokenizer, folder)
    (folder / "quantization.json").write_text(json.dumps({
        "weights": dtype, "group_size": group_size if dtype == "int4" else None, "activations": "int8 dynamic",
        "rms_difference_from_float": drift.relative_diff, "next_token_agreement_with_float": drift.top1_agreement,
        "greedy_text_as_float": drift.greedy_identical}, indent=1))
    say(f"quantization ({dtype} weights, int8 activations): RMS difference from the float model "
        f"{drift.relative_diff:.2%} of its outputs' spread"
        + (f", next-token agreement {drift.top1_agreement:.1%}" if drift.top1_agreement is not None else ""))
    files = sorted(p.name for p in folder.iterdir())
    # read back as a user would: transformers' Auto class for the head
    exported = auto.from_pretrained(str(folder), device_map="cpu", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return compare(expected, exported, tokenizer, dtype), files
