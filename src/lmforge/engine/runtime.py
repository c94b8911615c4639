"""Where and how tensors run: device, precision, threads, seeds."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPUs with AVX512-BF16 or AMX run bf16 matmuls natively; others emulate them slowly.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def bf16_matmul_speedup(width: int = 512) -> float:
    """Measured bf16/fp32 matmul throughput ratio on this CPU (about 0.2 s, once per process).

    CPUs that advertise bf16 differ: with AMX it is several times faster than fp32, while on some
    AVX512-BF16 parts oneDNN runs it slower than fp32 (0.6x measured on the dev machines).
    """
    a32, b32 = torch.randn(1024, width), torch.randn(width, 4 * width)
    timings: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    # Alternate the two and keep each one's fastest: other work on the machine only ever adds time,
    # and a median of three once let a disturbed fp32 timing read as "bf16 1.1x faster" (it is 0.6x).
    for _ in range(5):
        for dtype in timings:
            a, b = a32.to(dtype), b32.to(dtype)
            a @ b  # warm-up: the first call picks kernels
            start = time.perf_counter()
            for _ in range(3):
                a @ b
            timings[dtype].append(time.perf_counter() - start)
    return min(timings[torch.float32]) / min(timings[torch.bfloat16])


@functools.cache
def matmul_peak_gflops(precision: str, device_type: str = "cpu") -> float:
    """The best measured GFLOP/s of a square matmul in the run's precision on this device: the MFU
    denominator (a datasheet peak says nothing of a CPU that emulates bf16, or of a shared machine)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    size = 4096 if device_type == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device_type)
    b = torch.randn(size, size, dtype=dtype, device=device_type)
    best = 0.0
    for _ in range(12):  # the best of several: other work on the machine only ever slows a product down
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


# What `auto` resolves to without measuring: a whole process (a test run) can act as the machine of the
# other kind, where bf16 GEMMs run faster than fp32 and `auto` picks bf16, or the other way round.
AUTO_PRECISION_ENV = "LMFORGE_AUTO_PRECISION"


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the device has native bf16 and it is actually faster there
    (or what $LMFORGE_AUTO_PRECISION says: bf16 | fp32)."""
    forced = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
    if requested == "auto" and forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"${AUTO_PRECISION_ENV}: {forced!r} is neither bf16 nor fp32")
        return forced
    if requested == "auto":
        if not bf16_supported(device):
            return "fp32"
        return "bf16" if device.type == "cuda" or bf16_matmul_speedup() > 1.1 else "fp32"
    if requested == "bf16" and not bf16_supported(device):
        print(f"precision: bf16 requested but {device.type} has no native bf16; it will be slow")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32), or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of transformer blocks: the longest `ModuleList` whose entries share one
    class (`model.layers`, `transformer.h`, `encoder.layer`, also inside a peft wrapper)."""
    stacks = [list(m) for m in model.modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1]
    return max(stacks, key=len, default=[])


@dataclasses.dataclass
class Compiled:
    """What `compile_for_training` did: the module to step, and the blocks it compiled in place."""

    module: torch.nn.Module
    blocks: list[torch.nn.Module] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        """Blocks run eagerly from now on (later generation and other shapes: no recompiles)."""
        for block in self.blocks:
            block._compiled_call_impl = None

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """The blocks run eagerly inside (evaluation under no_grad would otherwise compile a second,
        inference graph: 10-30 s on a CPU for a few short passes), compiled again after."""
        saved = [block._compiled_call_impl for block in self.blocks]
        self.undo()
        try:
            yield
        finally:
            for block, impl in zip(self.blocks, saved, strict=True):
                block._compiled_call_impl = impl


def compile_for_training(model: torch.nn.Module, mode: str) -> Compiled:
    """`trainer.compile` applied to `model`: the module to step and how to go back to eager.

    `blocks` compiles each transformer block in place: every block runs the same code, so one graph
    serves them all and compile time does not grow with depth, while the output layer stays with the
    fused chunked cross-entropy. It pays where a block has many small unfused operations (Llama's
    RMSNorm, rotary embedding and SwiGLU: on SmolLM2-135M LoRA, CPU, peak memory 0.91 -> 0.73-0.76 of
    Trainer+PEFT's, speed +0-9% run to run, after a 30-40 s first step), and on GPUs (GPT-2 small,
    bf16, H100: 1.22x eager after a 10 s first step), not on a CPU where the ops are fused already
    (GPT-2's LayerNorm and GELU: slower there). `model` hands the whole module to `torch.compile`
    (the fused output layer then falls back to full logits; on that H100 as fast, 1.7 GB more memory)."""
    if mode == "off":
        return Compiled(model)
    if mode == "model":  # a wrapper: evaluation, given the unwrapped model, runs eagerly anyway
        return Compiled(torch.compile(model))
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError("trainer.compile: blocks needs a model with a stack of identical blocks; use `model`")
    for block in blocks:
        block.compile()
    return Compiled(model, blocks)


def checkpoint_activations(model: torch.nn.Module, enabled: bool) -> Callable[[], None]:
    """`trainer.activation_checkpointing`: each transformer block keeps only its input and runs its
    forward again in the backward pass, trading one more forward for the block's activations.
    Hugging Face's own switch, so every architecture it supports works the same way; returns the
    function that switches it off again."""
    if not enabled:
        return lambda: None
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.activation_checkpointing: {type(model).__name__} does not support it")
    # transformers >= 5.x renamed it; getattr also reaches through a peft wrapper to the model
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable({"use_reentrant": False})
    # HF (5.x) also hooks the embeddings to output tensors that require grad, for the reentrant
    # variant; non-reentrant checkpointing needs no such thing, and with frozen embeddings (LoRA) the
    # hook would make the backward pass compute an input gradient nobody uses.
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    return disable
