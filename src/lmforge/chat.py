"""`lmforge chat MODEL [--compare OTHER]`: talk to a model in the terminal, multi-turn, the reply streamed as
it is sampled; with `--compare`, every turn goes to both models and their replies are shown one under the
other (each model keeps its own side of the conversation), the way to see what a stage changed.

Every turn is rendered with the model's own chat template (the one training saved with it), so what
the model sees is what it was tuned on; the sampling is `lmforge generate`'s (generation/engine.py).
Commands typed as a turn: `/reset` forgets the conversation, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.generation.engine import Request, generate_many
from lmforge.generation.limits import LimitError, Limits
from lmforge.generation.prompt import prompt_ids

HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply"


@dataclass
class Speaker:
    """One model of the chat, with its side of the conversation."""

    folder: Path
    model: object
    tokenizer: object
    limits: Limits
    messages: list[dict] = field(default_factory=list)


def _speaker(folder: Path, max_new_tokens: int, start: list[dict]) -> Speaker:
    from lmforge.models.factory import load_model
    from lmforge.stage_inputs import model_tokenizer

    tokenizer = model_tokenizer(folder, None)
    if not tokenizer.chat_template:
        raise ValueError(f"{folder}: the tokenizer has no chat template (was the model instruction-tuned?); "
                         "`lmforge generate` continues plain text")
    model = load_model(folder, "causal_lm")
    return Speaker(folder, model, tokenizer, Limits.of(model, max_new_tokens), list(start))


def chat_loop(model_dirs: Path | list[Path], ask: Callable[[str], str | None], write: Callable[[str], None],
              system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
              seed: int = 0) -> list[list[dict]]:
    """Turns until `ask` returns None or /exit; returns each model's conversation (the last one, after any
    /reset). Ctrl-C during a reply stops it (what was said so far stays in the conversation; with several
    models, the ones that had not answered yet skip the turn); at the prompt it leaves."""
    folders = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    start = [{"role": "system", "content": system}] if system else []
    speakers = [_speaker(Path(folder), max_new_tokens, start) for folder in folders]
    labels = _labels(folders)
    compared = " compared with ".join(str(f) for f in folders)
    write(f"chat: {compared} ({HELP})\n")
    if len(speakers) > 1 and temperature > 0:
        write(f"(sampling at temperature {temperature}: the replies differ by chance too; --temperature 0 "
              "compares the models alone)\n")
    turn = 0
    while True:
        text = ask("you> ")
        if text is None or text.strip() == "/exit":
            return [s.messages for s in speakers]
        if text.strip() == "/reset":
            for speaker in speakers:
                speaker.messages = list(start)
            write("(conversation forgotten)\n")
            continue
        if not text.strip():
            continue
        for speaker, label in zip(speakers, labels, strict=True):
            if not _reply(speaker, label, text, write, temperature, top_p, seed + turn):
                break  # Ctrl-C: the turn ends here
        turn += 1


def _reply(speaker: Speaker, label: str, text: str, write: Callable[[str], None], temperature: float, top_p: float,
           seed: int) -> bool:
    """One model's answer to the user's `text`, streamed; False when Ctrl-C stopped it."""
    tokenizer = speaker.tokenizer
    ids = prompt_ids(tokenizer, tokenizer.apply_chat_template(speaker.messages + [{"role": "user", "content": text}],
                                                              tokenize=False, add_generation_prompt=True))
    try:
        budget = speaker.limits.budget(len(ids), None)
    except LimitError:
        write(f"(the conversation is {len(ids)} tokens, the whole context of {speaker.folder} "
              f"({speaker.limits.context}): /reset to start over)\n")
        return True
    speaker.messages.append({"role": "user", "content": text})
    write(label)
    request = Request(ids, budget, temperature, None, top_p, seed, on_text=write)
    stopped = False
    try:
        generate_many(speaker.model, tokenizer, [request])
        write("\n")
    except KeyboardInterrupt:  # the reply stops; the chat goes on
        write(" [stopped]\n")
        stopped = True
    speaker.messages.append({"role": "assistant", "content": request.text.strip()})
    return not stopped


def _labels(folders: list[Path]) -> list[str]:
    """`model> ` alone; with several models, each one's shortest distinct path ending (`sft/final> `)."""
    if len(folders) == 1:
        return ["model> "]
    parts = [Path(f).absolute().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return [f"[{name}]> " for name in names]
    return [f"[{i + 1}]> " for i in range(len(folders))]
