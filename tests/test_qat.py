"""Quantization-aware training and post-training quantization (models/qat.py, torchao): a QAT run
trains fake-quantized layers, writes float final/ and a real quantized/ that plain transformers reads
and that computes what training saw and what torchao's own QAT conversion computes; `lmforge export
--format torchao` quantizes any float model (the PTQ baseline); bad settings are named."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.recipe_files import validate_recipe

from .conftest import write_recipe

pytest.importorskip("torchao", reason="quantization-aware training's library (pip install torchao)")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])


def _qat_recipe(tmp_path, base_model, small_jsonl, **qat):
    return write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
        "qat": {"weights": "int4", "group_size": 32, **qat},
        "trainer": {"max_steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "eval_every": 12,
                    "precision": "fp32", "log_every": 4}}, {"packing": {"seq_len": 64}})


@pytest.mark.slow
def test_a_qat_run_writes_a_quantized_model_that_computes_what_training_saw(tmp_path, base_model, small_jsonl):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from transformers import AutoModelForCausalLM

    from lmforge.models.qat import block_linears, scheme

    result = CliRunner().invoke(app, ["train", _qat_recipe(tmp_path, base_model, small_jsonl)])
    assert result.exit_code == 0, result.output
    assert "linear layers train fake-quantized (int4 weights" in result.output
    assert "computes what training saw" in result.output
    run = tmp_path / "run"
    quantized = AutoModelForCausalLM.from_pretrained(run / "quantized", device_map="cpu").eval()  # plain transformers
    assert type(quantized.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert isinstance(quantized.lm_head.weight, torch.nn.Parameter)  # the output layer stays float
    # torchao's own QAT path on the saved float weights: prepare, then convert, gives the same model
    reference = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    names, _ = block_linears(reference)
    config = scheme("int4", 32)
    for step in ("prepare", "convert"):
        quantize_(reference, QATConfig(config, step=step), filter_fn=lambda m, fqn, names=set(names): fqn in names)
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=IDS).logits, reference(input_ids=IDS).logits)
        float_logits = AutoModelForCausalLM.from_pretrained(run / "final")(input_ids=IDS).logits
    assert not torch.allclose(quantized(input_ids=IDS).logits, float_logits, atol=1e-3)  # it is quantized
    info = json.loads((run / "quantized" / "quantization.json").read_text())
    assert info["weights"] == "int4" and 0 < info["rms_difference_from_float"] < 0.5


def test_export_torchao_quantizes_a_float_model_after_training(tmp_path, base_model):
    out = tmp_path / "int8"
    result = CliRunner().invoke(app, ["export", str(base_model), "-o", str(out), "--format", "torchao", "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert "RMS difference from the float model" in result.output and "round trip" in result.output
    saved = json.loads((out / "export.json").read_text())
    assert saved["format"] == "torchao" and saved["round_trip"]["ok"]
    float_bytes = (base_model / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.8 * float_bytes
    result = CliRunner().invoke(app, ["export", str(base_model), "-o", str(tmp_path / "bad"), "--format", "torchao",
                                      "--group-size", "48"])
    assert result.exit_code != 0 and "group_size 48 does not divide the input width 256" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()


def test_qat_refuses_added_parameter_methods_and_fsdp():
    for extra, message in (({"method": {"name": "lora"}}, "qat: trains the model's own weights"),
                           ({"trainer": {"strategy": "fsdp"}}, "qat: not with trainer.strategy fsdp")):
        with pytest.raises(ValueError, match=message):
            validate_recipe({"qat": {"weights": "int8"}, **extra}, "r.yaml")
