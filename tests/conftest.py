from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXCERPT = REPO / "assets" / "corpora" / "brown_excerpt.jsonl.gz"

torch.set_num_threads(2)


def excerpt_docs(n: int) -> list[str]:
    docs = []
    with gzip.open(EXCERPT, "rt") as handle:
        for line in handle:
            docs.append(json.loads(line)["text"])
            if len(docs) == n:
                break
    return docs


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> Path:
    """30 real Brown documents as plain JSONL (about 70k words)."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in excerpt_docs(30)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_jsonl) -> Path:
    from lmforge.data.formats import iter_corpus
    from lmforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter_corpus([str(small_jsonl)]), out, "bpe", vocab_size=512, min_frequency=2, num_sentinels=4)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from lmforge.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_jsonl, tokenizer):
    from lmforge.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prepared") / "data"
    return prepare_corpus([str(small_jsonl)], tokenizer, out, val_fraction=0.1, progress=False)


@pytest.fixture(scope="session")
def genre_file(tmp_path_factory):
    """Brown paragraphs labelled with their genre, news vs. fiction-like: a real two-class task."""
    path = tmp_path_factory.mktemp("labels") / "genres.jsonl"
    rows = []
    with gzip.open(EXCERPT, "rt") as handle:
        for line in handle:
            doc = json.loads(line)
            kind = {"news": "news", "editorial": "news", "reviews": "news",
                    "fiction": "fiction", "mystery": "fiction", "adventure": "fiction", "romance": "fiction"}.get(doc["genre"])
            if kind:
                rows += [{"text": p, "genre": kind} for p in doc["text"].split("\n") if len(p) > 200][:12]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def llama_mlp_calls(monkeypatch) -> list[int]:
    """One entry per run of a Llama block's MLP. Counted in `forward` itself: forward hooks do not
    fire when activation checkpointing recomputes a block in the backward pass."""
    from transformers.models.llama import modeling_llama

    calls: list[int] = []
    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    return calls


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tokenizer_dir):
    """A tiny pretrained-looking base checkpoint (a local directory, as adapters need)."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 1024), "causal_lm", tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_recipe(tmp_path: Path, base: Path, sections: dict, overrides: dict) -> str:
    """A recipe that adapts the local checkpoint `base` (also its tokenizer), written to tmp_path:
    `sections` (data, objective, trainer, ...) on common defaults, then `overrides` key by key."""
    import yaml

    recipe = {
        "output_dir": str(tmp_path / "run"), "seed": 0, "tokenizer": {"path": str(base)}, "model": {"path": str(base)},
        "packing": {"seq_len": 256}, "generate": {"prompts": ["Name a colour."], "max_new_tokens": 4}, **sections,
    }
    recipe["trainer"] = {"eval_at_start": True, "log_every": 10, "progress": False, **recipe.get("trainer", {})}
    for key, value in overrides.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def assert_cli_resume_is_exact(recipe: str, run: Path, weights_file: str | tuple[str, ...], last_step: int) -> None:
    """Train; delete the last checkpoint and the final model; resume: the same final weights (each of
    `weights_file`'s files), byte for byte, and the same last loss."""
    import shutil

    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.engine.metrics import read_metrics

    assert CliRunner().invoke(app, ["train", recipe]).exit_code == 0
    straight = read_metrics(run / "metrics.jsonl", "train")[-1]["loss"]
    files = (weights_file,) if isinstance(weights_file, str) else weights_file
    reference = [(run / "final" / name).read_bytes() for name in files]
    shutil.rmtree(run / "checkpoints" / f"step_{last_step:08d}")
    shutil.rmtree(run / "final")
    result = CliRunner().invoke(app, ["train", recipe, "--resume"])
    assert result.exit_code == 0, result.output
    assert [(run / "final" / name).read_bytes() for name in files] == reference
    assert read_metrics(run / "metrics.jsonl", "train")[-1]["loss"] == straight


# RL objectives' tests (grpo, ppo): a reward function module and a verifiable task
REWARDS_MODULE = '''
def digits(prompts, completions, **columns):
    """The share of a completion's characters that are digits."""
    assert len(columns["response"]) == len(completions)  # the rows' other columns come along
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def no_completions(prompts):
    return [0.0] * len(prompts)
'''


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


@pytest.fixture(scope="module")
def sums_file(tmp_path_factory):
    """Small additions with their answers (a verifiable task)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sums") / "sums.jsonl"
    rows = []
    for _ in range(120):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": f"What is {a} plus {b}?", "response": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
