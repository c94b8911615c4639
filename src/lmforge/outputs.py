"""Output folders: lmforge replaces only what it wrote, one process writes a run folder at a time.

Every folder lmforge writes carries its own mark (a prepared corpus its manifest, a model or
tokenizer its stage stamp, a checkpoint its state.json); `ensure_replaceable` refuses to replace
anything else, so a mistyped `-o` never deletes a user's files. `replace_dir` swaps a finished
temporary folder into place; `RunLock` keeps a second process out of a run folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path


class OutputError(ValueError):
    """An output path lmforge will not write to; the message names it and says what to do."""


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def ensure_replaceable(path: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace `path` unless it is absent, an empty folder, or a `what` lmforge wrote."""
    if not path.exists() or _is_empty_dir(path) or (path.is_dir() and is_ours(path)):
        return
    kind = "a file" if not path.is_dir() else "a folder lmforge did not write"
    raise OutputError(f"{path}: exists and is {kind} (not {what}); lmforge replaces only its own outputs. "
                      "Choose another output path, or move it away yourself")


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside `path` for writing it whole before it is renamed into place."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


WRITTEN = ".lmforge-written"  # in every folder `replace_dir` puts in place: the names lmforge wrote there

# What lmforge wrote in a folder from before the record above: files of these names are replaced, any
# other entry is the user's and kept.
_LEGACY_OURS = ("*.safetensors", "*.bin", "*.docs", "*.gguf", "*.pt", "*.json", "*.jinja", "merges.txt", "vocab.txt",
                "spiece.model", "tokenizer.model", "Modelfile", "base", "quantized", "tensorboard")


def _written_by_us(folder: Path) -> Callable[[str], bool]:
    try:
        names = set(json.loads((folder / WRITTEN).read_text()))
        return lambda name: name in names or name == WRITTEN
    except (OSError, ValueError, TypeError):
        import fnmatch

        return lambda name: name == WRITTEN or any(fnmatch.fnmatch(name, p) for p in _LEGACY_OURS)


def _carry_user_entries(old: Path, new: Path) -> list[str]:
    """Move what the user added to `old` (a folder lmforge wrote before) into `new`: lmforge replaces
    only its own files. A user's file whose name lmforge now writes too is kept as NAME.user."""
    ours = _written_by_us(old)
    kept = []
    for entry in sorted(old.iterdir()):
        if ours(entry.name):
            continue
        target = new / entry.name
        while target.exists():
            target = target.with_name(target.name + ".user")
        os.replace(entry, target)
        kept.append(target.name)
    return kept


