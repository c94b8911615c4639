"""An OpenAI-compatible HTTP API over one model folder, on FastAPI.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`,
both with `stream: true` (server-sent events, as OpenAI's clients expect) or not. A chat is rendered
with the model's own chat template (the one training saved with it); generation stops at the
tokenizer's EOS (which ends an assistant turn in lmforge's templates and in ChatML), at the request's
`stop` strings, or at `max_tokens`. Sampling is lmforge's one sampler (eval/generate.py).

One model computes one request at a time: requests wait on a lock, in arrival order (a CPU gains
nothing from running two at once, and the model's sampling state is not shared). Bad requests get a
4xx with OpenAI's error body: an unknown model 404, empty messages or a prompt plus `max_tokens`
beyond the model's context 400.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text parts, joined
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send more (logprobs, user, ...); what we do not use is ignored
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class ChatRequest(_Sampling):
    messages: list[Message]


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Engine:
    """The loaded model and tokenizer, and the lock that queues requests."""

    def __init__(self, model_dir: Path, name: str | None = None, default_max_tokens: int = 256):
        from lmforge.models.factory import load_model
        from lmforge.pipeline import model_tokenizer

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.absolute().name
        self.tokenizer = model_tokenizer(self.model_dir, None)
        self.model = load_model(self.model_dir, "causal_lm")
        self.model.eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def prompt_of(self, request: ChatRequest | CompletionRequest) -> str:
        if isinstance(request, CompletionRequest):
            prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            if len(prompts) != 1:
                raise APIError(400, "prompt: give one prompt per request", "invalid_prompt", "prompt")
            return prompts[0]
        if not request.messages:
            raise APIError(400, "messages: empty; give at least one message", "invalid_messages", "messages")
        if not self.tokenizer.chat_template:
            raise APIError(400, f"model {self.name} has no chat template (it was not instruction-tuned); "
                           "use /v1/completions", "no_chat_template", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles out of order, ...)
            raise APIError(400, f"messages: the model's chat template refuses them ({exc})", "invalid_messages",
                           "messages") from None

    def plan(self, request: ChatRequest | CompletionRequest) -> tuple[list[int], int]:
        """The prompt's ids and the number of tokens to generate, checked against the context."""
        from lmforge.eval.generate import prompt_ids

        if request.model != self.name:
            raise APIError(404, f"model '{request.model}' does not exist; this server serves '{self.name}'",
                           "model_not_found", "model")
        ids = prompt_ids(self.tokenizer, self.prompt_of(request))
        wanted = request.max_completion_tokens or request.max_tokens
        if self.context and len(ids) + (wanted or 0) > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; the prompt has {len(ids)} and "
                           f"max_tokens asks {wanted or 0} more", "context_length_exceeded", "max_tokens")
        budget = wanted or self.default_max_tokens
        if self.context:
            budget = min(budget, self.context - len(ids))
        return ids, budget

    def generate(self, request, ids: list[int], budget: int, streamer=None) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens), the text cut before any stop string."""
        from lmforge.eval.generate import generate_ids

        new = generate_ids(self.model, self.tokenizer, ids, budget, request.temperature, None, request.top_p,
                           request.seed if request.seed is not None else 0, streamer, request.stops() or None)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        cut = cut_at_stop(text, request.stops())
        ended = bool(new) and new[-1] == self.tokenizer.eos_token_id
        reason = "stop" if ended or cut is not None else "length" if len(new) >= budget else "stop"
        return (text if cut is None else text[:cut]), reason, len(new)


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title=f"lmforge serve: {engine.name}", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{where}: {first['msg']}", "invalid_request", where or None)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "lmforge"}]}

    def respond(request, chat: bool):
        ids, budget = engine.plan(request)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        if request.stream:
            return StreamingResponse(_stream(engine, request, ids, budget, ident, chat), media_type="text/event-stream")
        with engine.lock:
            text, reason, used = engine.generate(request, ids, budget)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": ident, "object": kind, "created": int(time.time()), "model": engine.name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        return respond(request, chat=True)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        return respond(request, chat=False)

    return app


def _stream(engine: Engine, request, ids: list[int], budget: int, ident: str, chat: bool) -> Iterator[str]:
    """Server-sent events: a chunk per piece of text as it is sampled, then the finish reason, then [DONE].
    Text that could be the start of a stop string is held back until it is known not to be one."""
    from transformers import TextIteratorStreamer

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

    stops = request.stops()
    hold = max((len(s) for s in stops), default=1) - 1
    with engine.lock:
        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["out"] = engine.generate(request, ids, budget, streamer)
            except Exception as exc:  # reported in the stream, the server lives on
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield chunk(None, first=True)
        text, sent = "", 0
        for piece in streamer:
            text += piece
            cut = cut_at_stop(text, stops)
            end = cut if cut is not None else max(sent, len(text) - hold)
            if end > sent:
                yield chunk(text[sent:end])
                sent = end
            if cut is not None:
                break
        worker.join()
    if "error" in result:
        yield _event({"error": {"message": f"generation failed: {result['error']}", "type": "server_error"}})
        yield _event("[DONE]")
        return
    final, reason, _ = result["out"]
    if len(final) > sent:
        yield chunk(final[sent:])
    yield chunk(None, reason)
    yield _event("[DONE]")
