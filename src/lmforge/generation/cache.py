"""The engine's KV cache: transformers' DynamicCache whose layers keep their keys and values in a buffer
with room to grow. DynamicLayer appends a decoding step's token with `torch.cat`, copying the whole
cache every step: at 8 rows of 400 tokens on SmolLM2-135M (CPU) that copy was half of a step's time
(profiled: aten::cat 51%); here the token is written in place and the buffer grows by half when full.
The attention reads the same values, so outputs are unchanged (tests/test_generation.py compares the
engine's tokens with `generate`'s)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def _append(buffer: torch.Tensor | None, length: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    need = length + new.shape[-2]
    if buffer is None or buffer.dim() != new.dim() or need > buffer.shape[-2] or buffer.shape[:-2] != new.shape[:-2]:
        grown = new.new_empty((*new.shape[:-2], need + max(64, need // 2), new.shape[-1]))
        if length:
            grown[..., :length, :] = buffer[..., :length, :]
        buffer = grown
    buffer[..., length:need, :] = new
    return buffer, need


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` / `values` are views of the filled part of a larger buffer. Assigning them
    (row selection, cropping: DynamicLayer's own methods and the engine's) replaces the buffer."""

    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    _kn = _vn = 0

    @staticmethod
    def _length(value: torch.Tensor | None) -> int:
        return value.shape[-2] if value is not None and value.dim() >= 2 else 0

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k if self._k is None or self._k.dim() < 2 else self._k[..., :self._kn, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._kn = value, self._length(value)

    @property
    def values(self) -> torch.Tensor | None:
        return self._v if self._v is None or self._v.dim() < 2 else self._v[..., :self._vn, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._vn = value, self._length(value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k, self._kn = _append(self._k, self._kn, key_states)
        self._v, self._vn = _append(self._v, self._vn, value_states)
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers, empty or filled with (keys, values) per layer."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
        for keys, values in layers or []:
            layer = GrowingLayer()
            layer.update(keys, values)
            self.layers.append(layer)
