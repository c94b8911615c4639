"""A run's live state for the board (`lmforge board`) and for anyone watching a folder: `status.json`
(running / finished / failed / interrupted, step of total, ETA, the process) and `train.log` (one line
per metrics record). The metrics logger keeps both current while the loop runs (the step at every step,
at most once a second); the pipeline writes how the run ended, and the phase after training (`evaluating`,
by the process doing it). Both are written only once the run has started (its first metrics record or step)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

STATUS = "status.json"
LOG = "train.log"


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_json(path: Path, record: dict) -> None:
    """`record` to `path` whole, through a rename: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _alive(record: dict) -> bool:
    """Whether the process a record names still runs; on another host, unknown, so taken as alive."""
    from lmforge.outputs import pid_alive

    return record.get("host") != socket.gethostname() or pid_alive(int(record.get("pid", -1)))


def read_status(folder: Path) -> dict:
    return _read_json(Path(folder) / STATUS)


def write_status(folder: Path, **fields) -> None:
    """Merge `fields` into status.json."""
    if Path(folder).is_dir():
        _write_json(Path(folder) / STATUS, {**read_status(folder), **fields, "updated": time.time()})


def append_log(folder: Path, line: str) -> None:
    with open(Path(folder) / LOG, "a") as handle:
        handle.write(line.rstrip("\n") + "\n")


class Progress:
    """status.json's running record: the step reached, the total, and the ETA from the pace so far."""

    def __init__(self, folder: Path, total_steps: int, start_step: int, resumed: bool):
        self.folder, self.total, self.start_step = Path(folder), total_steps, start_step
        self.started = time.time()
        self._ticked = 0.0
        if not resumed:
            (self.folder / LOG).write_text("")
        write_status(self.folder, status="running", pid=os.getpid(), host=socket.gethostname(), step=start_step,
                     total_steps=total_steps, started=self.started, eta_seconds=None, message=None)

    def tick(self, step: int) -> None:
        """The step reached, every step but at most once a second (a step can take milliseconds), and always the
        last: the board's progress follows the console's bar, not only the metrics records."""
        now = time.time()
        if step < self.total and now - self._ticked < 1.0:
            return
        self._ticked = now
        write_status(self.folder, step=step, eta_seconds=self._eta(step))

    def _eta(self, step: int) -> float | None:
        done = step - self.start_step
        return (time.time() - self.started) / done * (self.total - step) if done > 0 else None

    def record(self, step: int, prefix: str, values: dict) -> None:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool))
        append_log(self.folder, f"{time.strftime('%H:%M:%S')} step {step} {prefix}: {shown}")
        write_status(self.folder, step=step, eta_seconds=self._eta(step))


def evaluating(folder: Path) -> None:
    """The model is trained (or was up to date) and this process now evaluates it: the board shows that, and
    `finished_evaluating` ends it. Written only into a folder that is this run's (it has a status)."""
    if read_status(folder):
        write_status(folder, phase="evaluating", pid=os.getpid(), host=socket.gethostname())


def finished_evaluating(folder: Path) -> None:
    if read_status(folder).get("phase") is not None:
        write_status(folder, phase=None)


def run_state(folder: Path) -> str:
    """running / evaluating / finished / failed / interrupted; a 'running' run whose process is gone (killed
    hard, the machine restarted) reads as interrupted: its last checkpoint resumes it. 'evaluating': trained,
    and its process is evaluating the model."""
    status = read_status(folder)
    state = status.get("status")
    alive = _alive(status)
    if state == "running" and not alive:
        return "interrupted"
    if state == "finished" and status.get("phase") == "evaluating":  # trained; its evaluation still running, or cut
        return "evaluating" if alive else "finished"
    if state is None:
        return "finished" if (Path(folder) / "summary.json").is_file() else "unknown"
    return state


PIPELINE_STATUS = "pipeline_status.json"


def pipeline_at(folder: Path, stage: str | None, phase: str) -> None:
    """A pipeline's own live record, in its output folder: the stage it is at and what it does there
    (preparing: importing the model, building the tokenizer, preparing the data, before the stage's folder
    becomes a run; evaluating: an evaluation stage), by which process. The board shows a stage from it until
    the stage's folder has a status of its own."""
    if Path(folder).is_dir() and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 keeps it
        _write_json(Path(folder) / PIPELINE_STATUS, {"writer": "lmforge", "stage": stage, "phase": phase,
                                                     "pid": os.getpid(), "host": socket.gethostname(),
                                                     "updated": time.time()})


def pipeline_state(folder: Path) -> dict:
    """The pipeline's record, its process checked: `alive` False when it ran here and is gone."""
    record = _read_json(Path(folder) / PIPELINE_STATUS)
    return {**record, "alive": _alive(record)} if record else {}
