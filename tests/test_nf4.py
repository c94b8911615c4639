"""QLoRA (`method.lora.base_dtype: nf4`, models/nf4.py): the quantized base computes what
transformers' own 4-bit loading computes, its frozen weights take an eighth of fp32's bytes, a run
trains only the adapters and its folder loads with plain peft; without bitsandbytes, a clear error."""

import builtins

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import LoraConfig, MethodConfig
from lmforge.engine.metrics import read_metrics
from lmforge.methods import apply_method
from lmforge.models.factory import load_model

from .conftest import write_recipe

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers (pip install bitsandbytes)")
NF4 = MethodConfig(name="lora", lora=LoraConfig(rank=4, base_dtype="nf4", target_modules="all-linear"))


def _block_weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".layers." in n and "lora_" not in n and not n.endswith("bias") and p.ndim >= 1 and "norm" not in n)


def test_the_nf4_base_computes_what_transformers_4bit_loading_computes(base_model):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model = load_model(base_model, "causal_lm").eval()
    fp32_bytes = _block_weight_bytes(model)
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
    model, _ = apply_method(model, NF4, 0.0)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 7 * model.config.num_hidden_layers
    theirs = AutoModelForCausalLM.from_pretrained(
        base_model, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)).eval()
    for layer in theirs.modules():  # the same kernel as ours (not AVX512-BF16's bf16 inference repacking)
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits  # LoRA's B starts at zero: the quantized base alone
        torch.testing.assert_close(ours, theirs(input_ids=ids).logits)
    assert not torch.allclose(ours, float_logits, atol=1e-3)  # it was quantized
    # 4 bits a weight plus one fp32 scale per 64 of them
    assert _block_weight_bytes(model) <= fp32_bytes / 8 * 1.2, (_block_weight_bytes(model), fp32_bytes)


def test_an_evaluation_pass_leaves_the_4bit_base_trainable(base_model):
    """bitsandbytes repacks a 4-bit weight for an inference-only kernel on its first eval-mode, no-grad
    forward on AVX512-BF16 CPUs: the gradients through the base after an evaluation must not change."""
    model, _ = apply_method(load_model(base_model, "causal_lm"), NF4, 0.0)
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    def input_grad() -> torch.Tensor:
        model.train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        return embeds.grad

    before = input_grad()
    with torch.no_grad():
        model.eval()(input_ids=ids)
    torch.testing.assert_close(input_grad(), before)


def test_a_qlora_run_trains_the_adapters_and_loads_with_plain_peft(tmp_path, base_model, small_jsonl):
    from peft import AutoPeftModelForCausalLM

    recipe = write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
        "method": {"name": "lora", "lora": {"rank": 8, "base_dtype": "nf4"}},
        "trainer": {"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 20,
                    "precision": "fp32", "log_every": 5}}, {"packing": {"seq_len": 64}})
    result = CliRunner().invoke(app, ["train", recipe])
    assert result.exit_code == 0, result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    folder = tmp_path / "run" / "final"
    plain = AutoPeftModelForCausalLM.from_pretrained(folder)  # the adapters on the float base
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    with torch.no_grad():
        assert plain(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_nf4_without_bitsandbytes_names_the_install(base_model, monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    model = load_model(base_model, "causal_lm")
    with pytest.raises(ValueError, match=r"base_dtype nf4 needs bitsandbytes: pip install"):
        apply_method(model, NF4, 0.0)
