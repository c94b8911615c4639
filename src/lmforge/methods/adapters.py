"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021): the base stays frozen; after a
sublayer's output projection, before its residual connection and layer norm, a small module adds
`up(act(down(h)))` to the output h. `down` maps the model width to width / reduction_factor, `up`
maps back and starts at zero, so training starts exactly at the base model. Houlsby places one after
the attention block and one after the feed-forward block of every layer; Pfeiffer only the second.
The task head (a new classifier, a QA head) trains in full beside them; optionally the layer norms.

Not AdapterHub's `adapters` package: its 1.3.0 pins transformers ~=4.57.6, and lmforge is on
transformers 5 (installing it would downgrade the stack every other method runs on).

A saved folder (save_adapted) holds `bottleneck_adapter.json` (the placement and sizes),
`bottleneck_adapter.safetensors` (the adapters and whatever else trained, the head among them) and
`base/`: the base's config with the head's labels and its weight files (hard links, so no copy of the
weights). It loads back, adapters in place, with one line:

    from lmforge.methods.adapters import load_adapted; model = load_adapted("runs/x/final")

(`lmforge evaluate`, `predict`, `generate`, `serve` and `export` read such folders the same way).
No merged form exists: the non-linearity between the two projections keeps an adapter out of the
base's weights, so `lmforge export --format hf` writes the same layout with the base's weights in
the chosen dtype (self-contained, round-trip checked), and GGUF is refused with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import AdapterConfig, MethodConfig
from lmforge.engine.optimizer import decay_groups
from lmforge.methods.peft import HEAD_MODULES, link_weight_files

CONFIG_FILE = "bottleneck_adapter.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
# a sublayer's output projection, by architecture (BERT / RoBERTa, Llama-style, GPT-2)
ATTENTION_OUTPUT = re.compile(r"(attention\.output\.dense|self_attn\.o_proj|attn\.c_proj)$")
FEED_FORWARD_OUTPUT = re.compile(r"(layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj)$")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}



class Bottleneck(nn.Module):
    def __init__(self, width: int, reduction_factor: int, non_linearity: str):
        super().__init__()
        inner = max(1, width // reduction_factor)
        self.down = nn.Linear(width, inner)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(inner, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity: the base model, unchanged
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden.to(self.down.weight.dtype)))).to(hidden.dtype)


class WithAdapter(nn.Module):
    """A sublayer's output projection followed by its adapter; what came after it (dropout, the
    residual sum, the layer norm) is unchanged."""

    def __init__(self, projection: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.projection(*args, **kwargs))


def _width(module: nn.Module) -> int:
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # nn.Linear, GPT-2's Conv1D
    if not isinstance(width, int):
        raise ValueError(f"method.adapter: cannot tell the output width of {type(module).__name__}")
    return width


def placements(model: nn.Module, kind: str) -> list[str]:
    """Names of the output projections that get an adapter."""
    patterns = (ATTENTION_OUTPUT, FEED_FORWARD_OUTPUT) if kind == "houlsby" else (FEED_FORWARD_OUTPUT,)
    names = [n for n, m in model.named_modules() if not isinstance(m, WithAdapter | Bottleneck)
             and any(p.search(n) for p in patterns)]
    if not names:
        raise ValueError(f"method.adapter: found no attention / feed-forward output projection in "
                         f"{type(model).__name__} (BERT, RoBERTa, Llama-style and GPT-2 models are supported)")
    return names


def attach(model: nn.Module, cfg: AdapterConfig, names: list[str] | None = None) -> list[str]:
    """Wrap each placement's projection with a new (identity) adapter; returns the placements."""
    names = names if names is not None else placements(model, cfg.kind)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        projection = getattr(parent, child)
        weight = next(projection.parameters())
        adapter = Bottleneck(_width(projection), cfg.reduction_factor, cfg.non_linearity)
        setattr(parent, child, WithAdapter(projection, adapter.to(device=weight.device, dtype=torch.float32)))
    model.bottleneck_adapter = {"adapter": cfg.model_dump(), "placements": names}
    return names


