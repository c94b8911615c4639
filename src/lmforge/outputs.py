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


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`; an old `out` (already checked replaceable) is renamed
    aside first and removed only once the new one is in place, so `out` is never half one, half the other."""
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def move_aside(path: Path) -> Path:
    """Rename `path` to `PATH.replaced-TIMESTAMP` (never deleted): `--force` keeps what it displaces."""
    target = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, target)
    return target


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


def write_stamp(directory: Path, key: str | None, **info) -> None:
    (Path(directory) / STAMP).write_text(json.dumps({"key": key, **info}, indent=1))


# ---------------------------------------------------------------- run folders
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dumped_recipe(path: Path) -> bool:
    try:
        import yaml

        recipe = yaml.safe_load(path.read_text())
    except Exception:  # unreadable, or not YAML: not ours
        return False
    return isinstance(recipe, dict) and {"output_dir", "trainer", "model"} <= recipe.keys()


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


def _prepared_corpus(path: Path) -> bool:
    from lmforge.data.prepare import is_prepared_corpus  # data imports outputs: imported when used

    return is_prepared_corpus(path)


RUN_FILES: dict[str, Callable[[Path], bool]] = {
    "recipe.yaml": _dumped_recipe,
    "metrics.jsonl": is_metrics_log,
    "summary.json": _summary,
    "tensorboard": lambda p: p.is_dir() and all(f.name.startswith("events.out.tfevents") for f in p.iterdir()),
    "final": has_stamp,
    "tokenizer": has_stamp,
    "data": _prepared_corpus,
    "checkpoints": lambda p: p.is_dir() and all(f.name.startswith(("step_", ".tmp-step_")) for f in p.iterdir()),
}


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
    return "code: 28" in text or "StorageFull" in text or "No space left on device" in text


def content_hash(obj) -> str:
    """A short, stable hash of JSON-able settings: the key of every "is this output up to date" question
    (train keys, tokenizer stamps, a stage's evaluation)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_disk_full(exc: BaseException, path: Path | str) -> None:
    """Raise ENOSPC as an OSError naming `path` when a Rust library (safetensors) reported it as its own
    error, so every full disk reaches the user as the same one line; otherwise return."""
    if is_disk_full(exc) and not isinstance(exc, OSError):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
