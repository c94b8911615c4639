"""What the OpenAI API sends and answers: the request bodies lmforge accepts, and the error shape every
non-2xx answer has (`{"error": {"message", "type", "param", "code"}}`, which the openai client reads)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_overloaded", 500: "server_error"}


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text parts, joined
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send more (user, metadata, ...): what changes no answer is ignored
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's extension (openai client: extra_body): answer max_tokens tokens, EOS or not

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        """Options that would change the answer and that lmforge does not compute are refused, not ignored."""
        if self.logprobs not in (None, False, 0) or getattr(self, "top_logprobs", None):
            raise APIError(400, "logprobs: not supported by lmforge serve", "unsupported_parameter", "logprobs")
        for key in ("tools", "functions", "response_format", "logit_bias", "echo", "best_of", "suffix"):
            value = getattr(self, key, None)
            if value not in (None, False, [], {}, 1) and not (key == "response_format" and value == {"type": "text"}):
                raise APIError(400, f"{key}: not supported by lmforge serve", "unsupported_parameter", key)


class ChatRequest(_Sampling):
    messages: list[Message]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