def apply(model: nn.Module, cfg: MethodConfig, weight_decay: float) -> tuple[nn.Module, list[dict]]:
    base = getattr(model, "name_or_path", "") or ""
    if not base or not Path(base).is_dir():
        raise ValueError("method.name adapter: adapters adapt a pretrained model; set model.path to a local "
                         "checkpoint (a folder saved against a randomly initialised base could never be loaded again)")
    model.requires_grad_(False)
    attach(model, cfg.adapter)
    model.bottleneck_adapter["base_model"] = str(model.name_or_path)
    # a BERT-style sequence classifier reads the pooler's dense layer: it is part of the head there
    # (frozen, it kept a held-out genre accuracy at the few-shot baseline, 0.60 against LoRA's 0.74)
    pooled = isinstance(getattr(model, "classifier", None), nn.Module) and type(model).__name__.endswith("ForSequenceClassification")
    for name, module in model.named_modules():
        norm = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
        head = name in HEAD_MODULES or (pooled and name.endswith("pooler"))
        if isinstance(module, Bottleneck) or head or (cfg.adapter.train_layer_norms and norm):
            module.requires_grad_(True)
            module.float()  # the trained parts in fp32, as peft keeps its adapters
    model.bottleneck_adapter["trained"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return model, decay_groups(model.named_parameters(), weight_decay)


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, "bottleneck_adapter")


@contextlib.contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its projections back in place of the wrappers (to save the base as transformers
    reads it), wrapped again afterwards."""
    names = model.bottleneck_adapter["placements"]
    wrappers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrappers[name] = getattr(parent, child)
        setattr(parent, child, wrappers[name].projection)
    try:
        yield model
    finally:
        for name, wrapper in wrappers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapper)


def save_adapted(model: nn.Module, folder: Path, weights: dict[str, torch.Tensor] | None = None,
                 standalone: bool = False) -> None:
    """The folder described at the top. `standalone`: base/ gets the model's own (frozen) weights as
    stored now, not links to the base checkpoint's files (export: another dtype, no tie to the source).
    The adapter file holds what trained (adapters, head, norms), under the names it had in training."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = weights if weights is not None else dict(model.state_dict())
    trained = model.bottleneck_adapter["trained"]
    save_file({n: state[n].detach().contiguous() for n in trained}, str(folder / WEIGHTS_FILE))
    base = folder / "base"
    base.mkdir()
    model.config.architectures = [type(model).__name__]  # so the folder's head is known (saved_head)
    if standalone:
        with unwrapped(model):
            model.save_pretrained(base, safe_serialization=True)
    else:
        model.config.save_pretrained(base)
        link_weight_files(Path(model.bottleneck_adapter["base_model"]), base)
    (folder / CONFIG_FILE).write_text(json.dumps({**model.bottleneck_adapter, "base": "base"}, indent=1))


def load_adapted(folder: str | Path, head: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A saved adapter folder as a model with its adapters in place, for inference (eval mode)."""
    from lmforge.models.factory import ModelError, load_model, saved_head

    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    base = folder / meta.get("base", "base")
    if not (base / "config.json").is_file():
        raise ModelError(f"{folder}: an adapter folder without its base/ (config.json missing there)")
    model = load_model(base, head or saved_head(base), dtype=dtype, report_missing=False)
    attach(model, AdapterConfig(**meta["adapter"]), meta["placements"])
    model.bottleneck_adapter.update(base_model=str(base), trained=meta["trained"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    result = model.load_state_dict(tensors, strict=False)
    adapters = {n for n, _ in model.named_parameters() if ".adapter." in n}
    missing = sorted(adapters - tensors.keys())
    if result.unexpected_keys or missing:
        raise ModelError(f"{folder / WEIGHTS_FILE}: does not fit the model "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()
