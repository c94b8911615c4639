"""`lmforge chat MODEL`: talk to a model in the terminal, multi-turn, the reply streamed as it is sampled.

Every turn is rendered with the model's own chat template (the one training saved with it), so what
the model sees is what it was tuned on; the sampling is `lmforge generate`'s (eval/generate.py).
Commands typed as a turn: `/reset` forgets the conversation, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import TextStreamer

from lmforge.eval.generate import generate_text

HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves"


class _Streamer(TextStreamer):
    """transformers' streamer, writing through `write` instead of print (a test or a server can listen)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text + ("\n" if stream_end else ""))


def chat_loop(model_dir: Path, ask: Callable[[str], str | None], write: Callable[[str], None], system: str | None = None,
              max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> list[dict]:
    """Turns until `ask` returns None or /exit; returns the conversation (the last one, after any /reset)."""
    from lmforge.models.factory import load_model
    from lmforge.pipeline import model_tokenizer

    tokenizer = model_tokenizer(model_dir, None)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template (was the model instruction-tuned?); "
                         "`lmforge generate` continues plain text")
    model = load_model(model_dir, "causal_lm")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(f"chat: {model_dir} ({HELP})\n")
    turn = 0
    while True:
        text = ask("you> ")
        if text is None or text.strip() == "/exit":
            return messages
        if text.strip() == "/reset":
            messages = list(start)
            write("(conversation forgotten)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        write("model> ")
        reply = generate_text(model, tokenizer, prompt, max_new_tokens, temperature, None, top_p, seed + turn,
                              streamer=_Streamer(tokenizer, write))
        messages.append({"role": "assistant", "content": reply.strip()})
        turn += 1
