"""`lmforge chat`: in a real terminal (a pseudo-terminal, so Ctrl-C is the terminal's SIGINT), Ctrl-C stops a
reply and returns to the prompt with the conversation kept, as llama.cpp and ollama do; Ctrl-C at the
prompt, or Ctrl-D, leaves; no traceback either way. `--compare`: two models answer every turn, each its own
side of the conversation, as plain transformers would."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
import torch

posix_terminal = pytest.mark.skipif(sys.platform == "win32", reason="a POSIX pseudo-terminal")


@pytest.fixture(scope="module")
def endless_chat_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny chat model whose greedy answer never ends by itself: every special token's output row is zero,
    so its logit (0) loses to the largest of the others, and the context is long (the answer's budget)."""
    from lmforge.data.instructions import ensure_chat_template
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    ensure_chat_template(tok, None)
    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 16384), "causal_lm", tok)
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.all_special_ids] = 0.0
    out = tmp_path_factory.mktemp("endless")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class Terminal:
    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: lmforge, its terminal the pty
            os.execv(sys.executable, [sys.executable, "-m", "lmforge.cli", *argv])
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Everything up to and including the next `text` (the read goes on from after it)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} did not appear; the terminal showed:\n{self.seen}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the child has gone: its terminal is closed
                    chunk = ""
                assert chunk, f"lmforge ended before {text!r}; the terminal showed:\n{self.seen}"
                self.seen += chunk
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the child; its exit code and what it printed last."""
        deadline = time.monotonic() + timeout
        rest = self.seen
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                with contextlib.suppress(OSError):
                    rest += os.read(self.fd, 4096).decode("utf-8", "replace")
        else:
            os.kill(self.pid, 9)
            raise AssertionError(f"lmforge chat did not leave; it showed:\n{rest}")
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), rest


@posix_terminal
def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt_and_a_second_leaves(endless_chat_model):
    chat = Terminal(["chat", str(endless_chat_model), "--temperature", "0", "--max-new-tokens", "15000",
                     "--threads", "1"])
    shown = chat.read_until("you> ")
    assert "Ctrl-C stops a reply" in shown
    chat.type("Tell me a story.\n")
    chat.read_until("model> ")
    chat.read_until(" ", timeout=60)  # the reply is streaming
    chat.type("\x03")  # Ctrl-C, as the terminal sends it
    stopped = chat.read_until("you> ", timeout=30)
    assert "[stopped]" in stopped and "Traceback" not in stopped
    # the chat goes on: a second turn, also stopped
    chat.type("And another.\n")
    chat.read_until("model> ")
    chat.read_until(" ", timeout=60)
    chat.type("\x03")
    assert "[stopped]" in chat.read_until("you> ", timeout=30)
    chat.type("\x03")  # at the prompt: leave
    code, rest = chat.exit_code()
    assert code == 0 and "Traceback" not in rest, rest


@posix_terminal
def test_ctrl_d_at_the_prompt_leaves(endless_chat_model):
    chat = Terminal(["chat", str(endless_chat_model), "--threads", "1"])
    chat.read_until("you> ")
    chat.type("\x04")  # Ctrl-D: end of input
    code, rest = chat.exit_code()
    assert code == 0 and "Traceback" not in rest, rest


def _chat_model(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from lmforge.data.instructions import ensure_chat_template
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    ensure_chat_template(tok, None)
    torch.manual_seed(seed)
    build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 1024), "causal_lm", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_compare_sends_every_turn_to_both_models_each_with_its_own_side(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.chat import chat_loop

    before = _chat_model(tmp_path / "base" / "final", tokenizer_dir, seed=0)
    after = _chat_model(tmp_path / "sft" / "final", tokenizer_dir, seed=1)
    turns = iter(["Hello there.", "And then?", None])
    shown: list[str] = []
    conversations = chat_loop([before, after], lambda prompt: next(turns), shown.append, max_new_tokens=6,
                              temperature=0.0)
    text = "".join(shown)
    assert "[base/final]> " in text and "[sft/final]> " in text  # each reply under its model's name
    assert "--temperature 0" not in text  # greedy: no warning that chance differs
    for folder, messages in zip((before, after), conversations, strict=True):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        for end in (1, 3):  # each reply is this model's greedy answer to its own side of the conversation
            ids = tok.apply_chat_template(messages[:end], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == messages[end]["content"]
    assert conversations[0][1]["content"] != conversations[1][1]["content"]  # two models, two answers
    # sampling: the user is told that chance differs too
    shown.clear()
    turns = iter([None])
    chat_loop([before, after], lambda prompt: next(turns), shown.append, temperature=0.7)
    assert "--temperature 0 compares the models alone" in "".join(shown)
