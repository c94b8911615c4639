"""Chat templates by name: `data.chat_template: chatml` (or `lmforge`) picks one of these; any other
value must be a Jinja template itself (it holds `{{` or `{%`), else the recipe is refused by name.
Imports nothing of lmforge: the recipe schema checks names against this table."""

from __future__ import annotations

LMFORGE = (  # newlines as expressions: HF's jinja trims the one after a block tag
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)

# ChatML as Qwen and SmolLM2 write it; a turn ends with <|im_end|>, which must be the tokenizer's EOS
# (generation stops at EOS)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMED = {"lmforge": LMFORGE, "chatml": CHATML}


def is_template_text(value: str) -> bool:
    return "{{" in value or "{%" in value


def name_problem(value: str) -> str | None:
    """Why `value` is neither a template's name nor a template, or None."""
    if value in NAMED or is_template_text(value):
        return None
    return (f"'{value}' is neither a named template ({', '.join(NAMED)}) nor a Jinja chat template "
            "(one holds {{ ... }} or {% ... %})")
