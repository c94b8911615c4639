"""Data presets (`data.preset`) and the dataset registry (`data.dataset`): the column names of the
common layouts, and names for the user's own data sets, so a recipe says what its data is in one word.

A preset fills the data section's column keys (a key the recipe sets itself wins):

    alpaca       instructions  {"instruction", "input", "output"} (an empty input is left out)
    sharegpt     instructions  {"conversations": [{"from": "human" | "gpt" | "system" | "tool", "value"}]}
    messages     instructions  {"messages": [{"role", "content"}]} (OpenAI / HF chat; tool turns kept)
    text         plain text    {"text"} (pretraining: clm, mlm, prefix_lm, span, distill)
    labelled     labelled      {"text", "label"} (classify)
    pairs        text pairs    {"anchor", "positive"} (contrastive; sentence-transformers' names)
    preferences  preferences   {"prompt", "chosen", "rejected"} (dpo, simpo, orpo, reward; TRL's names)

(`data.format` stays the file format, auto-detected: a preset's rows may be JSONL, CSV or Parquet.)

The registry is a YAML file mapping names to data sections: `data.registry` names it, else
$LMFORGE_DATASETS, else ./datasets.yaml. Its paths are relative to the registry file.

    my_support_chats:
      files: [chats/train.jsonl]       # train_files
      val_files: [chats/test.jsonl]
      preset: sharegpt

A recipe's `data.dataset: my_support_chats` takes that entry; the recipe's own data keys win.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

# preset -> (the data kind it holds, as objectives name theirs; the data keys it sets)
PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    "alpaca": ("instructions", {"prompt_template": "{instruction}\n\n{input}", "response_column": "output"}),
    "sharegpt": ("instructions", {"messages_column": "conversations"}),
    "messages": ("instructions", {"messages_column": "messages"}),
    "text": ("packed", {"column": "text"}),
    "labelled": ("labeled", {"column": "text", "label_column": "label"}),
    "pairs": ("pairs", {"column": "anchor", "pair_column": "positive"}),
    "preferences": ("preferences", {"prompt_template": "{prompt}", "chosen_column": "chosen",
                                    "rejected_column": "rejected"}),
}
KIND_WORDS = {"instructions": "conversations (sft)", "packed": "plain text (pretraining objectives)",
              "labeled": "labelled texts (classify)", "pairs": "text pairs (contrastive)",
              "preferences": "preference pairs (dpo, simpo, orpo, reward)", "sentence_pairs": "plain text (mlm with a sentence task)"}
PATH_KEYS = ("train_files", "val_files", "prepared_dir")


class RegistryError(ValueError):
    """A dataset name or registry file that cannot be used; the message names the file and entry."""


def registry_path(data: dict) -> Path:
    return Path(data.get("registry") or os.environ.get("LMFORGE_DATASETS") or "datasets.yaml")


def _read_registry(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise RegistryError(f"{path}: no dataset registry here (data.registry, $LMFORGE_DATASETS or ./datasets.yaml "
                            "names it)")
    try:
        entries = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RegistryError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise RegistryError(f"{path}: a registry maps each dataset name to its data keys (files:, preset:, ...)")
    return entries


def _absolute(value: Any, base: Path) -> Any:
    """A registry's paths are relative to the registry file; `hf:` names and globs' roots alike."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str) and not value.startswith("hf:") and not Path(value).is_absolute():
        return str(base / value)
    return value


def resolve_data_section(data: dict, source: str) -> dict:
    """The data section with its registry entry (data.dataset) and then its preset (data.preset) filled
    in under the keys it sets itself. Idempotent: a resolved section resolves to itself."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    name = out.get("dataset")
    if name:
        path = registry_path(out)
        entries = _read_registry(path)
        if name not in entries:
            close = difflib.get_close_matches(str(name), list(entries), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RegistryError(f"{source}: data.dataset '{name}' is not in {path}{hint} "
                                f"(known: {', '.join(entries) or 'none'})")
        entry = dict(entries[name])
        entry.pop("description", None)
        if "files" in entry:
            entry["train_files"] = entry.pop("files")
        for key in PATH_KEYS:
            if key in entry:
                entry[key] = _absolute(entry[key], path.parent)
        for key in ("dataset", "registry"):
            if key in entry:
                raise RegistryError(f"{path}: {name}.{key}: an entry cannot name another dataset")
        for key, value in entry.items():
            out.setdefault(key, value)
    preset = out.get("preset")
    if preset:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RegistryError(f"{source}: data.preset '{preset}' is unknown{hint} (known: {', '.join(PRESETS)})")
        for key, value in PRESETS[preset][1].items():
            out.setdefault(key, value)
    return out


def check_preset_fits(preset: str | None, kind: str, objective: str, source: str) -> None:
    """A preset's data is what the objective reads, or the recipe is refused before anything runs."""
    if not preset:
        return
    holds = PRESETS[preset][0]
    fits = holds == kind or (holds == "packed" and kind == "sentence_pairs")
    if not fits:
        raise RegistryError(f"{source}: data.preset '{preset}' holds {KIND_WORDS[holds]}, but objective '{objective}' "
                            f"reads {KIND_WORDS.get(kind, kind)}")
