"""`lmforge serve MODEL_DIR [--host] [--port]`: the model behind an OpenAI-compatible HTTP API
(serve/app.py), run by uvicorn. It listens on localhost unless `--host` says otherwise, and takes its
port before the model loads, so a busy port fails at once."""

from __future__ import annotations

import errno
import socket
from pathlib import Path


class PortBusy(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortBusy(errno.EADDRINUSE, f"{host}:{port} is in use by another program; choose another --port") from None
        raise
    return sock


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          max_tokens: int = 256, say=print, max_batch: int = 32, max_queue: int = 64, threads: int | None = None) -> None:
    import uvicorn

    from lmforge.serve.app import Engine, build_app

    sock = bind(host, port)
    engine = Engine(model_dir, name, max_tokens, max_batch, max_queue, threads, say)
    say(f"serve: {engine.model_dir} as model '{engine.name}' on http://{host}:{port}/v1 "
        f"(OpenAI-compatible; GET /health, /v1/models; POST /v1/chat/completions, /v1/completions); "
        f"up to {max_batch} requests decoded together, {max_queue} more waiting")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"serve: listening on {host}: reachable from other machines, with no authentication")
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        engine.worker.close()
