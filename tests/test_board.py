"""`lmforge board`: the dashboard over real run folders, its JSON, and what a user sees in a real
browser (Debian's chromium driven headless by selenium; skipped with a reason where either is absent)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics
from lmforge.engine.status import read_status

from .conftest import REPO, write_recipe

INSTRUCTIONS = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_model, small_jsonl) -> Path:
    """Two finished runs (pretraining at two learning rates, one tracked) and an SFT run (a chat model),
    plus a run whose process died and one that failed: what a runs folder holds after a day's work."""
    root = tmp_path_factory.mktemp("runs")
    common = {"trainer": {"max_steps": 8, "batch_size": 2, "log_every": 2, "eval_every": 4}, "packing": {"seq_len": 64}}
    for name, lr in (("clm_a", 1e-3), ("clm_b", 3e-3)):
        folder = root / name
        folder.mkdir()
        recipe = write_recipe(folder, base_model, {**common, "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1},
                                                   "name": name}, {"trainer": {"lr": lr}})
        result = CliRunner().invoke(app, ["run", recipe, f"output_dir={root / name / 'run'}"])
        assert result.exit_code == 0, result.output
    sft = root / "sft"
    sft.mkdir()
    recipe = write_recipe(sft, base_model, {**common, "data": {"train_files": [str(INSTRUCTIONS)], "val_fraction": 0.05},
                                            "objective": {"name": "sft"}, "name": "chat"},
                          {"packing": {"seq_len": 256}})
    result = CliRunner().invoke(app, ["run", recipe, f"output_dir={sft / 'run'}"])
    assert result.exit_code == 0, result.output
    for name, status in (("killed", {"status": "running", "pid": _dead_pid(), "host": socket.gethostname(), "step": 3,
                                     "total_steps": 10}),
                         ("broken", {"status": "failed", "message": "TrainingDiverged: loss is NaN", "step": 2}),
                         # trained; this process (alive) is evaluating it
                         ("scoring", {"status": "finished", "phase": "evaluating", "pid": os.getpid(),
                                      "host": socket.gethostname(), "step": 8, "total_steps": 8}),
                         # trained and evaluated once: a validation curve of one point
                         ("one_eval", {"status": "finished", "step": 4, "total_steps": 4})):
        folder = root / name
        folder.mkdir()
        shutil.copy(root / "clm_a" / "run" / "recipe.yaml", folder / "recipe.yaml")
        (folder / "status.json").write_text(json.dumps(status))
    (root / "one_eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 2, "split": "train", "loss": 5.0}, {"step": 4, "split": "train", "loss": 4.5},
        {"step": 4, "split": "val", "loss": 4.75})))
    # a log longer than its box: the box shows the newest line
    (root / "one_eval" / "train.log").write_text("".join(f"00:00:0{i % 10} step {i} train: loss 5\n" for i in range(39))
                                                 + "00:00:09 step 4 val: loss 4.75\n")
    return root


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def board(runs):
    import uvicorn

    from lmforge.board.app import build_board

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_board(runs, allow_launch=True), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_run_list_reads_status_progress_and_best_metrics(board, runs):
    status, data = _call(board + "/api/runs")
    rows = {r["id"]: r for r in data["runs"]}
    assert status == 200 and set(rows) == {"clm_a/run", "clm_b/run", "sft/run", "killed", "broken", "scoring", "one_eval"}
    val = read_metrics(runs / "clm_a" / "run" / "metrics.jsonl", "val")
    best = min(val, key=lambda r: r["loss"])
    a = rows["clm_a/run"]
    assert a["status"] == "finished" and a["step"] == a["total_steps"] == 8 and a["progress"] == 1.0
    assert a["best_val_loss"] == best["loss"] and a["best_step"] == best["step"] and a["recipe"] == "clm_a"
    assert rows["killed"]["status"] == "interrupted"  # "running", but its process is gone
    assert rows["broken"]["status"] == "failed" and "NaN" in rows["broken"]["message"]
    assert rows["scoring"]["status"] == "evaluating"  # trained, and its process is scoring it
    # a real run's evaluation, done in this (live) process, ended its "evaluating" phase
    assert read_status(runs / "sft" / "run").get("phase") is None and rows["sft/run"]["status"] == "finished"


