"""Model factory over `transformers`: presets by family and size, any config, or a local checkpoint.

Models are plain `transformers` models, saved with `save_pretrained` (safetensors) so that plain
`transformers` loads them back.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lmforge.models import bottleneck

# Our own bars show progress; transformers' per-load bars would only clutter the logs.
hf_logging.disable_progress_bar()

# family -> (model_type, the heads its objectives can train; the first is its pretraining head)
FAMILIES = {
    "llama": ("llama", ("causal_lm", "classifier", "token_classifier")),
    "gpt2": ("gpt2", ("causal_lm", "classifier", "token_classifier")),
    "bert": ("bert", ("masked_lm", "encoder", "pretraining", "classifier", "token_classifier", "question_answering")),
    "roberta": ("roberta", ("masked_lm", "encoder", "classifier", "token_classifier", "question_answering")),
    "t5": ("t5", ("seq2seq",)),
}
# "encoder" is the bare model (hidden states out), for embedding objectives such as contrastive;
# "pretraining" is BERT's MLM + next-sentence head.
AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM,
                "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel, "pretraining": AutoModelForPreTraining,
                "classifier": AutoModelForSequenceClassification, "token_classifier": AutoModelForTokenClassification,
                "question_answering": AutoModelForQuestionAnswering}
# Model types that cannot be trained as decoders even though some expose a causal-LM head.
NOT_DECODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "t5", "bart", "mt5"}

# width, layers, heads; every family uses these so sizes compare across architectures.
SIZES = {"tiny": (256, 4, 4), "small": (512, 8, 8), "base": (768, 12, 12)}


class ModelError(ValueError):
    """A model that cannot be built or loaded for this run; the message names the path or key."""


def preset_config(family: str, preset: str, vocab_size: int, max_positions: int = 1024, **overrides: Any) -> PretrainedConfig:
    if family not in FAMILIES:
        raise ModelError(f"model.family: unknown family '{family}' (known: {', '.join(FAMILIES)})")
    if preset not in SIZES:
        raise ModelError(f"model.preset: unknown preset '{preset}' (known: {', '.join(SIZES)})")
    width, layers, heads = SIZES[preset]
    # Dropout 0: modern pretraining practice, and it keeps SDPA on its fast path.
    common: dict[str, Any]
    if family == "llama":
        common = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=int(width * 8 / 3 + 63) // 64 * 64,
                      max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0)
    elif family == "gpt2":
        common = dict(n_embd=width, n_layer=layers, n_head=heads, n_positions=max_positions,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                      # The exact (erf) GELU, one fused kernel. GPT-2's `gelu_new` is eight elementwise
                      # ops (1.3x slower steps, +1.2 GB at 30M params); even fused, its tanh form runs 8x
                      # slower than erf on CPU (9 vs 1.1 ms per 4M values): +3-5% per step (measured)
                      activation_function="gelu")
    elif family in ("bert", "roberta"):
        common = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * width, max_position_embeddings=max_positions + 2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:  # t5
        common = dict(d_model=width, d_ff=4 * width, num_layers=layers, num_decoder_layers=layers,
                      num_heads=heads, d_kv=width // heads, dropout_rate=0.0, decoder_start_token_id=0)
    common.update(overrides)
    return AutoConfig.for_model(FAMILIES[family][0], vocab_size=vocab_size, **common)


def ensure_family_fits(family: str, head: str, objective: str) -> None:
    if head not in FAMILIES[family][1]:
        raise ModelError(f"model.family: '{family}' is a {FAMILIES[family][1][0]} model; "
                         f"objective '{objective}' needs a {head} model")


def ensure_head_fits(config: PretrainedConfig, head: str, where: str) -> None:
    """Refuse an encoder or encoder-decoder checkpoint for a causal-LM head (known from its config alone)."""
    if head == "causal_lm" and config.model_type in NOT_DECODERS:
        raise ModelError(f"{where}: a '{config.model_type}' checkpoint cannot be trained with a causal-LM objective")


def ensure_fits_length(config: PretrainedConfig, seq_len: int, virtual_tokens: int = 0) -> None:
    """Refuse sequences longer than the model's learned positions (relative-position models have no limit);
    prompt learning's virtual tokens take positions too."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len + virtual_tokens > limit:
        extra = f" plus {virtual_tokens} virtual tokens (method.prompt.virtual_tokens)" if virtual_tokens else ""
        raise ModelError(f"packing.seq_len: {seq_len}{extra} is longer than the model's {limit} positions")


def _set_special_ids(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None) -> None:
    if tokenizer is None:
        return
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    if config.model_type == "t5" and tokenizer.pad_token_id is not None:
        config.decoder_start_token_id = tokenizer.pad_token_id


