"""`lmforge serve MODEL_DIR [--host] [--port]`: the model behind an OpenAI-compatible HTTP API
(serve/app.py), run by uvicorn. It listens on localhost unless `--host` says otherwise."""

from __future__ import annotations

from pathlib import Path


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          max_tokens: int = 256, say=print) -> None:
    import uvicorn

    from lmforge.serve.app import Engine, build_app

    engine = Engine(model_dir, name, max_tokens)
    say(f"serve: {engine.model_dir} as model '{engine.name}' on http://{host}:{port}/v1 "
        f"(OpenAI-compatible; GET /health, /v1/models; POST /v1/chat/completions, /v1/completions)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"serve: listening on {host}: reachable from other machines, with no authentication")
    uvicorn.run(build_app(engine), host=host, port=port, log_level="warning")
