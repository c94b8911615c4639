"""The layers of a bottleneck adapter (methods/adapters.py is the method that trains them): after a
sublayer's output projection, `up(act(down(h)))` is added to the output h; `up` starts at zero, so a
model with fresh adapters is exactly its base. Here as part of the model (like peft's layers), so that
models/factory.py loads a saved adapter folder without reaching up into methods/."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.config import AdapterConfig

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


def read_meta(folder: Path) -> tuple[dict, Path]:
    """A saved folder's description and the folder of its base."""
    meta = json.loads((folder / CONFIG_FILE).read_text())
    base = folder / meta.get("base", "base")
    return meta, base


def load_into(model: nn.Module, folder: Path, meta: dict, base: Path, error: type[Exception]) -> nn.Module:
    """The saved adapters (and whatever else trained) attached to the loaded base `model`, in eval mode."""
    attach(model, AdapterConfig(**meta["adapter"]), meta["placements"])
    model.bottleneck_adapter.update(base_model=str(base), trained=meta["trained"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    result = model.load_state_dict(tensors, strict=False)
    adapters = {n for n, _ in model.named_parameters() if ".adapter." in n}
    missing = sorted(adapters - tensors.keys())
    if result.unexpected_keys or missing:
        raise error(f"{folder / WEIGHTS_FILE}: does not fit the model "
                    f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()
