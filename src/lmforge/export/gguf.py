"""`--format gguf`: a Llama-style decoder as one GGUF file (llama.cpp's format, also Ollama's), written
with the `gguf` package (llama.cpp's own writer), and an Ollama Modelfile beside it.

The layout follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM`: tensors renamed by
gguf's own name map; the query and key projections permuted into llama.cpp's rotary layout (pairs
interleaved per head, the permutation transformers' GGUF loader undoes); norms kept in f32; a tied
output layer not written (llama.cpp reuses the embeddings). The tokenizer goes in as llama.cpp's
byte-level BPE (`gpt-2`, llama.cpp's name): every token by id, its type (control for special tokens), the
merges, the special ids, whether a BOS is prepended, and the chat template. The round trip loads the
file with llama.cpp itself where llama-cpp-python is installed (export/llama_cpp.py), else with
transformers' GGUF loader (model and tokenizer); export.json names the reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmforge.export.llama_cpp import llama_cpp_version, read_back
from lmforge.export.verify import ExportError, RoundTrip, compare

SUPPORTED = ("LlamaForCausalLM",)
# pre-tokenizers transformers' GGUF loader rebuilds as written (it reads "smollm" as plain gpt2 splitting)
READER_SPLITS = ("gpt-2",)


def _file_types():
    import gguf

    return {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
            "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
            "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a query / key projection (convert_hf_to_gguf.py's `permute`)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _ensure_supported(config) -> None:
    architecture = (config.architectures or [type(config).__name__])[0]
    if architecture not in SUPPORTED:
        raise ExportError(f"--format gguf: writes Llama-style decoders ({', '.join(SUPPORTED)}), not {architecture}; "
                          "export it with --format hf")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"--format gguf: rope scaling '{rope.get('rope_type')}' is not written yet; export with --format hf")
    if getattr(config, "mlp_bias", False):
        raise ExportError("--format gguf: Llama with MLP biases has no llama.cpp layout; export with --format hf")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how the tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused as unknown
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise ExportError(f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp "
                      "name lmforge knows, and llama.cpp would split text differently than training did; "
                      "export with --format hf")


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("--format gguf: the tokenizer is not a byte-level BPE (llama.cpp's `gpt2` tokenizer); "
                          "export with --format hf")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    names = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in names:  # embedding rows past the tokenizer (a vocabulary padded to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(names[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    if len(names) > vocab_size:
        raise ExportError(f"--format gguf: the tokenizer has {len(names)} tokens, the model's embeddings {vocab_size} rows")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bool(bos is not None and tokenizer("a").input_ids[:1] == [bos]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_tensors(writer, model, dtype: str) -> None:
    import gguf

    config = model.config
    qtype = _file_types()[dtype][0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"--format gguf: no llama.cpp name for the tensor {name}")
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        kind = qtype
        if data.ndim == 1:  # norms and biases: f32, as llama.cpp keeps them
            kind = gguf.GGMLQuantizationType.F32
        elif kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # rows not in whole 32-value blocks (llama.cpp falls back too)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, np.ascontiguousarray(data))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, data.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)


def default_system_turn(tokenizer) -> str | None:
    """The system turn a ChatML template adds when a chat has none (SmolLM2's names its assistant), or None."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn adds nothing we can read
        return None
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found and '"""' not in found.group(1) else None


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the file: its chat template where it is one Ollama's template language
    can say (ChatML, or lmforge's built-in role markers), and the end-of-turn stop."""
    from lmforge.data.instructions import BUILTIN_CHAT_TEMPLATE

    template = tokenizer.chat_template or ""
    lines = [f"FROM ./{gguf_name}"]
    eos = tokenizer.eos_token
    if "<|im_start|>" in template:
        system = default_system_turn(tokenizer)
        if system:  # Ollama puts it first when a chat has none, as the template does: the same prompt as `lmforge chat`
            lines.append(f'SYSTEM """{system}"""')
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                  '{{ end }}<|im_start|>assistant\n"""', 'PARAMETER stop "<|im_end|>"']
    elif template == BUILTIN_CHAT_TEMPLATE:
        lines += ['TEMPLATE """{{- range $i, $m := .Messages }}{{ if $i }}\n{{ end }}<|{{ $m.Role }}|>\n{{ $m.Content }}'
                  '{{ if eq $m.Role "assistant" }}' + (eos or "") + '{{ end }}{{ end }}\n<|assistant|>\n"""']
        if eos:
            lines.append(f'PARAMETER stop "{eos}"')
    else:
        lines.append("# the chat template is in the GGUF's metadata (tokenizer.chat_template); "
                     "write a TEMPLATE here if Ollama does not recognise it")
    return "\n".join(lines) + "\n"


def write_gguf(source, folder: Path, dtype: str, say: Callable[[str], None]) -> tuple[RoundTrip, list[str]]:
    """The .gguf and its Modelfile in `folder`, and the round trip of the file as llama.cpp loads it where its
    binding is installed, else as transformers' GGUF loader does."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, config = source.model, source.model.config
    if source.head != "causal_lm":
        raise ExportError(f"--format gguf: writes decoders for text generation; {source.path} is a {source.head} model")
    _ensure_supported(config)
    name = f"{source.path.absolute().name}.{dtype}.gguf"
    path = folder / name
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(source.path.absolute().name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(_file_types()[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, source.tokenizer, vocab_size)
    _write_tensors(writer, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "Modelfile").write_text(modelfile(name, source.tokenizer))
    files = [name, "Modelfile"]
    version = llama_cpp_version()
    if version is not None:  # the consumer itself (export/llama_cpp.py)
        say(f"export: wrote {name} ({path.stat().st_size / 1e6:.1f} MB); loading it with llama.cpp "
            f"(llama-cpp-python {version})")
        return read_back(path, source.reference, dtype), files
    say(f"export: wrote {name} ({path.stat().st_size / 1e6:.1f} MB); reading it back with transformers' GGUF loader "
        "(llama-cpp-python is not installed: pip install 'lmforge[llama-cpp]' to have llama.cpp itself load it)")
    exported = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    if pre_tokenizer_name(json.loads(source.tokenizer.backend_tokenizer.to_str())) in READER_SPLITS:
        return compare(source.reference, exported, tokenizer, dtype), files
    note = ("transformers' GGUF reader does not split text as the file's pre-tokenizer says; "
            "the vocabulary was compared by id instead")
    return compare(source.reference, exported, tokenizer, dtype, note, tokenize_text=False), files
