"""Fine-tuning methods: which parameters train, and at which learning rates."""

import pytest
import torch
from pydantic import ValidationError

from lmforge.config import MethodConfig, TrainerConfig
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.engine.loop import train
from lmforge.engine.metrics import read_metrics
from lmforge.engine.optimizer import build_optimizer
from lmforge.methods import apply_method
from lmforge.methods.llrd import layer_scales
from lmforge.models.factory import build_model, preset_config
from lmforge.objectives.clm import CausalLM

GPT2 = {"n_embd": 64, "n_layer": 4, "n_head": 2}


def _gpt2(vocab: int = 300):
    torch.manual_seed(0)
    return build_model(preset_config("gpt2", "tiny", vocab, 64, **GPT2), "causal_lm")


def test_llrd_scales_follow_depth():
    scales = layer_scales(_gpt2(), 0.5)
    assert scales["transformer.wte.weight"] == scales["transformer.wpe.weight"] == 0.5**5
    assert scales["transformer.h.0.attn.c_attn.weight"] == 0.5**4
    assert scales["transformer.h.3.mlp.c_fc.bias"] == 0.5
    assert scales["transformer.ln_f.weight"] == 1.0
    bert = build_model(preset_config("bert", "tiny", 300, 64, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128), "classifier")
    scales = layer_scales(bert, 0.5)
    assert scales["bert.embeddings.word_embeddings.weight"] == 0.5**3
    assert scales["bert.encoder.layer.1.output.dense.weight"] == 0.5
    assert scales["classifier.weight"] == scales["bert.pooler.dense.weight"] == 1.0


def test_llrd_groups_reach_the_optimizer():
    model, groups = apply_method(_gpt2(), MethodConfig(name="llrd", llrd={"decay": 0.5}), weight_decay=0.1)
    optimizer = build_optimizer(groups, 1e-3, (0.9, 0.95), 1e-8)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter trains, once
    assert lr_of[id(named["transformer.h.1.attn.c_proj.weight"])] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of[id(named["transformer.wte.weight"])] == pytest.approx(1e-3 * 0.5**5)
    assert wd_of[id(named["transformer.h.1.attn.c_proj.weight"])] == 0.1
    assert wd_of[id(named["transformer.h.1.ln_1.weight"])] == 0.0  # norms and biases are not decayed


def _train_with(method: MethodConfig, prepared, out):
    model, groups = apply_method(_gpt2(prepared.vocab_size), method, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = PackedRows(prepared.split("train"), 32)
    cfg = TrainerConfig(max_steps=12, batch_size=4, lr=3e-3, log_every=1, progress=False, precision="fp32",
                        schedule="constant")
    train(model, CausalLM(), groups, cfg, out, batches=lambda s: iterate_batches(rows, 4, 0, s),
          batches_per_epoch=len(rows) // 4, tokens_per_batch=4 * 32, log=lambda s: None)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")]

    def moved(block: int) -> float:
        names = [n for n in start if n.startswith(f"transformer.h.{block}.") and n.endswith("weight")]
        return sum((dict(model.named_parameters())[n] - start[n]).norm().item() for n in names)

    return moved(0) / moved(3), losses


def test_llrd_moves_lower_blocks_less(prepared, tmp_path):
    """Adam's steps scale with the learning rate: under LLRD (decay 0.5) the lowest of 4 blocks moves
    about 0.5^3 as far as the top one; under full fine-tuning about as far."""
    llrd_ratio, losses = _train_with(MethodConfig(name="llrd", llrd={"decay": 0.5}), prepared, tmp_path / "llrd")
    full_ratio, _ = _train_with(MethodConfig(name="full"), prepared, tmp_path / "full")
    assert llrd_ratio == pytest.approx(0.5**3, abs=0.04) and full_ratio > 0.6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.08  # and it learns


def test_llrd_refusals():
    with pytest.raises(ValidationError, match="decay"):
        MethodConfig(name="llrd", llrd={"decay": 0.0})
    t5 = build_model(preset_config("t5", "tiny", 300, 64, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, d_kv=16), "seq2seq")
    with pytest.raises(ValueError, match="llrd: an encoder-decoder model"):
        layer_scales(t5, 0.8)


def test_ia3_trains_only_its_vectors_and_names_missing_targets():
    model = _gpt2()
    model.name_or_path = "a/pretrained/dir"  # adapters need a base they can be loaded against
    adapted, groups = apply_method(model, MethodConfig(name="ia3"), weight_decay=0.0)
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    # peft's GPT-2 choice: the attention's c_attn output and the MLP's c_proj input, in each of 4 blocks
    assert len(trained) == 8 and all("ia3_l" in n for n in trained)
    assert sum(len(g["params"]) for g in groups) == 8
    other = _gpt2()
    other.name_or_path = "a/pretrained/dir"
    with pytest.raises(ValueError, match="method.ia3.target_modules"):
        apply_method(other, MethodConfig(name="ia3", ia3={"target_modules": ["no_such_layer"], "feedforward_modules": []}), 0.0)


def test_prompt_learning_refusals():
    from lmforge.config import Recipe
    from lmforge.models.factory import ModelError, ensure_fits_length

    with pytest.raises(ValidationError, match="method.name prompt_tuning: built for causal-LM objectives"):
        Recipe(method={"name": "prompt_tuning"}, objective={"name": "mlm"})
    with pytest.raises(ValidationError, match="packing.document_mask: prefix_tuning ignores position ids"):
        Recipe(method={"name": "prefix_tuning"}, packing={"document_mask": True})
    recipe = Recipe(method={"name": "p_tuning", "prompt": {"virtual_tokens": 16}}, packing={"seq_len": 60})
    config = preset_config("gpt2", "tiny", 300, 64, **GPT2)
    with pytest.raises(ModelError, match="60 plus 16 virtual tokens .* longer than the model's 64 positions"):
        ensure_fits_length(config, recipe.packing.seq_len, recipe.method.virtual_positions)
    ensure_fits_length(config, 48, recipe.method.virtual_positions)  # 48 + 16 fit
    assert Recipe(method={"name": "lora"}).method.virtual_positions == 0
