"""Training checkpoints: atomic, checksummed, the last K kept.

A checkpoint is a folder `step_NNNNNNNN/` with the model (safetensors), the optimizer state, the
RNG states, and `state.json` (step, data position, scheduler, counters, file checksums). It is
written under a temporary name and renamed into place, so a crash mid-write leaves the previous
checkpoints untouched; a checksum mismatch marks a checkpoint invalid and resuming falls back to
the newest valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from lmforge.outputs import as_disk_full

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


OBJECTIVE_FILE = "objective.safetensors"


def split_objective_state(states: list[dict]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every rank's objective state (rank order) as (rank 0's plain values, for state.json; every rank's
    tensors, keyed rank{r}.{name}, for objective.safetensors): an RL objective's rollout in use differs by rank."""
    plain = {k: v for k, v in states[0].items() if not isinstance(v, torch.Tensor)}
    tensors = {f"rank{r}.{k}": v.detach().cpu().contiguous() for r, state in enumerate(states)
               for k, v in state.items() if isinstance(v, torch.Tensor)}
    return plain, tensors


def objective_state(path: Path, plain: dict, rank: int) -> dict:
    """The objective state `split_objective_state` saved, for process `rank`."""
    file = path / OBJECTIVE_FILE
    if not file.is_file():
        return plain
    prefix = f"rank{rank}."
    tensors = load_file(str(file))
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if tensors and not mine:
        raise CheckpointError(f"{file}: holds no state for process {rank} (saved by fewer processes); resume with "
                              "as many processes as the run had")
    return {**plain, **mine}


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int, full_state: tuple[dict, dict] | None = None,
                    protect: tuple[Path, ...] = (), objective_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """`full_state`: (weights, optimizer state) gathered from sharded ranks (FSDP), written instead
    of the local model's and optimizer's; `protect`: checkpoints that rotation never removes (early
    stopping's best); `objective_tensors`: an objective's tensors (split_objective_state)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_weights(model, tmp / "model.safetensors", full_state[0] if full_state else None)
        if hasattr(model, "config") and hasattr(model.config, "to_json_file"):
            # with config.json the folder is also a `from_pretrained` directory (eval, generate)
            model.config.to_json_file(str(tmp / "config.json"))
        torch.save(full_state[1] if full_state else _optimizer_state(model, optimizer), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        names = ["model.safetensors", "optimizer.pt", "rng.pt"]
        if objective_tensors:
            save_file(objective_tensors, str(tmp / OBJECTIVE_FILE))
            names.append(OBJECTIVE_FILE)
        files = {name: _sha256(tmp / name) for name in names}
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "checksums": files}, indent=1))
        for name in [*files, "state.json"]:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        as_disk_full(exc, tmp)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        if old not in protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, as FSDP's gathered state is, so that a run
    resumes under any strategy (one process, DDP, FSDP) from any other's checkpoint; by position
    when some optimized parameter is not the model's (an objective's learned temperature)."""
    in_model = {id(p) for p in model.parameters()}
    if all(id(p) in in_model for group in optimizer.param_groups for p in group["params"]):
        return get_optimizer_state_dict(model, optimizer)
    return optimizer.state_dict()


def _load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if state["param_groups"] and state["param_groups"][0]["params"] and isinstance(state["param_groups"][0]["params"][0], str):
        set_optimizer_state_dict(model, optimizer, state)  # keyed by name
    else:
        optimizer.load_state_dict(state)


def _save_weights(model: torch.nn.Module, path: Path, weights: dict | None = None) -> None:
    """All weights; or, when part of the model is frozen (LoRA, freeze), only the trained ones: the
    frozen rest comes back from the base checkpoint, and a LoRA checkpoint stays megabytes, not gigabytes.
    `weights`: the whole state gathered from sharded ranks, in place of the model's own."""
    everything = all(p.requires_grad for p in model.parameters())
    if everything and weights is None:
        save_model(model, str(path))  # handles tied weights
        return
    if weights is None:
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    else:
        # each tied weight once, under the name `named_parameters` gives it (as `save_model` writes it)
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        if everything:
            keep |= {n for n, _ in model.named_buffers()}
        trained = {n: t.contiguous() for n, t in weights.items() if n in keep}
    save_file(trained, str(path), metadata=None if everything else {"lmforge": "trainable-only"})


def _load_weights(model: torch.nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """(missing, unexpected) names, as safetensors' `load_model` reports them."""
    with safe_open(str(path), "pt") as handle:
        partial = (handle.metadata() or {}).get("lmforge") == "trainable-only"
    if not partial:
        return load_model(model, str(path), strict=False)
    tensors = load_file(str(path))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    result = model.load_state_dict(tensors, strict=False)
    return sorted(trained - tensors.keys()), list(result.unexpected_keys)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of interrupted writes are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state, after checking that every file matches its recorded checksum."""
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    for name, expected in state.get("checksums", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted)")
    return state


def latest_valid_checkpoint(root: Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; invalid ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"checkpoint: skipping invalid {path.name}: {exc}")
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    load_full_state: Callable | None = None) -> None:
    """`load_full_state(model, optimizer, weights, optimizer_state)`: how a sharded model (FSDP) takes
    the whole saved state; otherwise the model and optimizer load it directly."""
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if load_full_state is not None:
        weights = load_file(str(path / "model.safetensors"))
        aliases: dict[int, list[str]] = {}  # a tied weight is saved under one of its names
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                aliases.setdefault(id(p), []).append(name)
        missing = [names[0] for names in aliases.values() if not any(n in weights for n in names)]
        if missing:
            raise CheckpointError(f"{path}: does not fit this model (missing {missing[:3]})")
        load_full_state(model, optimizer, weights, optimizer_state)
    else:
        try:
            missing, unexpected = _load_weights(model, path / "model.safetensors")
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not fit this model ({exc})") from None
        if unexpected or missing:
            raise CheckpointError(f"{path}: does not fit this model (missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]})")
        _load_optimizer_state(model, optimizer, optimizer_state)
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