def replace_dir(tmp: Path, out: Path, log: Callable[[str], None] = print) -> list[str]:
    """Put the finished folder `tmp` at `out`; an old `out` (already checked replaceable) is renamed
    aside first and removed only once the new one is in place, so `out` is never half one, half the other.
    Entries of the old folder that lmforge did not write (a user's NOTES.txt) move into the new one, and
    are named in the log; their names are returned."""
    (tmp / WRITTEN).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    old = None
    if out.exists():
        old = temporary_sibling(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    kept: list[str] = []
    if old is not None:
        kept = _carry_user_entries(old, out)
        shutil.rmtree(old, ignore_errors=True)
    if kept:
        log(f"{out}: replaced what lmforge wrote there; kept {', '.join(kept)} (not lmforge's)")
    return kept


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporaries_of(path: Path) -> list[str]:
    """The name prefixes of the temporary folders lmforge writes beside `path` (see `temporary_sibling`)."""
    return [f".{path.name}.tmp-", f".{path.name}.old-"]


def remove_stale_temporaries(folder: Path, prefixes: list[str], log: Callable[[str], None] = print) -> list[Path]:
    """Remove the temporary folders (PREFIX...-PID) that killed lmforge processes left in `folder`;
    those of live processes stay, and nothing else is touched."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        pid = entry.name.rsplit("-", 1)[-1] if prefix else ""  # the writer's pid ends the name
        if not (entry.is_dir() and pid.isdigit()) or (int(pid) != os.getpid() and pid_alive(int(pid))):
            continue
        home = folder / entry.name[1:].rsplit(".", 1)[0]  # .NAME.old-PID was NAME
        if prefix.endswith(".old-") and home.is_dir():  # killed between the swap and the move of the user's files
            kept = _carry_user_entries(entry, home)
            if kept:
                log(f"cleanup: moved {', '.join(kept)} back into {home} (a user's files, set aside by an interrupted run)")
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        log(f"cleanup: removed {len(removed)} temporary folder(s) left by an interrupted run in {folder}: "
            + ", ".join(p.name for p in removed))
    return removed


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """An advisory lock on a run folder (`.lmforge.lock`, holding the holder's pid and host).

    The kernel drops the lock when its process dies, so a lock file left by a dead process is simply
    taken over (and said so); a live holder makes the second process stop with its pid and host.
    A run that never started (`keep` still False at release) removes the file again: it wrote nothing.
    """

    NAME = ".lmforge.lock"

    def __init__(self, folder: Path, log: Callable[[str], None] = print):
        self.path = Path(folder) / self.NAME
        self.log = log
        self.keep = False
        self._handle = None
        self._created_folder = False

    def __enter__(self) -> RunLock:
        self._created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 (held for the lock's lifetime)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.path.parent}: in use by {holder}; one lmforge process per output "
                                      "folder (wait for it to finish, or choose another output_dir)") from None
                raise
            try:  # the holder before us may have removed the file while we opened it: lock the one in place
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        self.keep = existed
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            self.log(f"lock: taking over the stale lock of {_holder(previous)} (that process is gone) on {self.path.parent}")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            if self.keep:
                self._handle.seek(0)
                self._handle.truncate()  # an empty lock file: released cleanly, nothing to take over
                self._handle.flush()
            else:
                self.path.unlink()
                if self._created_folder:
                    self.path.parent.rmdir()  # only if still empty
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


# ---------------------------------------------------------------- stage stamps
STAMP = "lmforge_stage.json"  # in every tokenizer and model folder lmforge writes: its key, and that it is ours


def has_stamp(directory: Path) -> bool:
    return (Path(directory) / STAMP).is_file()


def read_stamp(directory: Path) -> dict:
    try:
        stamp = json.loads((Path(directory) / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def stamp_matches(directory: Path, key: str) -> bool:
    return read_stamp(directory).get("key") == key


def trained_with(model_dir: Path) -> dict:
    """The data settings a model lmforge trained was trained with (its stamp's `data`), or {}."""
    data = read_stamp(model_dir).get("data")
    return data if isinstance(data, dict) else {}


def write_stamp(directory: Path, key: str | None, **info) -> None:
    (Path(directory) / STAMP).write_text(json.dumps({"key": key, **info}, indent=1))


# ---------------------------------------------------------------- run folders
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


RECIPE_DUMP = "recipe.yaml"  # the resolved recipe a run writes in its folder
RECIPE_DUMP_ASIDE = "recipe.lmforge.yaml"  # where it goes when recipe.yaml there is the user's own
RECIPE_DUMP_HEADER = "# lmforge: the resolved recipe of this run (written by lmforge at its start; edit a copy)\n"


def _dumped_recipe(path: Path) -> bool:
    """A recipe dump lmforge wrote: marked by its first line, or (before the mark) YAML exactly as
    lmforge dumps it, every section present. A user's recipe.yaml is neither, and is never overwritten."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(RECIPE_DUMP_HEADER):
        return True
    try:
        import yaml

        recipe = yaml.safe_load(text)
    except Exception:  # not YAML: not ours
        return False
    sections = {"output_dir", "seed", "tokenizer", "model", "data", "packing", "objective", "method", "trainer"}
    return isinstance(recipe, dict) and sections <= recipe.keys() and yaml.safe_dump(recipe, sort_keys=False) == text


def recipe_dump_path(folder: Path) -> Path:
    """Where a run in `folder` writes its resolved recipe: recipe.yaml, unless a recipe.yaml there is not
    lmforge's (`output_dir: .` beside the user's own recipe.yaml), then recipe.lmforge.yaml."""
    path = folder / RECIPE_DUMP
    return path if not path.exists() or _dumped_recipe(path) else folder / RECIPE_DUMP_ASIDE


def run_recipe_file(folder: Path) -> Path | None:
    """The resolved recipe of the run in `folder` (for the board and the report), or None."""
    for name in (RECIPE_DUMP_ASIDE, RECIPE_DUMP):
        if (folder / name).is_file():
            return folder / name
    return None


def is_metrics_log(path: Path) -> bool:
    """A metrics.jsonl lmforge wrote (its records carry a split), or an empty one."""
    try:
        with open(path) as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return not first.strip() or "split" in json.loads(first)
    except ValueError:
        return False


# What a run writes at the top of its output_dir, and how each is recognised as lmforge's.
def _summary(path: Path) -> bool:
    summary = _json(path)
    return isinstance(summary, dict) and "model_dir" in summary


MANIFEST = "manifest.json"  # a prepared corpus's record (data/prepare.py writes it)


def is_prepared_corpus(directory: Path) -> bool:
    """A folder lmforge prepared (its manifest says so; manifests before the `writer` field have its keys)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (manifest.get("writer") == "lmforge"
                                           or {"fingerprint", "tokenizer_fingerprint", "splits"} <= manifest.keys())


RUN_FILES: dict[str, Callable[[Path], bool]] = {
    RECIPE_DUMP_ASIDE: _dumped_recipe,
    "metrics.jsonl": is_metrics_log,
    "summary.json": _summary,
    "tensorboard": lambda p: p.is_dir() and all(f.name.startswith("events.out.tfevents") for f in p.iterdir()),
    "final": has_stamp,
    "tokenizer": has_stamp,
    "data": is_prepared_corpus,
    "checkpoints": lambda p: p.is_dir() and all(f.name.startswith(("step_", ".tmp-step_")) for f in p.iterdir()),
}


# Everything one training run writes at the top of its output_dir (the tokenizer and data it prepared
# are inputs, kept; `start`, the merged parent an adapter stage records, is written before training).
PREVIOUS_RUN = (RECIPE_DUMP_ASIDE, RECIPE_DUMP, "metrics.jsonl", "summary.json", "status.json", "train.log", "tensorboard",
                "final", "quantized", "checkpoints", "check.txt", "eval.json")


def move_run_aside(folder: Path) -> Path | None:
    """--force on a folder holding a run: every file of that run (only what lmforge wrote) moves together
    into FOLDER/replaced-TIMESTAMP/, so the folder never pairs the old final/ with the new recipe."""
    checks = {**RUN_FILES, RECIPE_DUMP: _dumped_recipe}
    present = [name for name in PREVIOUS_RUN if (folder / name).exists() and checks.get(name, lambda p: True)(folder / name)]
    if not present:
        return None
    target = folder / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while target.exists():
        target = folder / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    target.mkdir()
    for name in present:
        os.replace(folder / name, target / name)
    return target


def ensure_run_folder(folder: Path) -> None:
    """Refuse an output_dir holding a file or folder of a name a run writes that lmforge did not write:
    the run would overwrite it. A folder with lmforge's lock file is a run folder already."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output_dir: {folder} exists and is a file")
    if not folder.is_dir() or (folder / RunLock.NAME).exists():
        return
    clashes = [name for name, ours in RUN_FILES.items() if (folder / name).exists() and not ours(folder / name)]
    if clashes:
        raise OutputError(f"output_dir: {folder} holds {', '.join(clashes)}, not written by lmforge; a run would "
                          "overwrite them. Choose another output_dir, or move them away yourself")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as the Rust libraries (safetensors, tokenizers) report it: in their message."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(m in text for m in _TORCH_WRITE_FAILED):
        return True  # torch.save reports a full disk only as its zip writer's failure
    return "code: 28" in text or "StorageFull" in text or "No space left on device" in text


_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def content_hash(obj) -> str:
    """A short, stable hash of JSON-able settings: the key of every "is this output up to date" question
    (train keys, tokenizer stamps, a stage's evaluation)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_disk_full(exc: BaseException, path: Path | str) -> None:
    """Raise ENOSPC as an OSError naming `path` when a Rust library (safetensors) reported it as its own
    error, so every full disk reaches the user as the same one line; otherwise return."""
    if is_disk_full(exc) and not isinstance(exc, OSError):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
