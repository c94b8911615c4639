"""Metrics to a JSONL file (one record per line), to TensorBoard, and to a tracker (MLflow) if one is set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


class MetricsLogger:
    """Nothing is written before the first record: a run that fails before it logs anything leaves
    the previous run's metrics.jsonl as it was. `on_first_write()` runs just before that first record."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 on_first_write: Callable[[], None] | None = None, also=None, total_steps: int | None = None,
                 start_step: int = 0):
        """`also`: a tracker (engine/tracking.py) that receives every record too; with `total_steps`,
        status.json and train.log follow the run (engine/status.py)."""
        self.also = also
        self.total_steps, self.start_step = total_steps, start_step
        self._progress = None
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.resume_step = resume_step
        self.tensorboard = tensorboard
        self.on_first_write = on_first_write
        self._started = False
        self._tb = None

    def start(self) -> None:
        """Mark the run started (its folder becomes this run's) if no record has done so yet."""
        if not self._started:
            self._start()

    def _start(self) -> None:
        self._started = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.on_first_write is not None:
            self.on_first_write()
        if self.resume_step is not None:
            self._truncate_after(self.resume_step)
        else:
            self.path.write_text("")
        if self.total_steps is not None:
            from lmforge.engine.status import Progress

            self._progress = Progress(self.out_dir, self.total_steps, self.start_step, self.resume_step is not None)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step: they belong to the interrupted attempt."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self._started:
            self._start()
        record = {"step": step, "split": prefix, **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.also is not None:
            self.also.log(step, values, prefix)
        if self._progress is not None:
            self._progress.record(step, prefix, values)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def tick(self, step: int) -> None:
        """A step done (every step): status.json's step and ETA follow, at most once a second."""
        if not self._started:
            self._start()
        if self._progress is not None:
            self._progress.tick(step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class NullMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    def start(self) -> None:
        pass

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        pass

    def tick(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path, split: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]
