"""`lmforge serve`: the OpenAI-compatible API, called with the official `openai` client on a local port."""

from __future__ import annotations

import contextlib
import http.client
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


@contextlib.contextmanager
def _serving(model_dir: Path, **options):
    import uvicorn

    from lmforge.serve.app import Engine, build_app

    engine = Engine(model_dir, **{"default_max_tokens": 16, **options})
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    try:
        yield engine, f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(10)
        engine.worker.close()


@pytest.fixture(scope="module")
def server(chat_model):
    with _serving(chat_model) as served:
        yield served


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    engine, url = server
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    status, health = _get(url + "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-chat"
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


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


def test_ignore_eos_reaches_the_engine(server):
    from lmforge.serve.schema import CompletionRequest

    engine, _ = server
    asked = {"model": "tiny-chat", "prompt": "The city", "max_tokens": 5}
    assert engine.plan(CompletionRequest(**asked, ignore_eos=True)).ignore_eos
    assert not engine.plan(CompletionRequest(**asked)).ignore_eos


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
        assert health and health["model"] == "tiny-chat", process.stdout.read() if process.poll() is not None else ""
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/v1" in output


def test_every_error_has_openais_shape(server, client):
    url = server[1]
    status, body = _get(url + "/v1/no/such/route")
    assert status == 404 and "no such route" in body["error"]["message"] and body["error"]["type"] == "not_found_error"
    deep = b'{"model": "tiny-chat", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = _get(url + "/v1/completions", deep)
    assert status == 400 and body["error"]["message"]
    status, body = _get(url + "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "a", "seed": 10**30}).encode())
    assert status == 400 and body["error"]["param"] == "seed"
    started = time.time()
    status, body = _get(url + "/v1/completions", json.dumps(
        {"model": "tiny-chat", "prompt": "a", "max_tokens": 8, "stop": [f"s{i}" for i in range(20_000)]}).encode())
    assert status == 400 and body["error"]["param"] == "stop" and time.time() - started < 10
    with pytest.raises(openai.BadRequestError, match="needs content"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user"}])
    with pytest.raises(openai.BadRequestError, match="logprobs: not supported"):
        client.completions.create(model="tiny-chat", prompt="a", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny-chat", prompt=[10**9])


def test_empty_stop_token_prompts_and_usage_in_streams(server, client):
    whole = client.completions.create(model="tiny-chat", prompt="The city", max_tokens=8, temperature=0)
    assert client.completions.create(model="tiny-chat", prompt="The city", max_tokens=8, temperature=0,
                                     stop="").choices[0].text == whole.choices[0].text  # "" stops nothing
    ids = server[0].tokenizer("The city", add_special_tokens=False).input_ids
    assert client.completions.create(model="tiny-chat", prompt=ids, max_tokens=8,
                                     temperature=0).choices[0].text == whole.choices[0].text
    events = list(client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert events[-1].choices == [] and 1 <= events[-1].usage.completion_tokens <= 5
    assert events[-1].usage.total_tokens == events[-1].usage.prompt_tokens + events[-1].usage.completion_tokens


def test_a_long_stream_and_48_concurrent_requests_all_finish_and_health_answers_throughout(server, client):
    """The deadlock of the locked server: one long stream plus many waiting requests stalled it for good."""
    url = server[1]
    stop = threading.Event()
    health_times: list[float] = []

    def poll_health() -> None:
        while not stop.is_set():
            started = time.time()
            status, _ = _get(url + "/health", timeout=5)
            assert status == 200
            health_times.append(time.time() - started)
            time.sleep(0.1)

    def long_stream() -> int:
        pieces = client.completions.create(model="tiny-chat", prompt="Once", max_tokens=200, temperature=0.9, seed=1,
                                           stream=True)
        return sum(1 for _ in pieces)

    def mixed(i: int) -> str:
        messages = [{"role": "user", "content": f"Question {i}?"}]
        if i % 3 == 0:
            return "".join(e.choices[0].delta.content or "" for e in client.chat.completions.create(
                model="tiny-chat", messages=messages, max_tokens=12, stream=True, temperature=0))
        if i % 3 == 1:
            return client.completions.create(model="tiny-chat", prompt=f"Number {i}", max_tokens=6 + i % 7).choices[0].text
        return client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, seed=i).choices[0].message.content

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    started = time.time()
    with ThreadPoolExecutor(49) as pool:
        stream = pool.submit(long_stream)
        answers = [f.result(timeout=300) for f in [pool.submit(mixed, i) for i in range(48)]]
        chunks = stream.result(timeout=300)
    stop.set()
    poller.join(10)
    assert len(answers) == 48 and all(isinstance(a, str) for a in answers) and chunks > 10
    assert health_times and max(health_times) < 1.0, (max(health_times), time.time() - started)
    assert _get(url + "/health")[1]["in_flight"] == 0


def test_a_full_server_answers_503_at_once_and_a_dropped_client_frees_its_slot(chat_model):
    with _serving(chat_model, max_batch=1, max_queue=0, default_max_tokens=200) as (engine, url):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"model": "tiny-chat", "prompt": "Once", "max_tokens": 220, "stream": True})
        connection.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data:")
        started = time.time()
        status, error = _get(url + "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x"}).encode())
        assert status == 503 and error["error"]["code"] == "server_busy" and time.time() - started < 5
        connection.close()  # the client goes away mid-stream
        deadline = time.time() + 20
        while _get(url + "/health")[1]["in_flight"] and time.time() < deadline:
            time.sleep(0.1)
        assert _get(url + "/health")[1]["in_flight"] == 0
        status, reply = _get(url + "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x", "max_tokens": 3}).encode())
        assert status == 200 and reply["usage"]["completion_tokens"] <= 3


def test_a_busy_port_fails_before_the_model_loads(chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "lmforge.cli", "serve", str(chat_model), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"127.0.0.1:{port} is in use" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert time.time() - started < 60


def test_a_failure_inside_the_server_is_a_500_in_openais_shape(server, monkeypatch):
    engine, url = server

    def broken(request):
        raise RuntimeError("something lmforge did not expect")

    monkeypatch.setattr(engine, "plan", broken)
    status, body = _get(url + "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "x"}).encode())
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "something lmforge did not expect" in body["error"]["message"]
    monkeypatch.undo()
    assert _get(url + "/health")[0] == 200  # and it serves on
