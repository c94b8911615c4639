"""`trainer.tracking: mlflow`: a training run mirrored into an MLflow tracking store.

Logged: the recipe's settings as params (flattened `section.key`), every metric record the loop
writes to metrics.jsonl (as `train/loss`, `val/loss`, ... at its step), the run's summary, and the
final model folder as the artifact `model`. The store is `trainer.tracking_uri`, by default a SQLite
file in the output folder (`mlflow.db`, artifacts under `mlartifacts/`): no server to run, and
`mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db` shows it. A resumed run continues the same
MLflow run (its id is kept in `mlflow_run.json`). It goes through `MlflowClient` (no global active
run), so several runs in one process do not mix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RUN_FILE = "mlflow_run.json"


class MlflowTracker:
    def __init__(self, out_dir: Path, uri: str | None, experiment: str, run_name: str, params: dict, resume: bool):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ValueError("trainer.tracking: mlflow needs the mlflow package: pip install 'lmforge[mlflow]' "
                             "(or mlflow-skinny sqlalchemy alembic)") from None
        out_dir = Path(out_dir).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or f"sqlite:///{out_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        known = self.client.get_experiment_by_name(experiment)
        if known is not None:
            experiment_id = known.experiment_id
        else:
            artifacts = None if uri else (out_dir / "mlartifacts").as_uri()  # beside the SQLite file, not the cwd
            experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        saved = out_dir / RUN_FILE
        previous = json.loads(saved.read_text()) if resume and saved.is_file() else {}
        if previous.get("uri") == self.uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            self._params(params)
        saved.write_text(json.dumps({"uri": self.uri, "run_id": self.run_id, "experiment": experiment}))

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        entries = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                   for k, v in sorted(params.items()) if v is not None]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(p.key, p.value[:6000]) for p in entries[start:start + 100]])

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{k}", float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_model(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path="model")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
