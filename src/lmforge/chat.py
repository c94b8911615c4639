"""`lmforge chat MODEL`: talk to a model in the terminal, multi-turn, the reply streamed as it is sampled.

Every turn is rendered with the model's own chat template (the one training saved with it), so what
the model sees is what it was tuned on; the sampling is `lmforge generate`'s (eval/generate.py).
Commands typed as a turn: `/reset` forgets the conversation, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.generation.engine import Request, generate_many
from lmforge.generation.limits import LimitError, Limits
from lmforge.generation.prompt import prompt_ids

HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply"


def chat_loop(model_dir: Path, ask: Callable[[str], str | None], write: Callable[[str], None], system: str | None = None,
              max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> list[dict]:
    """Turns until `ask` returns None or /exit; returns the conversation (the last one, after any /reset).
    Ctrl-C during a reply stops it (what was said so far stays in the conversation); at the prompt it leaves."""
    from lmforge.models.factory import load_model
    from lmforge.stage_inputs import model_tokenizer

    tokenizer = model_tokenizer(model_dir, None)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template (was the model instruction-tuned?); "
                         "`lmforge generate` continues plain text")
    model = load_model(model_dir, "causal_lm")
    limits = Limits.of(model, max_new_tokens)
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
        ids = prompt_ids(tokenizer, tokenizer.apply_chat_template(messages + [{"role": "user", "content": text}],
                                                                  tokenize=False, add_generation_prompt=True))
        try:
            budget = limits.budget(len(ids), None)
        except LimitError:
            write(f"(the conversation is {len(ids)} tokens, the model's whole context of {limits.context}: "
                  "/reset to start over)\n")
            continue
        messages.append({"role": "user", "content": text})
        write("model> ")
        request = Request(ids, budget, temperature, None, top_p, seed + turn, on_text=write)
        try:
            generate_many(model, tokenizer, [request])
            write("\n")
        except KeyboardInterrupt:  # the reply stops; the chat goes on
            write(" [stopped]\n")
        messages.append({"role": "assistant", "content": request.text.strip()})
        turn += 1
