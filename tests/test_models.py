import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from lmforge.models.factory import (
    FAMILIES,
    ModelError,
    build_model,
    count_parameters,
    flops_per_token,
    load_model,
    preset_config,
)

AUTO = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_builds_saves_and_loads_with_plain_transformers(tmp_path, family):
    head = FAMILIES[family][1][0]
    model = build_model(preset_config(family, "tiny", 512), head)
    total, trainable = count_parameters(model)
    assert 1e6 < total < 2e7 and trainable == total
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = AUTO[head].from_pretrained(str(tmp_path))
    loaded = again.state_dict()
    assert set(loaded) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name


def test_presets_grow_and_overrides_apply():
    sizes = [count_parameters(build_model(preset_config("llama", p, 1024), "causal_lm"))[0] for p in ("tiny", "small")]
    assert sizes[0] < sizes[1]
    cfg = preset_config("llama", "tiny", 1024, num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2


def test_flops_per_token_counts_matmuls():
    model = build_model(preset_config("llama", "tiny", 1024), "causal_lm")
    total, _ = count_parameters(model)
    flops = flops_per_token(model, 256)
    assert flops == pytest.approx(6 * total + 12 * 4 * 256 * 256)  # tied embeddings: the head is a matmul


def test_checkpoint_of_another_architecture_refused(tmp_path):
    build_model(preset_config("bert", "tiny", 512), "masked_lm").save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'bert' checkpoint cannot be trained with a causal-LM"):
        load_model(tmp_path, "causal_lm")
    with pytest.raises(ModelError, match="missing: no such model folder"):  # a mistyped path says so
        load_model(tmp_path / "missing", "causal_lm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty: not a model directory \\(no config.json\\)"):
        load_model(tmp_path / "empty", "causal_lm")


def test_unknown_family_and_preset():
    with pytest.raises(ModelError, match="unknown family"):
        preset_config("mamba", "tiny", 100)
    with pytest.raises(ModelError, match="unknown preset"):
        preset_config("llama", "huge", 100)


def test_ranks_importing_one_gguf_at_once_import_it_once(tmp_path, monkeypatch):
    """Under torchrun every rank resolves the recipe's GGUF at the same moment: one imports, the others
    wait for it and reuse the folder (before the lock, each wrote the same temporary folder)."""
    import threading
    import time

    from lmforge.models import gguf
    from lmforge.outputs import write_stamp

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    inside, most, imports = [0], [0], []

    def slow_import(file, out, key):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        out.mkdir(parents=True)
        write_stamp(out, key, kind="gguf import")
        imports.append(out)
        inside[0] -= 1
        return out

    monkeypatch.setattr(gguf, "_import", slow_import)
    found = []
    ranks = [threading.Thread(target=lambda: found.append(gguf.import_gguf(source))) for _ in range(3)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert len(imports) == 1 and most[0] == 1
    assert found == imports * 3
