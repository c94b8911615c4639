"""An OpenAI-compatible HTTP API over one model folder, on FastAPI.

Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` and
`POST /v1/completions`, both with `stream: true` (server-sent events, as OpenAI's clients expect) or not.
A chat is rendered with the model's own chat template (the one training saved with it); generation stops
at the tokenizer's EOS, at the request's `stop` strings, or at `max_tokens`.

Every handler is asynchronous and none computes: the model belongs to one worker thread
(serve/worker.py) that decodes all requests in flight as one batch (continuous batching), so concurrent
clients share each step and `/health` answers while it generates. A full server answers 503 at once;
every limit a request can push is bounded (generation/limits.py); every error, a 500 included, has
OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.generation.engine import Request as Generation
from lmforge.generation.limits import LimitError, Limits, check_seed, check_stops
from lmforge.serve.schema import APIError, ChatRequest, CompletionRequest, error_response
from lmforge.serve.worker import Worker

MAX_BODY_BYTES = 8 * 2**20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class Engine:
    """The served model: its tokenizer, its limits, and the worker that owns it."""

    def __init__(self, model_dir: Path, name: str | None = None, default_max_tokens: int = 256, max_batch: int = 32,
                 max_queue: int = 64, threads: int | None = None, log=None):
        from lmforge.models.factory import load_model
        from lmforge.stage_inputs import model_tokenizer

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.absolute().name
        self.tokenizer = model_tokenizer(self.model_dir, None)
        self.model = load_model(self.model_dir, "causal_lm")
        self.model.eval()
        self.limits = Limits.of(self.model, default_max_tokens)
        self.context = self.limits.context
        self.created = int(time.time())
        self.worker = Worker(self.model, self.tokenizer, max_batch, max_queue, threads, log)

    def prompt_of(self, request: ChatRequest | CompletionRequest) -> list[int]:
        from lmforge.generation.prompt import prompt_ids

        if isinstance(request, CompletionRequest):
            prompt = request.prompt
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return self._token_ids(prompt)
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if len(prompts) != 1:
                raise APIError(400, "prompt: give one prompt per request", "invalid_prompt", "prompt")
            if isinstance(prompts[0], list):
                return self._token_ids(prompts[0])
            return prompt_ids(self.tokenizer, prompts[0])
        if not request.messages:
            raise APIError(400, "messages: empty; give at least one message", "invalid_messages", "messages")
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise APIError(400, f"messages[{i}].role: '{message.role}' is not one of {', '.join(CHAT_ROLES)}",
                               "invalid_messages", f"messages.{i}.role")
            if message.role in ("user", "system", "developer") and message.content is None:
                raise APIError(400, f"messages[{i}].content: a {message.role} message needs content",
                               "invalid_messages", f"messages.{i}.content")
        if not self.tokenizer.chat_template:
            raise APIError(400, f"model {self.name} has no chat template (it was not instruction-tuned); "
                           "use /v1/completions", "no_chat_template", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles out of order, ...)
            raise APIError(400, f"messages: the model's chat template refuses them ({exc})", "invalid_messages",
                           "messages") from None
        return prompt_ids(self.tokenizer, text)

    def _token_ids(self, ids: list[int]) -> list[int]:
        size = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < size]
        if bad or not ids:
            raise APIError(400, f"prompt: token ids must be 0 ... {size - 1}" + (f" (got {bad[0]})" if bad else ""),
                           "invalid_prompt", "prompt")
        return list(ids)

    def plan(self, request: ChatRequest | CompletionRequest) -> Generation:
        """The request as the engine runs it, every bound checked."""
        if request.model != self.name:
            raise APIError(404, f"model '{request.model}' does not exist; this server serves '{self.name}'",
                           "model_not_found", "model")
        request.refuse_unsupported()
        try:
            stops = check_stops(request.stops())
            seed = check_seed(request.seed)
            ids = self.prompt_of(request)
            budget = self.limits.budget(len(ids), request.wanted_tokens())
        except LimitError as exc:
            raise APIError(400, exc.message, exc.code, exc.field) from None
        return Generation(ids, budget, request.temperature, None, request.top_p, seed, stops, request.ignore_eos)


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title=f"lmforge serve: {engine.name}", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def _bounded_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body: {int(length):,} bytes; at most {MAX_BODY_BYTES:,}",
                                  "request_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else str(first["msg"]), "invalid_request",
                              where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such route (see /v1/models, /v1/chat/completions)"
        elif exc.status_code == 400 and "pars" in str(exc.detail):
            message = "request body: not valid JSON (or nested too deeply)"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, "not_found" if exc.status_code == 404 else "invalid_request",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__}: {exc}); a bug in lmforge serve",
                              "internal_error")

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "lmforge"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, **engine.worker.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != engine.name:
            raise APIError(404, f"model '{model_id}' does not exist; this server serves '{engine.name}'",
                           "model_not_found", "model")
        return model_card()

    async def respond(http: Request, request: ChatRequest | CompletionRequest, chat: bool):
        generation = await asyncio.to_thread(engine.plan, request)  # tokenizing a long prompt off the event loop
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _stream(engine, generation, ident, chat, include_usage)
            await events.__anext__()  # submits (or raises 503) before the response starts
            return StreamingResponse(events, media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        generation.on_done = lambda: loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
        _submit(engine, generation)
        try:
            while not finished.done():
                await asyncio.wait({finished}, timeout=0.5)
                if not finished.done() and await http.is_disconnected():
                    generation.cancelled = True  # the client left: its slot goes to the next request
                    return JSONResponse({}, status_code=499)
        finally:
            if not generation.done.is_set():
                generation.cancelled = True
        _raise_failed(generation)
        choice: dict[str, Any] = {"index": 0, "finish_reason": generation.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": generation.text}
        else:
            choice["text"] = generation.text
        used = len(generation.new_ids)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": engine.name, "choices": [choice],
                "usage": {"prompt_tokens": len(generation.ids), "completion_tokens": used,
                          "total_tokens": len(generation.ids) + used}}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, request: ChatRequest):
        return await respond(http, request, chat=True)

    @app.post("/v1/completions")
    async def completions(http: Request, request: CompletionRequest):
        return await respond(http, request, chat=False)

    return app


def _submit(engine: Engine, generation: Generation) -> None:
    if not engine.worker.submit(generation):
        raise APIError(503, f"the server is full ({engine.worker.capacity} requests in flight); retry shortly",
                       "server_busy")


def _raise_failed(generation: Generation) -> None:
    if generation.finish_reason == "error":
        raise APIError(500, f"generation failed: {generation.error}", "generation_failed")


async def _stream(engine: Engine, generation: Generation, ident: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text as it is sampled, then the finish reason, the usage
    if asked, then [DONE]. The first `__anext__` only submits the request."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    generation.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    generation.on_done = lambda: loop.call_soon_threadsafe(pieces.put_nowait, None)
    _submit(engine, generation)
    yield ""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None = None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason}
        return _event({"id": ident, "object": kind, "created": created, "model": engine.name, "choices": [choice]})

    try:
        yield chunk(None, first=True)
        while (piece := await pieces.get()) is not None:
            yield chunk(piece)
        if generation.finish_reason == "error":
            yield _event({"error": {"message": f"generation failed: {generation.error}", "type": "server_error",
                                    "param": None, "code": "generation_failed"}})
        else:
            yield chunk(None, generation.finish_reason)
            if include_usage:
                used = len(generation.new_ids)
                yield _event({"id": ident, "object": kind, "created": created, "model": engine.name, "choices": [],
                              "usage": {"prompt_tokens": len(generation.ids), "completion_tokens": used,
                                        "total_tokens": len(generation.ids) + used}})
        yield _event("[DONE]")
    finally:
        if not generation.done.is_set():
            generation.cancelled = True  # the client went away mid-stream: its row leaves the batch
