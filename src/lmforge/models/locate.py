"""Where a model named by the user lives: a local folder, a GGUF file (or a folder holding one), or a
Hugging Face hub id (`org/name`, or `hf:org/name` to say so explicitly).

Every entry point that takes a model (a recipe's `model.path` / `tokenizer.path`, `lmforge eval -m`,
`predict`, `generate`, `chat`) resolves it here, so they all accept the same things. A hub id goes
through `huggingface_hub`'s own cache: online it downloads once (weights as safetensors only, no
code: `trust_remote_code` stays off unless a recipe asks for it); offline (`HF_HUB_OFFLINE=1`, or no
network) it uses what the cache holds and says what is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.models.factory import ModelError

HUB_PREFIX = "hf:"
# what the hub accepts as a repo id: one owner, one name (letters, digits, - _ .)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# what a model folder needs from the hub: config, weights (safetensors only), tokenizer, chat template
_WANTED = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def hub_id(spec: str) -> str | None:
    """The hub repo id `spec` names, or None for a local path. `hf:org/name` always is one; a bare
    `org/name` is one only where nothing local answers to it (no such path, and no folder `org` here:
    `runs/base`, a stage's output not trained yet, stays a local path)."""
    if spec.startswith(HUB_PREFIX):
        return spec[len(HUB_PREFIX):]
    if not _HUB_ID.match(spec) or spec.startswith("."):
        return None
    if Path(spec).exists() or Path(spec.split("/")[0]).exists():
        return None
    return spec


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` in huggingface_hub's cache (downloaded now if online)."""
    if not _HUB_ID.match(repo_id):
        raise ModelError(f"{HUB_PREFIX}{repo_id}: not a hub id (expected owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ModelError(f"{repo_id}: a hub id needs the `huggingface_hub` package (pip install huggingface_hub)") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_WANTED, local_files_only=_offline()))
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE=1)" if _offline() else "the hub cannot be reached"
        raise ModelError(f"{repo_id}: not in the Hugging Face cache and {where}; download it once online "
                         "(or give a local folder)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: "
                         "`huggingface-cli login`)") from None
    except Exception as exc:  # network errors, a bad revision: the message names the cause
        raise ModelError(f"{repo_id}: cannot fetch it from the Hugging Face hub ({type(exc).__name__}: {exc})") from None
    if not (folder / "config.json").is_file():
        raise ModelError(f"{repo_id}: the hub snapshot at {folder} has no config.json (not a transformers model)")
    return folder


def locate_model(spec: str | Path) -> Path:
    """A plain model folder for what the user named: the folder itself, a GGUF imported once
    (models/gguf.py), or a hub id's cached snapshot."""
    from lmforge.models.gguf import gguf_file, import_gguf

    text = str(spec)
    repo = hub_id(text)
    if repo is not None:
        return download_hub_model(repo)
    if gguf_file(text) is not None:
        return import_gguf(text)
    return Path(text)