def _head_options(model_type: str, head: str) -> dict[str, Any]:
    """A bare encoder (embeddings from hidden states) without BERT's pooler: nothing uses it, and
    parameters that never get gradients stop DDP."""
    return {"add_pooling_layer": False} if head == "encoder" and model_type in ("bert", "roberta") else {}


def build_model(config: PretrainedConfig, head: str, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    _set_special_ids(config, tokenizer)
    model = AUTO_CLASSES[head].from_config(config, attn_implementation="sdpa", **_head_options(config.model_type, head))
    return score_head_in_fp32(model) if head == "classifier" else model


_FP32_HEADS: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_HEADS:
        def forward(self, *args, **kwargs):
            device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
            with torch.autocast(device_type=device, enabled=False):
                args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
                return cls.forward(self, *args, **kwargs)
        _FP32_HEADS[cls] = type(f"FP32{cls.__name__}", (cls,), {"forward": forward})
    return _FP32_HEADS[cls]


def score_head_in_fp32(model: PreTrainedModel) -> PreTrainedModel:
    """Run a classifier's or reward model's head in fp32 under any autocast. In bf16 its outputs keep
    8 bits of mantissa: on a native-bf16 CPU (AVX512-BF16) 42% of held-out reward pairs scored exactly
    equal and the ranking did not learn (0.39 -> 0.45). The head is one small matrix, so fp32 costs
    nothing. The class is swapped, not the module, so weights, names and copies (peft's) stay as they were."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module) and type(head) not in _FP32_HEADS.values():
            head.__class__ = _fp32_class(type(head))
    return model


def ensure_safe_weights(path: Path) -> None:
    """Refuse a model folder without safetensors weights: a pickle checkpoint can run code when loaded."""
    if not any(Path(path).glob("*.safetensors")):
        pickles = sorted(p.name for p in Path(path).glob("*.bin")) + sorted(p.name for p in Path(path).glob("*.pt*"))
        raise ModelError(f"{path}: no safetensors weights" + (f" (only the pickle checkpoint {', '.join(pickles)}, "
                         "which lmforge does not unpickle: it can run code); convert it once with "
                         "`model.save_pretrained(DIR, safe_serialization=True)` where you trust it" if pickles else ""))


def load_adapted(folder: str | Path, head: str | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A saved bottleneck-adapter folder (methods/adapters.py) as a model with its adapters in place, for
    inference (eval mode)."""
    folder = Path(folder)
    meta, base = bottleneck.read_meta(folder)
    if not (base / "config.json").is_file():
        raise ModelError(f"{folder}: an adapter folder without its base/ (config.json missing there)")
    model = load_model(base, head or saved_head(base), dtype=dtype, report_missing=False)
    return bottleneck.load_into(model, folder, meta, base, ModelError)


def load_model(path: str | Path, head: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
               merge_adapter: bool = True, report_missing: bool = True, **config_overrides: Any) -> PreTrainedModel:
    """Load a local checkpoint directory (never the hub), refusing an architecture the head cannot use.
    The path stays as given (relative where it was): an adapter trained on the model records it so.
    An adapter folder comes merged into its base unless `merge_adapter` is False (export compares the
    merged model with the unmerged one). A bottleneck-adapter folder comes with its adapters in place
    (they cannot be merged). `report_missing`: say which weights start newly initialised."""
    path = Path(path)
    if (path / bottleneck.CONFIG_FILE).is_file():
        return load_adapted(path, head, dtype)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, head, trust_remote_code, dtype, merge_adapter, **config_overrides)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    ensure_safe_weights(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    ensure_head_fits(config, head, str(path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of every unused tensor; one line below says what matters
    try:
        model, info = AUTO_CLASSES[head].from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True,
            attn_implementation="sdpa", dtype=dtype or torch.float32, **_head_options(config.model_type, head),
            output_loading_info=True, **config_overrides,
        )
    except ValueError as exc:  # transformers raises ValueError for an unsupported config/head pair
        raise ModelError(f"{path}: cannot load as {head}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if head == "classifier":
        score_head_in_fp32(model)
    missing = sorted(info.get("missing_keys") or [])
    if missing and report_missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
        print(f"model: {path} has no weights for {shown}: they start newly initialised ({head} head)")
    return model


ADAPTER_TASK_HEADS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classifier", "TOKEN_CLS": "token_classifier",
                      "QUESTION_ANS": "question_answering", "FEATURE_EXTRACTION": "encoder", "SEQ_2_SEQ_LM": "seq2seq"}
ARCHITECTURE_HEADS = (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"), ("ForMaskedLM", "masked_lm"),
                      ("ForPreTraining", "pretraining"), ("ForSequenceClassification", "classifier"),
                      ("ForTokenClassification", "token_classifier"), ("ForQuestionAnswering", "question_answering"),
                      ("ForConditionalGeneration", "seq2seq"))


def is_model_folder(path: str | Path) -> bool:
    """A full model, a peft adapter, or a bottleneck-adapter folder."""
    return any((Path(path) / name).is_file() for name in ("config.json", "adapter_config.json", bottleneck.CONFIG_FILE))


def saved_config(path: str | Path) -> PretrainedConfig:
    """The config of a saved model folder; an adapter folder without one: its base model's."""
    path = Path(path)
    if (path / bottleneck.CONFIG_FILE).is_file():
        return saved_config(path / "base")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return saved_config(json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def saved_head(path: str | Path) -> str:
    """The head a saved model folder carries: from its config's architecture (an adapter folder: its task
    type, else its base model's); a bare architecture is an encoder, or a causal LM for a decoder family."""
    path = Path(path)
    if (path / bottleneck.CONFIG_FILE).is_file():
        return saved_head(path / "base")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter = json.loads((path / "adapter_config.json").read_text())
        if adapter.get("task_type") in ADAPTER_TASK_HEADS:
            return ADAPTER_TASK_HEADS[adapter["task_type"]]
        return saved_head(adapter.get("base_model_name_or_path") or "")
    config = saved_config(path)
    architecture = (config.architectures or [""])[0]
    for suffix, head in ARCHITECTURE_HEADS:
        if architecture.endswith(suffix):
            return head
    return "encoder" if config.model_type in NOT_DECODERS else "causal_lm"


def _load_adapter(path: Path, head: str, trust_remote_code: bool, dtype: torch.dtype | None, merge: bool,
                  **config_overrides: Any) -> PreTrainedModel:
    """A peft adapter folder: its local base model with the adapter merged in (a plain model again);
    prompt learning cannot be merged (its virtual tokens are inputs, not weights): a `PeftModel`."""
    from peft import PeftModel

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated transformers API
    base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).is_dir():
        raise ModelError(f"{path}: adapter's base model '{base_path}' is not a local directory")
    trained_head = saved_head(path)
    if trained_head != head:  # e.g. a reward model after a LoRA SFT stage: merged under its own head, the
        if not merge:  # body then moved into a model of the head asked for (whose new head starts fresh)
            raise ModelError(f"{path}: an adapter of a {trained_head} model cannot be used unmerged as a {head} model")
        merged = _load_adapter(path, trained_head, trust_remote_code, dtype, True)
        if not isinstance(merged, PreTrainedModel):
            raise ModelError(f"{path}: a prompt-learning adapter of a {trained_head} model cannot become a {head} model")
        model = load_model(base_path, head, trust_remote_code, dtype, **config_overrides)
        body = getattr(model, model.base_model_prefix)
        body.load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
        return model
    # the head a classifier adapter trained is in the adapter (modules_to_save): the base's missing head
    # is no news to the user, and it was said, wrongly, that it "starts newly initialised"
    saved = json.loads((path / "adapter_config.json").read_text()).get("modules_to_save") or []
    base = load_model(base_path, head, trust_remote_code, dtype, report_missing=not saved, **config_overrides)
    adapted = PeftModel.from_pretrained(base, str(path))
    if not merge or adapted.active_peft_config.is_prompt_learning:
        return adapted
    return adapted.merge_and_unload()


@torch.no_grad()
def init_new_embeddings(model: PreTrainedModel, base_tokenizer: PreTrainedTokenizerBase, new_tokens: list[str],
                        new_ids: list[int], pieces: list[list[int]] | None = None) -> None:
    """Grow the embeddings for added tokens; each new row is the mean of the rows of the pieces the
    base tokenizer splits the token into (or of `pieces`, the base tokens a merged BPE piece is made of),
    so the model starts from what it already knows of the word."""
    model.resize_token_embeddings(max(max(new_ids) + 1, model.get_input_embeddings().weight.shape[0]), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    for i, (token, idx) in enumerate(zip(new_tokens, new_ids, strict=True)):
        parts = pieces[i] if pieces is not None else base_tokenizer(token, add_special_tokens=False).input_ids
        for table in tables:
            table[idx] = table[parts].mean(0)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights are counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token, 6*N (non-embedding) + 12*layers*width*seq_len for attention (PaLM appendix B)."""
    total, _ = count_parameters(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    # an embedding lookup costs nothing, but a tied output projection is a full matmul
    matmul_params = total - embed.numel() + (embed.numel() if head is not None and head.weight is embed else 0)
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "num_layers", 0)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", 0)
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


def describe(model: PreTrainedModel, seq_len: int) -> str:
    total, trainable = count_parameters(model)
    return (f"model: {model.config.model_type} {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
            f"~{flops_per_token(model, seq_len) / 1e6:.1f} MFLOPs/token for training at seq_len {seq_len}")
