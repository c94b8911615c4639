"""`lmforge export MODEL_DIR -o OUT --format hf|gguf --dtype f32|f16|bf16|q8_0`: a trained model in
the form it runs in elsewhere, checked by a round trip (export/verify.py) before it is put in place.

- `hf` (export/hf.py): a plain `transformers` folder, adapters (LoRA, DoRA, IA3) folded into the
  weights, so `AutoModelFor...from_pretrained(OUT)` needs neither lmforge nor peft.
  Bottleneck adapters (methods/adapters.py) cannot be folded into weights: their folder is written
  self-contained instead (base/ in the chosen dtype beside the adapters), read back by `load_adapted`.
- `torchao` (export/torchao.py): post-training quantization to int8 activations with int8 or int4
  weights (models/qat.py's scheme), a folder plain `transformers` reads with torchao installed.
- `gguf` (export/gguf.py): one .gguf file for llama.cpp / Ollama, with the tokenizer and its chat
  template in the metadata, and an Ollama Modelfile beside it.

Both start from the model as trained (an adapter folder: its float base, the one named in
adapter_config.json, plus the adapter; so a LoRA trained on an int8 base is merged into the original
float weights, never into dequantized ones). OUT is a folder, written whole or not at all: a
temporary folder renamed into place once the round trip passed; an existing OUT is replaced only
when an earlier export wrote it. `export.json` in it records the source and the round trip's numbers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.export.verify import ExportError, Reference, RoundTrip, reference_outputs

FORMATS = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "bf16", "q8_0"), "torchao": ("int8", "int4")}
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16", "torchao": "int4"}
MARK = "export.json"


@dataclass
class Source:
    """The model to export, merged, with its tokenizer, its head, and what it computed before merging."""

    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    head: str
    reference: Reference
    adapter: str | None  # the peft type that was merged in, if any ("bottleneck": kept, not merged)


def load_source(path: Path) -> Source:
    """The trained model at `path` in fp32; an adapter is run unmerged for the reference, then merged."""
    from lmforge.models.bottleneck import is_adapted
    from lmforge.models.factory import load_model, saved_head
    from lmforge.stage_inputs import model_tokenizer

    path = Path(path)
    head = saved_head(path)
    tokenizer = model_tokenizer(path, None)
    model = load_model(path, head, merge_adapter=False)
    adapter = None
    if hasattr(model, "peft_config"):
        config = model.active_peft_config
        if config.is_prompt_learning:
            raise ExportError(f"{path}: a {config.peft_type.value.lower()} adapter cannot be merged into weights "
                              "(its virtual tokens are inputs to every call); load the folder with peft as it is")
        adapter = config.peft_type.value
    if is_adapted(model):
        adapter = "bottleneck"
    reference = reference_outputs(model, tokenizer)
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    return Source(path, model, tokenizer, head, reference, adapter)


def export_model(source_dir: Path, out: Path, fmt: str, dtype: str | None = None, say=print,
                 group_size: int = 32) -> RoundTrip:
    """Export, verify, and put in place; raises ExportError (OUT untouched) when the round trip fails."""
    from lmforge.outputs import ensure_replaceable, replace_dir, temporary_sibling

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: not a format (choose from {', '.join(FORMATS)})")
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in FORMATS[fmt]:
        raise ExportError(f"--dtype {dtype}: not stored by the {fmt} format (choose from {', '.join(FORMATS[fmt])})")
    from lmforge.models.locate import locate_model

    out = Path(out).absolute()
    ensure_replaceable(out, lambda p: (p / MARK).is_file(), "an export lmforge wrote")
    source = load_source(locate_model(source_dir))
    if source.adapter == "bottleneck" and fmt != "hf":
        raise ExportError(f"{source.path}: bottleneck adapters cannot be written as GGUF (llama.cpp has no such "
                          "layer, and the non-linearity between their projections keeps them out of the weights); "
                          "--format hf writes a self-contained adapter folder")
    merged = {None: "", "bottleneck": ", bottleneck adapters kept"}.get(source.adapter, f", {source.adapter} merged")
    say(f"export: {source.path} ({source.head}{merged}) "
        f"-> {out} as {fmt} {dtype}")
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "hf":
            from lmforge.export.hf import write_hf as write
        elif fmt == "torchao":
            from functools import partial

            from lmforge.export.torchao import write_torchao

            write = partial(write_torchao, group_size=group_size)
        else:
            from lmforge.export.gguf import write_gguf as write
        result, files = write(source, tmp, dtype, say)
        say(result.summary())
        if not result.ok:
            raise ExportError(f"export: the {fmt} {dtype} export does not compute what {source.path} does "
                              f"({result.summary()}); nothing was written to {out}")
        (tmp / MARK).write_text(json.dumps({"source": str(source.path.absolute()), "format": fmt, "dtype": dtype,
                                            "adapter_merged": source.adapter, "files": files,
                                            "round_trip": result.as_dict(), "tolerance": result.tolerance}, indent=1))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
