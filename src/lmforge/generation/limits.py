"""The bounds every generation request obeys, in `serve`, `chat` and `generate` alike: a request that
asks for more is refused with the field it got wrong, before any work (20,000 stop strings would
otherwise be searched after every token; a seed past 64 bits crashes the random generator)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP_STRINGS = 16  # OpenAI's API takes 4; other servers more
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
DEFAULT_CONTEXT = 4096  # for a model whose config states no context length


class LimitError(ValueError):
    """A request over a bound; `field` names the request's key."""

    def __init__(self, field: str, message: str, code: str = "invalid_request"):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.code = field, f"{field}: {message}", code


@dataclass(frozen=True)
class Limits:
    context: int  # the model's positions: prompt + answer
    default_max_tokens: int = 256

    @classmethod
    def of(cls, model, default_max_tokens: int = 256) -> Limits:
        return cls(getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT, default_max_tokens)

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The answer's token budget: `max_tokens` if the context holds it, the default (cut to what the
        context leaves) if none was asked; a prompt that fills the context is refused."""
        if prompt_tokens >= self.context:
            raise LimitError("prompt", f"{prompt_tokens} tokens; this model's context is {self.context} tokens",
                             "context_length_exceeded")
        if max_tokens is not None:
            if max_tokens < 1:
                raise LimitError("max_tokens", "must be at least 1")
            if prompt_tokens + max_tokens > self.context:
                raise LimitError("max_tokens", f"this model's context is {self.context} tokens; the prompt has "
                                 f"{prompt_tokens} and max_tokens asks {max_tokens} more", "context_length_exceeded")
            return max_tokens
        return min(self.default_max_tokens, self.context - prompt_tokens)


def check_stops(stops: list[str]) -> tuple[str, ...]:
    """The stop strings, empty ones dropped (an empty stop string would end every answer at once)."""
    if len(stops) > MAX_STOP_STRINGS:
        raise LimitError("stop", f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS}")
    long = [s for s in stops if len(s) > MAX_STOP_CHARS]
    if long:
        raise LimitError("stop", f"a stop string of {len(long[0])} characters; at most {MAX_STOP_CHARS}")
    return tuple(s for s in stops if s)


def check_seed(seed: int | None) -> int:
    if seed is None:
        return 0
    if not 0 <= seed <= MAX_SEED:
        raise LimitError("seed", f"{seed} is outside 0 ... 2^63 - 1")
    return seed
