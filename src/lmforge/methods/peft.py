"""Adapters on a frozen base model, built with `peft`: LoRA / DoRA (low-rank updates of the weights),
(IA)^3 (learned vectors rescaling keys, values and feed-forward activations), and prompt learning
(prompt tuning, P-tuning, prefix tuning: learned virtual tokens in front of every input).

Recipe keys `method.lora.*`, `method.ia3.*` and `method.prompt.*` map onto `peft.LoraConfig`,
`peft.IA3Config` and the prompt-learning configs. The trained folder holds the
adapter in peft's own format (`adapter_config.json` + `adapter_model.safetensors`, pointing at the
local base checkpoint), so `PeftModel.from_pretrained(base, folder)` or `AutoPeftModelForCausalLM`
load it without lmforge.

The frozen base can be stored in bf16 (`base_dtype`), halving its memory; the adapters stay fp32
(peft upcasts them) so their updates are not lost to bf16 rounding. `auto` picks bf16 only where bf16
matmuls are measured faster, because on some CPUs bf16 halves memory but slows every step. `int8`
(QLoRA's idea with 8 bits) stores the blocks' frozen linear layers in int8 and multiplies in int8
(`models/int8.py`): a quarter of the memory and 2-3x faster GEMMs, at a small cost in loss. `nf4`
is QLoRA: the same layers in 4-bit NormalFloat through bitsandbytes (`models/nf4.py`), an eighth of
fp32's memory for those weights, dequantized for every product (slower than fp32 on a CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from torch import nn

from lmforge.config import PROMPT_METHODS, MethodConfig
from lmforge.engine.optimizer import decay_groups
from lmforge.engine.runtime import pick_device, repeated_blocks, resolve_precision
from lmforge.models.int8 import quantize_frozen_linears

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated transformers API

# Task heads trained in full next to the adapters (a new classifier has nothing to adapt).
HEAD_MODULES = ("score", "classifier", "qa_outputs")


def base_dtype(requested: str) -> torch.dtype:
    """The floating-point dtype of the frozen base (with `int8`: of what is not quantized)."""
    if requested == "auto":
        requested = "bf16" if resolve_precision("auto", pick_device()) == "bf16" else "fp32"
    return torch.bfloat16 if requested == "bf16" else torch.float32


def apply(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    if getattr(model, "name_or_path", "") in ("", None):
        raise ValueError(f"method.name {cfg.name}: adapters adapt a pretrained model; set model.path to a local "
                         "checkpoint (adapters saved against a randomly initialised base could never be loaded again)")
    if cfg.name == "lora":
        model.to(base_dtype(cfg.lora.base_dtype))
    heads = [name for name in HEAD_MODULES if isinstance(getattr(model, name, None), nn.Module)]
    config = _adapter_config(cfg, heads or None, model)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. peft names the target modules it could not find
        where = "method.prompt" if cfg.name in PROMPT_METHODS else f"method.{cfg.name}.target_modules"
        raise ValueError(f"{where}: {exc}") from None
    for name in heads:  # peft keeps a trainable copy of each head; store it in fp32 like the adapters
        model.base_model.model.get_submodule(name).to(torch.float32)
    if cfg.name == "lora" and cfg.lora.base_dtype in ("int8", "nf4"):
        _quantize_base(model, cfg.lora.base_dtype)
    return model, decay_groups(model.named_parameters(), weight_decay)


def task_type(model: nn.Module) -> str | None:
    """peft's task type for the model's head, recorded in adapter_config.json so that peft's Auto
    classes (and readers of the folder) know what it is; None for heads peft has no type for (masked LM)."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if name.endswith("Model") else None


def _adapter_config(cfg: MethodConfig, heads: list[str] | None, model: nn.Module) -> PeftConfig:
    if cfg.name in PROMPT_METHODS:
        return _prompt_config(cfg, model)
    # modules_to_save gets a copy of `heads`: for SEQ_CLS peft adds its own head names to the list in place
    if cfg.name == "ia3":
        return IA3Config(target_modules=cfg.ia3.target_modules, feedforward_modules=cfg.ia3.feedforward_modules,
                         modules_to_save=list(heads or []) or None, task_type=task_type(model))
    lora = cfg.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
                      target_modules=lora.target_modules, modules_to_save=list(heads or []) or None, task_type=task_type(model))


def _prompt_config(cfg: MethodConfig, model: nn.Module) -> PeftConfig:
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(f"method.name {cfg.name}: built for causal LMs, not {type(model).__name__}")
    prompt, width = cfg.prompt, model.get_input_embeddings().weight.shape[1]
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.virtual_tokens}
    if cfg.name == "prompt_tuning":  # sampled vocabulary embeddings start closer to what the model reads than noise
        return PromptTuningConfig(**common, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    if cfg.name == "p_tuning":
        return PromptEncoderConfig(**common, encoder_hidden_size=prompt.encoder_hidden_size or width)
    return PrefixTuningConfig(**common, prefix_projection=prompt.prefix_projection,
                              encoder_hidden_size=prompt.encoder_hidden_size or width)


def _quantize_base(model: nn.Module, kind: str) -> None:
    """The blocks' frozen linear layers (peft's wrapped `base_layer`s too) to int8 or NF4; embeddings,
    norms, the output layer and task heads stay in floating point."""
    if kind == "nf4":
        from lmforge.models.nf4 import quantize_frozen_linears_nf4

        # dequantized to fp32; under trainer.precision bf16, autocast runs the products in bf16
        found = quantize_frozen_linears_nf4(repeated_blocks(model), torch.float32)
    else:
        found = quantize_frozen_linears(repeated_blocks(model))
    if found == 0:
        raise ValueError(f"method.lora.base_dtype: {kind} found no frozen linear layers in a stack of transformer blocks")
    # Weights loaded from safetensors are views of the file's memory map, which stays mapped (its pages
    # read by the quantization counted in RSS) while any of them lives: copy the float rest out of it.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def link_weight_files(source: Path, target: Path) -> None:
    """The safetensors weight files (and shard index) of checkpoint `source` into folder `target`: hard
    links (no second copy of the weights), or copies across file systems."""
    for weights in [*Path(source).glob("*.safetensors"), *Path(source).glob("*.safetensors.index.json")]:
        try:
            os.link(weights, target / weights.name)
        except OSError:  # another file system
            shutil.copy2(weights, target / weights.name)


def link_labelled_base(model: nn.Module, folder: Path, final_dir: Path) -> None:
    """A classifier's adapter folder gets its own base: `base/` holds the base's config with the label
    map and number of labels, and its weight files (hard links, or copies across file systems). The
    adapter config points there, so plain `AutoPeftModelForSequenceClassification.from_pretrained(folder)`
    builds a head of the right size with the right labels (the base's own config would give a
    two-label head, a size mismatch); `final_dir` is the folder's path as the recipe gave it."""
    config = model.peft_config["default"]
    if config.task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return
    source = Path(config.base_model_name_or_path)
    base = Path(folder) / "base"
    base.mkdir()
    model.get_base_model().config.save_pretrained(base)
    link_weight_files(source, base)
    adapter_config = Path(folder) / "adapter_config.json"
    saved = json.loads(adapter_config.read_text())
    saved["base_model_name_or_path"] = str(Path(final_dir) / "base")
    adapter_config.write_text(json.dumps(saved, indent=2, sort_keys=True))
