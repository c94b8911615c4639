"""Bottleneck adapters (methods/adapters.py): where they sit (Houlsby: after attention and feed-forward,
Pfeiffer: after feed-forward; before the residual sum and the layer norm), that training starts at
the base model exactly, that only they and the head train, a CLI run whose folder loads with one line
and resumes exactly, and the export that writes them out (GGUF refused with its reason)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import AdapterConfig, MethodConfig
from lmforge.engine.metrics import read_metrics
from lmforge.methods import apply_method
from lmforge.models.bottleneck import Bottleneck
from lmforge.models.factory import build_model, load_adapted, load_model, preset_config

from .conftest import assert_cli_resume_is_exact


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory, tokenizer):
    """Tiny BERT, Llama and GPT-2 checkpoints as local folders (adapters adapt a saved model)."""
    folders = {}
    for family in ("bert", "llama", "gpt2"):
        torch.manual_seed(0)
        model = build_model(preset_config(family, "tiny", (len(tokenizer) + 63) // 64 * 64, 64), "causal_lm" if family != "bert" else "masked_lm", tokenizer)
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_adapters_start_at_the_base_and_only_they_and_the_head_train(saved_bases, family, kind):
    model = load_model(saved_bases[family], "classifier", num_labels=3).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    cfg = MethodConfig(name="adapter", adapter=AdapterConfig(kind=kind, reduction_factor=4))
    model, groups = apply_method(model, cfg, 0.01)
    adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
    layers = model.config.num_hidden_layers
    assert len(adapters) == (2 if kind == "houlsby" else 1) * layers
    width = model.config.hidden_size
    inner = width // 4
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trained if ".adapter." not in n}
    # the head: score (decoders) or classifier, and BERT's pooler (its dense layer feeds the classifier)
    assert head and all(n.split(".")[0] in ("score", "classifier") or ".pooler." in n for n in head), head
    assert any(".pooler." in n for n in head) == (family == "bert")
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    assert adapter_params == len(adapters) * (2 * width * inner + inner + width)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, before, rtol=0, atol=0)  # up starts at zero


def test_an_adapter_sits_before_the_residual_sum_and_the_layer_norm(saved_bases):
    """BERT's feed-forward output is LayerNorm(dropout(dense(h)) + input); with the adapter it must be
    LayerNorm(a(dense(h)) + input), a(x) = x + up(act(down(x))) (Houlsby's and Pfeiffer's placement)."""
    model = load_model(saved_bases["bert"], "classifier", num_labels=2).eval()
    model, _ = apply_method(model, MethodConfig(name="adapter", adapter=AdapterConfig(non_linearity="gelu")), 0.0)
    output = model.bert.encoder.layer[0].output
    torch.manual_seed(1)
    for p in output.dense.adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)
    intermediate = torch.randn(2, 5, model.config.intermediate_size)
    residual = torch.randn(2, 5, model.config.hidden_size)
    dense = output.dense.projection
    h = dense(intermediate)
    adapter = output.dense.adapter
    expected = output.LayerNorm(h + adapter.up(torch.nn.functional.gelu(adapter.down(h))) + residual)
    with torch.no_grad():
        torch.testing.assert_close(output(intermediate, residual), expected)


def _recipe(tmp_path: Path, base: Path, genre_file: Path, **trainer) -> str:
    recipe = {
        "output_dir": str(tmp_path / "run"), "tokenizer": {"path": str(base)}, "model": {"path": str(base)},
        "data": {"train_files": [str(genre_file)], "label_column": "genre", "val_fraction": 0.2},
        "objective": {"name": "classify"},
        "method": {"name": "adapter", "adapter": {"kind": "houlsby", "reduction_factor": 4}},
        "packing": {"seq_len": 64},
        "trainer": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 30, "log_every": 5,
                    "eval_at_start": True, "progress": False, "precision": "fp32", **trainer},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_run_trains_only_the_adapters_and_its_folder_loads_with_one_line(tmp_path, base_model, genre_file):
    from safetensors.torch import load_file

    result = CliRunner().invoke(app, ["train", _recipe(tmp_path, base_model, genre_file)])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert losses[-1] < losses[0], losses
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert after["loss"] < before["loss"], (before, after)
    final = tmp_path / "run" / "final"
    saved = load_file(str(final / "bottleneck_adapter.safetensors"))
    assert saved and all(".adapter." in n or n.startswith("score.") for n in saved), sorted(saved)
    # the base is linked, not copied (its weights did not change), with the head's labels in its config
    assert (final / "base" / "model.safetensors").stat().st_ino == (base_model / "model.safetensors").stat().st_ino
    model = load_adapted(final)  # the documented one-liner
    assert model.config.id2label == {0: "fiction", 1: "news"}
    assert not model.training and sum(isinstance(m, Bottleneck) for m in model.modules()) == 2 * model.config.num_hidden_layers
    plain = load_model(base_model, "classifier", num_labels=2).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, load_model(final, "classifier")(input_ids=ids).logits)
        assert not torch.allclose(model.model(input_ids=ids).last_hidden_state, plain.model(input_ids=ids).last_hidden_state)

    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", str(final), "-o", str(out), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "export.json").read_text())["adapter_merged"] == "bottleneck"
    assert not (out / "base" / "model.safetensors").samefile(base_model / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_adapted(out)(input_ids=ids).logits, model(input_ids=ids).logits)
    result = CliRunner().invoke(app, ["export", str(final), "-o", str(tmp_path / "gguf"), "--format", "gguf"])
    assert result.exit_code != 0 and "cannot be written as GGUF" in result.output and "Traceback" not in result.output


def test_an_adapter_run_resumes_exactly(tmp_path, base_model, genre_file):
    recipe = _recipe(tmp_path, base_model, genre_file, max_steps=8, save_every=4, eval_every=100, eval_at_start=False)
    assert_cli_resume_is_exact(recipe, tmp_path / "run", "bottleneck_adapter.safetensors", 8)


def test_adapters_refuse_a_random_base_and_an_unknown_architecture(tokenizer):
    model = build_model(preset_config("llama", "tiny", (len(tokenizer) + 63) // 64 * 64, 64), "causal_lm", tokenizer)
    with pytest.raises(ValueError, match="adapters adapt a pretrained model"):
        apply_method(model, MethodConfig(name="adapter"), 0.0)
    from lmforge.models.bottleneck import placements

    with pytest.raises(ValueError, match="found no attention / feed-forward output projection"):
        placements(torch.nn.Sequential(torch.nn.Linear(4, 4)), "houlsby")
