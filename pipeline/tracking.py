"""MLflow tracking: a parent run per pipeline run, one child per trained model.

The tracking URI defaults to a sqlite file in the run directory (``<run_dir>/mlflow.db``; MLflow's file store
is deprecated); ``MLFLOW_TRACKING_URI`` (e.g. a team server) overrides it. Runs are found again by tags
(``smarttrim.pipeline_key`` on the parent, ``smarttrim.model_key`` on children), so a rerun of a cached
pipeline logs nothing twice. Artifacts of the default store go to ``<run_dir>/mlflow-artifacts/``. Open the
store with ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

PARENT_TAG = "smarttrim.pipeline_key"
CHILD_TAG = "smarttrim.model_key"


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``a.b.c`` keys (lists and None as strings), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
    return out


class Tracker:
    """Logs a pipeline run (or a sweep) and its models to MLflow."""

    def __init__(self, run_dir: Path, experiment: str, key: str, name: str, params: dict[str, Any]) -> None:
        import mlflow

        server = bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.uri = tracking_uri(run_dir)
        self.client = mlflow.MlflowClient(self.uri)  # no mlflow.set_tracking_uri: it would export the URI
        exp = self.client.get_experiment_by_name(experiment)
        # artifacts beside the default sqlite store (MLflow would use ./mlruns of the current directory);
        # a tracking server given by MLFLOW_TRACKING_URI decides for itself
        artifacts = None if server else (run_dir.resolve() / "mlflow-artifacts").as_uri()
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifacts)
        found = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{key}'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, tags={PARENT_TAG: key, "mlflow.runName": name})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[start:start + 100])

    def child(self, key: str) -> str | None:
        """The run id of an already logged model, if any."""
        query = f"tags.`{CHILD_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent_id}'"
        found = self.client.search_runs([self.experiment_id], query, max_results=1)
        return found[0].info.run_id if found else None

    def log_model(self, key: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  history: list[dict[str, float]], artifacts: list[Path]) -> str:
        """One child run per trained model: params, final metrics, training curves, artifacts (idempotent)."""
        from mlflow.entities import Metric

        existing = self.child(key)
        if existing:
            return existing
        run = self.client.create_run(self.experiment_id, tags={
            CHILD_TAG: key, "mlflow.parentRunId": self.parent_id, "mlflow.runName": name})
        run_id = run.info.run_id
        self._log_params(run_id, params)
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        for row in history:
            step = int(row["step"])
            points += [Metric(f"train/{k}", float(v), now, step) for k, v in row.items()
                       if k not in ("step", "epoch") and isinstance(v, int | float)]
        for start in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[start:start + 1000])
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id)
        return run_id

    def finish(self, metrics: dict[str, float], artifacts: list[Path]) -> None:
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id)


__all__ = ["CHILD_TAG", "PARENT_TAG", "Tracker", "flatten", "tracking_uri"]