def test_a_run_page_has_its_curves_log_recipe_check_and_samples(board, runs):
    status, run = _call(board + "/api/runs/clm_b/run")
    assert status == 200
    train = read_metrics(runs / "clm_b" / "run" / "metrics.jsonl", "train")
    assert run["series"]["train"]["loss"] == [[r["step"], r["loss"]] for r in train]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(run["series"]["train"])
    assert run["log"][-1].split(" ", 1)[1].startswith("step 8 ") and len(run["log"]) == len(read_metrics(runs / "clm_b" / "run" / "metrics.jsonl"))
    assert yaml.safe_load(run["recipe_text"])["trainer"]["lr"] == 3e-3
    assert "pre-launch check" in run["check"].lower() or "check" in run["check"].lower()
    assert run["samples"] and run["model"].endswith("final")
    assert _call(board + "/api/runs/../../etc")[0] == 404 and _call(board + "/api/runs/nothing")[0] == 404


def test_compare_is_the_report_of_the_runs(board, runs):
    from lmforge.eval.report import render

    page = _text(board + "/compare?run=clm_a/run&run=clm_b/run")
    report = render([runs / "clm_a" / "run", runs / "clm_b" / "run"])
    assert "lmforge report" in page and "Configuration differences" in page
    assert page.replace("<body><p><a href='/'>&larr; runs</a></p>", "<body>") .count("<tr>") == report.count("<tr>")


def test_chat_goes_through_the_servers_engine(board, runs):
    from lmforge.eval.generate import generate_text
    from lmforge.models.factory import load_model
    from lmforge.stage_inputs import model_tokenizer

    status, models = _call(board + "/api/models")
    assert {m["id"] for m in models["models"]} == {"sft/run"}  # the pretraining runs' models have no chat template
    messages = [{"role": "user", "content": "Name a colour."}]
    status, reply = _call(board + "/api/chat", {"run": "sft/run", "messages": messages, "max_tokens": 8})
    final = runs / "sft" / "run" / "final"
    tokenizer = model_tokenizer(final, None)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = generate_text(load_model(final, "causal_lm"), tokenizer, prompt, 8, temperature=0.0, top_k=None, top_p=None)
    assert status == 200 and reply["reply"] == expected
    status, refused = _call(board + "/api/chat", {"run": "clm_a/run", "messages": messages})
    assert status == 400 and "no chat template" in refused["error"]["message"]
    assert "/v1/" not in refused["error"]["message"]  # no hint to an API the board does not have


def test_a_bundled_recipe_runs_where_its_paths_resolve_and_writes_under_the_board(runs):
    """The board's folder is not the repository the bundled recipes name their data from: the preview shows the
    folder a launch runs in, and the run's output lands under the board's root."""
    from fastapi.testclient import TestClient

    from lmforge.board.app import build_board

    bundled = REPO / "recipes"
    client = TestClient(build_board(runs, allow_launch=False, recipes_dir=bundled))
    quick = client.post("/api/launch/preview", json={"recipe": str(bundled / "quickstart.yaml"), "overrides": ""}).json()
    assert quick["cwd"] == str(REPO) and quick["command"].endswith(f"output_dir={runs / 'runs' / 'quickstart'}")
    recipe = yaml.safe_load((bundled / "quickstart.yaml").read_text())
    assert (Path(quick["cwd"]) / recipe["data"]["train_files"][0]).is_file()  # its data, found from where it runs
    chosen = client.post("/api/launch/preview", json={"recipe": str(bundled / "quickstart.yaml"),
                                                      "overrides": "output_dir=/tmp/mine"}).json()
    assert chosen["command"].endswith("output_dir=/tmp/mine") and chosen["command"].count("output_dir=") == 1


def test_launch_previews_the_command_and_starts_a_run(board, runs, base_model, small_jsonl):
    recipe = runs / "launched.yaml"
    recipe.write_text(Path(write_recipe(runs / "clm_a", base_model, {
        "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}, "trainer": {"max_steps": 2, "batch_size": 2},
        "packing": {"seq_len": 64}, "output_dir": str(runs / "launched_run")}, {})).read_text())
    status, preview = _call(board + "/api/launch/preview", {"recipe": "launched.yaml", "overrides": "trainer.lr=0.002"})
    assert status == 200 and preview["command"] == "lmforge run launched.yaml trainer.lr=0.002"
    assert preview["cwd"] == str(runs)  # the root's own recipes run in the root
    assert _call(board + "/api/launch/preview", {"recipe": "launched.yaml", "overrides": "lr"})[0] == 400
    assert _call(board + "/api/launch/preview", {"recipe": "/etc/passwd", "overrides": ""})[0] == 400
    status, started = _call(board + "/api/launch", {"recipe": "launched.yaml", "overrides": "trainer.lr=0.002"})
    assert status == 200
    deadline = time.time() + 240
    while time.time() < deadline and not (runs / "launched_run" / "summary.json").is_file():
        time.sleep(1)
    assert (runs / "launched_run" / "summary.json").is_file(), Path(started["log"]).read_text()
    rows = {r["id"]: r for r in _call(board + "/api/runs")[1]["runs"]}
    assert rows["launched_run"]["status"] == "finished"
    assert yaml.safe_load((runs / "launched_run" / "recipe.yaml").read_text())["trainer"]["lr"] == 0.002


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(browser, condition, timeout: float = 60):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a page that is being replaced (a form posted, a link followed) can drop the element under a check:
    # tried again until the new page holds it
    return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,
                                                               NoSuchElementException)).until(condition)


