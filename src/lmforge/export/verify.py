"""Round trip: an exported model, loaded back the way its users will load it, must compute what its
source computed. Every export runs this before it puts its output in place.

The source's outputs are taken first, on fixed prompts (words, digits, punctuation, a chat turn where
the tokenizer has a template), from the model as trained: an adapter still unmerged, in fp32. The
export is then loaded by plain `transformers` (a folder, or its GGUF loader for a .gguf file) and run
on the same token ids. What is compared:
- the outputs (logits, or an encoder's hidden states): max |difference|, relative to the spread
  (standard deviation) of the source's outputs, against the tolerance of the stored number format;
- a causal LM's next-token choice at every position (top-1 agreement) and its greedy continuation;
- the tokenizer read back from the export: the same ids for the prompts' text.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROMPTS = (
    "The history of the city begins in 1850, when the railway reached the river.",
    "Q: What is 12 plus 30?\nA:",
    'She said: "I\'ll be there at nine -- don\'t wait."',
)
GREEDY_TOKENS = 12
# The root-mean-square output difference an export may show, as a fraction of the spread (standard
# deviation) of the source's outputs, per stored number format: f32 differs only by summation order;
# f16 keeps 11 significant bits, bf16 8, q8_0 8 per 32-value block. Measured on a tiny random Llama
# and on SmolLM2-135M: f16 0.07%, bf16 0.53-0.57%, q8_0 1.7-2.9%; a wrong tensor layout (an unpermuted
# rotary projection) gives tens of percent. The bounds leave about 2-4x room.
TOLERANCE = {"f32": 1e-4, "f16": 0.005, "bf16": 0.02, "q8_0": 0.06,
             # torchao's int8 / int4: the folder read back against the quantized model in memory (the
             # quantization's own distance from the float source is reported beside, export/torchao.py)
             "int8": 1e-4, "int4": 1e-4}


class ExportError(ValueError):
    """An export that cannot be written, or that does not compute what its source did."""


@dataclass
class Reference:
    """What the source computed: per prompt its token ids and outputs, and a greedy continuation."""

    prompts: list[str]
    ids: list[list[int]]
    outputs: list[torch.Tensor]
    greedy: list[int] | None
    vocab: dict[str, int]
    max_len: int  # the model's inputs: each prompt's ids cut to this (its learned positions, room left to generate)

    def inputs(self) -> list[list[int]]:
        return [row[: self.max_len] for row in self.ids]


@dataclass
class RoundTrip:
    dtype: str
    max_abs_diff: float
    relative_diff: float  # root-mean-square difference / the source outputs' standard deviation
    tolerance: float
    top1_agreement: float | None
    greedy_identical: bool | None
    tokenizer_identical: bool
    tokenizer_note: str = ""
    reader: str = "transformers"  # what loaded the export back: plain transformers, or the consumer itself (llama.cpp)

    @property
    def ok(self) -> bool:
        return self.relative_diff <= self.tolerance and self.tokenizer_identical

    def summary(self) -> str:
        parts = [f"RMS difference {self.relative_diff:.3%} of the outputs' spread ({self.dtype} allows "
                 f"{self.tolerance:.2%}), max |Δ| {self.max_abs_diff:.3g}"]
        if self.top1_agreement is not None:
            parts.append(f"next-token agreement {self.top1_agreement:.1%}")
        if self.greedy_identical is not None:
            parts.append("greedy text identical" if self.greedy_identical else "greedy text differs")
        parts.append("tokenizer identical" if self.tokenizer_identical else "tokenizer DIFFERS")
        return f"round trip (read by {self.reader}): " + ", ".join(parts) + (f" ({self.tokenizer_note})" if self.tokenizer_note else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def prompts_for(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    prompts = list(PROMPTS)
    if tokenizer.chat_template:
        # a template that refuses a lone user turn: the plain prompts suffice
        with contextlib.suppress(Exception):
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                                         tokenize=False, add_generation_prompt=True))
    return prompts


def _outputs(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    values = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return values[0].float()


def _is_causal(model: PreTrainedModel) -> bool:
    return hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")


def _greedy(model: PreTrainedModel, ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=GREEDY_TOKENS,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def reference_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Reference:
    model.eval()
    prompts = prompts_for(tokenizer)
    ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None) or 10**6
    inputs = [row[: max(1, limit - GREEDY_TOKENS)] for row in ids]
    outputs = [_outputs(model, row) for row in inputs]
    greedy = _greedy(model, inputs[0], tokenizer) if _is_causal(model) else None
    return Reference(prompts, ids, outputs, greedy, tokenizer.get_vocab(), max(1, limit - GREEDY_TOKENS))


def output_agreement(reference: Reference, outputs: list[torch.Tensor]) -> tuple[float, float, float | None]:
    """(max |difference|, RMS difference / the source outputs' spread, next-token agreement or None) of a
    reader's outputs on the reference's inputs, whichever reader computed them."""
    diffs, squares, count, spreads, agree, total = [], 0.0, 0, [], 0, 0
    for got, expected in zip(outputs, reference.outputs, strict=True):
        if got.shape != expected.shape:
            raise ExportError(f"round trip: the export's outputs have shape {tuple(got.shape)}, "
                              f"the source's {tuple(expected.shape)}")
        delta = got - expected
        diffs.append(delta.abs().max().item())
        squares += delta.double().pow(2).sum().item()
        count += delta.numel()
        spreads.append(expected.std().item())
        if reference.greedy is not None:
            agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
            total += got.shape[0]
    relative = (squares / count) ** 0.5 / max(sum(spreads) / len(spreads), 1e-12)
    return max(diffs), relative, agree / total if total else None


@torch.no_grad()
def compare(reference: Reference, exported: PreTrainedModel, exported_tokenizer: PreTrainedTokenizerBase | None,
            dtype: str, tokenizer_note: str = "", tokenize_text: bool = True) -> RoundTrip:
    """The export, read by plain `transformers`, against the source's reference: its outputs on the same
    ids, and its tokenizer (the prompts' ids; with `tokenize_text` False, where the reader cannot split
    text as the format says, the vocabulary by id)."""
    exported.eval()
    inputs = reference.inputs()
    max_diff, relative, agreement = output_agreement(reference, [_outputs(exported, ids) for ids in inputs])
    greedy_same = None
    if reference.greedy is not None and _is_causal(exported) and exported_tokenizer is not None:
        greedy_same = _greedy(exported, inputs[0], exported_tokenizer) == reference.greedy
    tokenizer_same = True
    if exported_tokenizer is not None and not tokenize_text:
        vocab = exported_tokenizer.get_vocab()
        tokenizer_same = all(vocab.get(token) == index for token, index in reference.vocab.items())
    elif exported_tokenizer is not None:
        tokenizer_same = all(exported_tokenizer(p, add_special_tokens=True).input_ids == ids
                             for p, ids in zip(reference.prompts, reference.ids, strict=True))
    return RoundTrip(dtype, max_diff, relative, TOLERANCE[dtype], agreement, greedy_same, tokenizer_same, tokenizer_note)
