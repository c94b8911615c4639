"""`lmforge serve`: the OpenAI-compatible API, called with the official `openai` client on a local port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")


def _get(url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama with lmforge's built-in chat template and a 256-token context."""
    from lmforge.data.instructions import ensure_chat_template
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    ensure_chat_template(tok, None)
    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 256), "causal_lm", tok)
    out = tmp_path_factory.mktemp("served") / "tiny-chat"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(chat_model):
    import uvicorn

    from lmforge.serve.app import Engine, build_app

    engine = Engine(chat_model, default_max_tokens=16)
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield engine, f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    engine, url = server
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert _get(url + "/health") == (200, {"status": "ok", "model": "tiny-chat"})


def test_chat_completion_is_the_models_own_greedy_reply(server, client):
    from lmforge.eval.generate import generate_text

    engine, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = generate_text(engine.model, engine.tokenizer, prompt, 8, temperature=0.0, top_k=None, top_p=None)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens == len(engine.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_as_one_reply(client):
    messages = [{"role": "user", "content": "Tell me about the city."}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    pieces, reasons = [], []
    for event in client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0, stream=True):
        pieces.append(event.choices[0].delta.content or "")
        reasons.append(event.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) >= 2  # sent as it was sampled, not in one piece
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])


def test_completions_with_a_stop_string(client):
    whole = client.completions.create(model="tiny-chat", prompt="The city", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 3
    stop = text[2:4]
    cut = client.completions.create(model="tiny-chat", prompt="The city", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(e.choices[0].text for e in client.completions.create(
        model="tiny-chat", prompt="The city", max_tokens=12, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text


def test_bad_requests_get_4xx_with_a_clear_message(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages: empty"):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], temperature=5)
    status, body = _get(server[1] + "/v1/chat/completions", b"{not json")
    assert status == 400 and "error" in body
    assert client.models.list().data  # still serving


def test_concurrent_requests_are_queued_and_all_answered(client):
    def ask(i: int) -> str:
        reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": f"Question {i}?"}],
                                               max_tokens=6, temperature=0)
        return reply.choices[0].message.content

    alone = [ask(i) for i in range(3)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, [0, 1, 2, 0, 1, 2]))
    assert together == alone + alone  # each request computed whole, none mixed with another


def test_the_cli_serves_on_localhost(chat_model):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(chat_model), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                health = _get(f"http://127.0.0.1:{port}/health", timeout=1)[1]
                break
            except OSError:  # not listening yet
                time.sleep(0.3)
        assert health == {"status": "ok", "model": "tiny-chat"}, process.stdout.read() if process.poll() is not None else ""
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/v1" in output