def _not_blank(path: Path) -> float:
    from PIL import Image

    return float(np.asarray(Image.open(path).convert("L"), dtype=float).std())


def test_what_a_user_sees_in_a_browser(board, runs, tmp_path):
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get(board + "/")
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") not in (None, "0"))
        rows = {r.get_attribute("data-run"): r for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")}
        assert {"clm_a/run", "clm_b/run", "sft/run", "killed", "broken"} <= set(rows)  # (and the launched run)
        best = min(read_metrics(runs / "clm_a" / "run" / "metrics.jsonl", "val"), key=lambda r: r["loss"])
        assert rows["clm_a/run"].find_element(By.CLASS_NAME, "best").text == f"{best['loss']:.4g} ({best['step']})"
        assert "interrupted" in rows["killed"].text and "failed" in rows["broken"].text
        assert "evaluating" in rows["scoring"].text and "finished" in rows["one_eval"].text
        browser.save_screenshot(str(tmp_path / "runs.png"))

        # a run's page: the loss curve is drawn (pixels on the canvas that are not background)
        rows["clm_b/run"].find_element(By.LINK_TEXT, "clm_b/run").click()
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
        drawn = browser.execute_script("""
            var c = document.getElementById('loss'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
            for (var i = 0; i < d.length; i += 4) { if (d[i] < 120 && d[i + 2] > 150) n++; }  // the blue of the curve
            return [n, c.getAttribute('data-points')];""")
        assert drawn[0] > 100 and int(drawn[1]) == len(read_metrics(runs / "clm_b" / "run" / "metrics.jsonl", "train"))
        assert "step 8" in browser.find_element(By.ID, "log").text
        browser.save_screenshot(str(tmp_path / "run.png"))

        # one validation point: its value, not a line on a meaningless axis
        browser.get(board + "/run/one_eval")
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
        val = browser.find_element(By.ID, "val")
        assert val.get_attribute("data-single-step") == "4" and browser.find_element(By.ID, "loss").get_attribute(
            "data-single-step") is None
        overflow, at_end = browser.execute_script("""var l = document.getElementById('log');
            return [l.scrollHeight > l.clientHeight, l.scrollTop + l.clientHeight >= l.scrollHeight - 8];""")
        assert overflow and at_end  # a log longer than its box: the newest line in view

        # compare two runs: the report's tables, with the runs' numbers
        browser.get(board + "/")
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") not in (None, "0"))
        for ident in ("clm_a/run", "clm_b/run"):
            browser.find_element(By.CSS_SELECTOR, f"input[value='{ident}']").click()
        browser.find_element(By.CSS_SELECTOR, "#compare button").click()
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-plots-rendered") not in (None, "0"))
        diff = browser.find_element(By.TAG_NAME, "body").text
        assert "trainer.lr" in diff and "0.001" in diff and "0.003" in diff
        browser.save_screenshot(str(tmp_path / "compare.png"))

        # chat with the SFT run's model
        browser.get(board + "/chat?run=sft/run")
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-models") not in (None, "0"))
        browser.find_element(By.ID, "text").send_keys("Name a colour.")
        browser.find_element(By.CSS_SELECTOR, "#ask button").click()
        _wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-replies") == "1")
        turns = browser.find_elements(By.CSS_SELECTOR, "#conversation .msg")
        assert turns[0].text == "you: Name a colour." and turns[1].text.startswith("model:")
        browser.save_screenshot(str(tmp_path / "chat.png"))
        # a turn that fails (here: a model without a chat template, forced into the list) is not kept
        browser.execute_script("var s = document.getElementById('model'); s.innerHTML += '<option>clm_a/run</option>';"
                               "s.value = 'clm_a/run';")
        browser.find_element(By.ID, "text").send_keys("And another?")
        browser.find_element(By.CSS_SELECTOR, "#ask button").click()
        _wait(browser, lambda b: "not kept" in b.find_element(By.ID, "conversation").text)
        assert browser.execute_script("return messages.length") == 2  # the first exchange only
    finally:
        browser.quit()
    for shot in ("runs", "run", "compare", "chat"):
        assert _not_blank(tmp_path / f"{shot}.png") > 10, shot
    if os.environ.get("LMFORGE_BOARD_SCREENSHOT"):  # docs/board.png is refreshed from here
        shutil.copy(tmp_path / "run.png", os.environ["LMFORGE_BOARD_SCREENSHOT"])


def test_progress_writes_running_status_with_an_eta_and_a_log_line(tmp_path):
    from lmforge.engine.status import Progress, read_status, run_state

    (tmp_path / "recipe.yaml").write_text("name: live\n")
    progress = Progress(tmp_path, total_steps=100, start_step=0, resumed=False)
    progress.started -= 10  # ten seconds in
    progress.record(20, "train", {"loss": 3.25, "lr": 0.001})
    status = read_status(tmp_path)
    assert run_state(tmp_path) == "running" and status["pid"] == os.getpid() and status["step"] == 20
    assert status["eta_seconds"] == pytest.approx(40, rel=0.05)  # 80 steps left at 2 steps/s
    assert (tmp_path / "train.log").read_text().strip().endswith("step 20 train: loss 3.25, lr 0.001")


def test_the_step_in_status_follows_every_step_not_only_the_metrics_records(tmp_path, prepared):
    """A 3-step run that logs only at its end once showed "step 0 of 3" for 43 minutes while the console said 2/3:
    status.json now follows the steps themselves (at most once a second)."""
    import torch

    from lmforge.config import TrainerConfig
    from lmforge.data.packing import PackedRows, iterate_batches
    from lmforge.engine.loop import train
    from lmforge.engine.optimizer import decay_groups
    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives.clm import CausalLM

    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", prepared.vocab_size, 128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=128), "causal_lm")
    rows = PackedRows(prepared.split("train"), 32)
    cfg = TrainerConfig(max_steps=3, batch_size=4, lr=1e-3, warmup_steps=1, log_every=100, eval_every=100,
                        save_every=100, progress=False, precision="fp32")
    seen, training = set(), threading.Event()

    def slow_batches(skip):  # a step of 1.5 s
        for batch in iterate_batches(rows, 4, 0, skip):
            time.sleep(1.5)
            yield batch

    def watch():  # what the board reads while the run trains
        while not training.is_set():
            seen.add(read_status(tmp_path).get("step"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train(model, CausalLM(), decay_groups(model.named_parameters(), 0.1), cfg, tmp_path, batches=slow_batches,
              batches_per_epoch=len(rows) // 4, tokens_per_batch=4 * 32, log=lambda _: None)
    finally:
        training.set()
        watcher.join()
    assert {1, 2} <= seen  # before: nothing until the only metrics record, at step 3
    assert read_status(tmp_path)["step"] == 3 and read_status(tmp_path)["eta_seconds"] == 0


def test_a_pipeline_stage_shows_from_its_first_moment_not_its_first_metrics_record(tmp_path):
    """While a stage imports its model and prepares its data (minutes, and its folder is not a run yet), the
    board lists it from the pipeline's own status; a stage to come is pending; a dead pipeline's stage reads
    interrupted."""
    from fastapi.testclient import TestClient

    from lmforge.board.app import build_board
    from lmforge.engine.status import pipeline_at

    pipe = tmp_path / "chain"
    pipe.mkdir()
    (pipe / "pipeline.json").write_text(json.dumps({"writer": "lmforge", "name": "chain", "stages": [
        {"label": "cpt", "stage": "cpt", "folder": "cpt", "kind": "train", "objective": "clm", "method": "full"},
        {"label": "sft", "stage": "sft", "folder": "sft", "kind": "train", "objective": "sft", "method": "lora"},
        {"label": "suite", "stage": "suite", "folder": "suite", "kind": "eval", "objective": "clm", "method": "full"}]}))
    pipeline_at(pipe, "cpt", "preparing")  # as lifecycle.run_pipeline writes it at a stage's start
    client = TestClient(build_board(tmp_path))
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert {k: rows[k]["status"] for k in rows} == {"chain/cpt": "preparing", "chain/sft": "pending",
                                                    "chain/suite": "pending"}
    assert rows["chain/cpt"]["stage"] == "chain: cpt" and rows["chain/cpt"]["waiting"]
    status = json.loads((pipe / "pipeline_status.json").read_text())
    (pipe / "pipeline_status.json").write_text(json.dumps({**status, "pid": _dead_pid()}))  # the pipeline was killed
    rows = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
    assert rows["chain/cpt"]["status"] == "interrupted"
