"""MLflow tracking: a parent run per pipeline run, one child per trained model, logged while the stages run.

Where. The tracking URI defaults to a sqlite file in the run directory (``<run_dir>/mlflow.db``, artifacts in
``<run_dir>/mlflow-artifacts/``; MLflow's file store is deprecated); ``MLFLOW_TRACKING_URI`` overrides it. Only
processes on one machine can write a sqlite file, and live logging writes from wherever a training runs: a cluster
sets ``MLFLOW_TRACKING_URI`` to a tracking server every node reaches (``mlflow server``, which also serves the
artifacts). The driver resolves the URI once and hands it to each training it submits; ``pipeline.dag`` copies the
driver's ``MLFLOW_*`` variables (the URI, credentials) into every stage's Ray ``runtime_env``, which its Ray Train
workers inherit. Open the default store with ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``.

What, and when:

* The experiment is created with ``mlflow.experimentKind=custom_model_development``, so MLflow's UI opens it in the
  model-training view, not the GenAI one (an existing experiment without the tag gets it).
* The parent run (tag ``smarttrim.pipeline_key``: the config's key) holds the config as params (flattened), the
  code's git commit (``mlflow.source.git.commit``, ``mlflow.source.git.branch``, and ``smarttrim.git_dirty``:
  whether the checkout had changes git does not ignore; no git tags outside a checkout, e.g. in a Ray job's uploaded
  working directory) and, from the report, ``results.json``, ``report.md``, ``pareto.png``.
* One child per trained model (tag ``smarttrim.model_key``: its fine-tuning's output directory name; the same git
  tags, as of when it was created), made by the driver just before the fine-tuning is submitted (``LiveTracking``).
  The run id and URI reach the training as a ``LiveRun``, an argument of its Ray task beside the stage, not part
  of its config: the stage's key and the fine-tuning's fingerprint do not change. Rank 0 logs every curve row
  (``train/<part>``: loss parts, keep ratios, learning rates, ...) and every validation (``val/<metric>``) with its
  step and the time it was measured. As each of the model's stages finishes, the driver logs its summary metrics
  (``stage_metrics``) and its files under a folder of the stage (``finetune/``, ``evaluate/``, ``profile/``,
  ``test/``; ``pretrain/``) and tags the run with a digest of the marker it logged (``smarttrim.logged.<folder>``).
* The report adds what only it computes (``flops_ratio``, against the task's backbone) and logs any summary value
  that differs from the run's latest; it also backfills what the store never saw (stages finished before the store
  existed: their files, and their curves from ``history.jsonl``, stamped with the report's time). Each step compares
  before it writes: a rerun of a cached pipeline logs nothing.
* Recomputed training (``--force``, or its outputs deleted, so no checkpoint to resume from): a fresh child run. The
  previous one is tagged ``smarttrim.superseded_by=<new run id>`` and deleted (MLflow's soft delete: out of the
  experiment's list, restorable with ``mlflow runs restore``, removed for good by ``mlflow gc``). A fine-tuning that
  resumes a checkpoint (Ray Train's snapshot of its run lists one) keeps its child and continues the curves (the
  steps since that checkpoint appear twice, the later points from the resumed attempt). A recomputed evaluation or
  profile adds its values as later points of the same metrics and replaces its artifacts.

Units: ``mmacs`` is the mean multiply-accumulates of one instance in millions (the paper's "GFLOPs" x 1000; MLflow's
UI shows three decimals, so tiny models' GFLOPs would all read 0.003).

MLflow problems never fail a stage: while stages run they are logged as warnings (the report backfills what is
missing); a training's points are sent by a background thread, so a slow or unreachable server delays no step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.plan import Stage

LOG = logging.getLogger("pipeline.tracking")
PARENT_TAG = "smarttrim.pipeline_key"
CHILD_TAG = "smarttrim.model_key"
LOGGED_TAG = "smarttrim.logged."
"""+ an artifact folder (``finetune``, ``evaluate``, ...): the digest of the stage marker logged there."""
SUPERSEDED_TAG = "smarttrim.superseded_by"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
GIT_DIRTY_TAG = "smarttrim.git_dirty"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's experiment kind of the model-training view (the UI's other kinds are ``genai_development``)."""
CLOSE_TIMEOUT_S = 60.0
"""How long a training's end waits for its last points to reach MLflow."""
REPO = Path(__file__).resolve().parents[1]


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def tracking_env() -> dict[str, str]:
    """The ``MLFLOW_*`` variables of this process (the tracking URI, credentials): what remote stages need too."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


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


GIT_COMMIT_ENV, GIT_DIRTY_ENV = "SMARTTRIM_GIT_COMMIT", "SMARTTRIM_GIT_DIRTY"


def git_tags(root: Path = REPO) -> dict[str, str]:
    """The commit (and branch) of the git checkout at ``root``, and whether it has changes git does not ignore;
    where ``root`` is no checkout (a Ray job's uploaded working directory has no ``.git``), what the submitting
    machine recorded in ``SMARTTRIM_GIT_COMMIT`` / ``SMARTTRIM_GIT_DIRTY`` (``cluster/submit.py`` sets them); else
    empty."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        submitted = os.environ.get(GIT_COMMIT_ENV)
        if not submitted:
            return {}
        return {GIT_COMMIT_TAG: submitted, GIT_DIRTY_TAG: os.environ.get(GIT_DIRTY_ENV, "unknown")}
    tags = {GIT_COMMIT_TAG: commit}
    status = git("status", "--porcelain")
    if status is not None:
        tags[GIT_DIRTY_TAG] = "true" if status else "false"
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags[GIT_BRANCH_TAG] = branch
    return tags


def curve_name(key: str) -> str:
    """The MLflow metric of a curve value (``history.jsonl`` key): ``val/...`` as it is, the others ``train/<key>``."""
    return key if key.startswith("val/") else f"train/{key}"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def folder(stage: Stage) -> str:
    """The artifact folder (and ``smarttrim.logged.*`` tag) of a stage: its id's first part (``test`` for the
    held-out evaluation)."""
    return stage.id.split("/", 1)[0]


def marker_digest(marker: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_metrics(stage: Stage, marker: dict[str, Any]) -> dict[str, float]:
    """The summary metrics of a finished stage from its marker (``pipeline.dag._summary``), as logged to its
    model's run: fine-tuning ``train_seconds``, ``samples_per_s``, ``steps``; evaluation ``metric`` (also under
    the metric's name), ``permuted_metric``, ``permuted_changed``, ``focus_*``, ``keep_*``, ``kind/<kind>/metric``,
    retrieval recalls; test ``test_metric``; profile ``mmacs``, ``latency_ms_bs1`` (median), ``throughput``,
    ``speedup_*``."""
    m = marker["metrics"]
    out: dict[str, Any] = {}
    where = folder(stage)
    if where in ("finetune", "pretrain"):
        out = {k: m.get(k) for k in ("train_seconds", "samples_per_s", "steps")}
        out.update({f"pretrain/{k}": v for k, v in (m.get("evaluation") or {}).items()})
    elif where == "test":
        out = {"test_metric": m.get("metric")}
    elif where == "evaluate":
        permuted, focus = m.get("permuted_images") or {}, m.get("focus") or {}
        out = {"metric": m.get("metric"), m["metric_name"]: m.get("metric"), "permuted_metric": permuted.get("metric"),
               "permuted_changed": permuted.get("changed"),
               **{f"focus_{k}": focus.get(k) for k in ("precision", "chance", "lift", "recall", "kept_patches")},
               **{f"keep_{g}": v for g, v in (m.get("keep") or {}).items()},
               **{k: m.get(k) for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")},
               **{f"kind/{k}/{name}": v.get(name) for k, v in (m.get("by_kind") or {}).items()
                  for name in ("metric", "permuted_metric")}}
    elif where == "profile":
        speedup = m.get("speedup") or {}
        out = {"mmacs": m["flops"]["mean"] / 1e6, "latency_ms_bs1": m["latency_ms_bs1"]["median"],
               "throughput": m["throughput"]["instances_per_s"],
               **{f"speedup_{k}": v for k, v in speedup.items()}}
    return {k: float(v) for k, v in out.items() if _number(v)}


def stage_files(stage: Stage, marker: dict[str, Any]) -> list[Path]:
    """The files of a finished stage logged as artifacts under its folder."""
    out = stage.out  # not the marker's "out": a staged run's stage ran in another node's copy
    names = {"finetune": ("metrics.json", "history.jsonl", "curves.png"),
             "pretrain": ("metrics.json", "history.jsonl", "curves.png"),
             "evaluate": ("metrics.json",), "test": ("metrics.json",),
             "profile": ("profile.json", "flops_hist.png")}.get(folder(stage), ())
    files = [out / n for n in names]
    results = marker["metrics"].get("results_file")
    if folder(stage) == "test" and results:
        files.append(out / results)
    return [f for f in files if f.is_file()]


def resumes(stage: Stage) -> bool:
    """Whether ``stage``'s training would resume a checkpoint: Ray Train's snapshot of its run lists one (read
    through pyarrow, so run storage may be a local path or a URI, ``compute.storage``)."""
    from stages.finetune_config import storage_fs

    try:
        fs, path = storage_fs(f"{stage.config.run_storage}/checkpoint_manager_snapshot.json")
        with fs.open_input_stream(path) as f:
            return bool(json.loads(f.read())["checkpoint_results"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


class Tracker:
    """Logs a pipeline run (or a sweep) and its models to MLflow."""

    def __init__(self, run_dir: Path, experiment: str, key: str, name: str, params: dict[str, Any]) -> None:
        import mlflow

        server = bool(os.environ.get("MLFLOW_TRACKING_URI"))
        self.uri = tracking_uri(run_dir)
        self.client = mlflow.MlflowClient(self.uri)  # no mlflow.set_tracking_uri: it would export the URI
        self.git = git_tags()
        exp = self.client.get_experiment_by_name(experiment)
        # artifacts beside the default sqlite store (MLflow would use ./mlruns of the current directory);
        # a tracking server given by MLFLOW_TRACKING_URI decides for itself
        artifacts = None if server else (run_dir.resolve() / "mlflow-artifacts").as_uri()
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment, artifacts,
                                                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        found = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{key}'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            for tag, value in self.git.items():  # a parent made before runs were tagged with their commit
                if tag not in found[0].data.tags:
                    self.client.set_tag(self.parent_id, tag, value)
        else:
            run = self.client.create_run(self.experiment_id, tags={
                PARENT_TAG: key, "mlflow.runName": name, "mlflow.source.name": "pipeline.run", **self.git})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[start:start + 100])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[start:start + 1000])

    def find_child(self, key: str) -> Any | None:
        """The latest active run of a model (``mlflow.entities.Run``), if any."""
        query = f"tags.`{CHILD_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent_id}'"
        found = self.client.search_runs([self.experiment_id], query, max_results=1,
                                        order_by=["attributes.start_time DESC"])
        return found[0] if found else None

    def child(self, key: str) -> str | None:
        """The run id of an already logged model, if any."""
        run = self.find_child(key)
        return run.info.run_id if run else None

    def new_child(self, key: str, name: str, params: dict[str, Any]) -> str:
        """A new child run of a model (status RUNNING), with its params and the code's git tags."""
        run = self.client.create_run(self.experiment_id, tags={
            CHILD_TAG: key, "mlflow.parentRunId": self.parent_id, "mlflow.runName": name, **self.git})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def supersede(self, old: str, new: str) -> None:
        """Retire a model's previous run: tagged with its successor, then deleted (restorable)."""
        self.client.set_tag(old, SUPERSEDED_TAG, new)
        self.client.delete_run(old)

    def log_stage(self, run_id: str, stage: Stage, marker: dict[str, Any]) -> None:
        """A finished stage into its model's run: its summary metrics, its files under its folder (a training
        whose run has no curve yet: the curves from ``history.jsonl`` too), the marker's digest as a tag."""
        run = self.client.get_run(run_id)
        if folder(stage) in ("finetune", "pretrain") and not any(k.startswith("train/") for k in run.data.metrics):
            history = stage.out / "history.jsonl"
            if history.is_file():
                self.log_curves(run_id, [json.loads(line) for line in history.read_text().splitlines()])
        self._log_metrics(run_id, stage_metrics(stage, marker))
        for path in stage_files(stage, marker):
            self.client.log_artifact(run_id, str(path), folder(stage))
        self.client.set_tag(run_id, LOGGED_TAG + folder(stage), marker_digest(marker))

    def log_curves(self, run_id: str, history: list[dict[str, Any]]) -> None:
        """Curve rows after the fact (a training that did not log them live), at their steps, stamped now."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(curve_name(k), float(v), now, int(row["step"])) for row in history for k, v in row.items()
                  if k not in ("step", "epoch") and _number(v)]
        for start in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[start:start + 1000])

    def log_changed(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """``metrics`` whose value differs from the run's latest (new ones included); the rest are not logged again."""
        latest = self.client.get_run(run_id).data.metrics
        self._log_metrics(run_id, {k: v for k, v in metrics.items() if latest.get(k) != v})

    def log_model(self, key: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  history: list[dict[str, float]], artifacts: list[Path]) -> str:
        """One child run per model, all logged at once (the sweep's trials): params, final metrics, training curves,
        artifacts (idempotent: a model already logged is left as it is)."""
        existing = self.child(key)
        if existing:
            return existing
        run_id = self.new_child(key, name, params)
        self._log_metrics(run_id, {k: float(v) for k, v in metrics.items() if v is not None})
        self.log_curves(run_id, history)
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id)
        return run_id

    def finish(self, metrics: dict[str, float], artifacts: list[Path]) -> None:
        """The parent's closing metrics and files; files already logged with the same content are not sent again."""
        if metrics:
            self._log_metrics(self.parent_id, metrics)
        files = [p for p in artifacts if p.is_file()]
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
        run = self.client.get_run(self.parent_id)
        if run.data.tags.get(LOGGED_TAG + "report") != digest:
            for path in files:
                self.client.log_artifact(self.parent_id, str(path))
            self.client.set_tag(self.parent_id, LOGGED_TAG + "report", digest)
        if run.info.status != "FINISHED":
            self.client.set_terminated(self.parent_id)


class LiveRun:
    """``stages.progress.MetricsSink`` writing a training's curve points into an MLflow run as they come.

    Picklable (it travels to the Ray Train workers in ``train_loop_config``: only the URI and run id do; the client
    is made on first use). A background thread sends the points, so a slow or unreachable server delays no step;
    ``close`` waits up to ``CLOSE_TIMEOUT_S`` for what is left. Failures become one warning (and a count), never an
    exception."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._queue: queue.Queue[list[tuple[str, float, int, int]] | None] | None = None
        self._thread: threading.Thread | None = None
        self._failures = 0

    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["uri"], state["run_id"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"LiveRun({self.uri!r}, {self.run_id!r})"

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [(curve_name(k), float(v), now, int(step)) for k, v in values.items()
                  if k not in ("step", "epoch") and _number(v)]
        if not points:
            return
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._send, name="mlflow-live", daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put(points)

    def _send(self) -> None:
        assert self._queue is not None
        client = None
        while (points := self._queue.get()) is not None:
            try:
                if client is None:
                    import mlflow

                    client = mlflow.MlflowClient(self.uri)
                from mlflow.entities import Metric

                client.log_batch(self.run_id, metrics=[Metric(*p) for p in points])
            except Exception as err:  # tracking is never worth a failed training
                self._failures += 1
                if self._failures == 1:
                    LOG.warning(f"[tracking] MLflow run {self.run_id} at {self.uri}: could not log the curves "
                                f"({type(err).__name__}: {err}); training goes on, the report logs them afterwards")

    def close(self) -> None:
        if self._thread is None or self._queue is None:
            return
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            LOG.warning(f"[tracking] MLflow run {self.run_id}: points still unsent after {CLOSE_TIMEOUT_S:.0f} s, "
                        "left behind")
        elif self._failures:
            LOG.warning(f"[tracking] MLflow run {self.run_id}: {self._failures} batch(es) of curve points not logged")


class LiveTracking:
    """The pipeline's MLflow tracking while ``pipeline.dag.execute`` runs its stages (``submit``, ``done``,
    ``failed``) and at the report (``summarize``); see the module docstring. MLflow is imported and the store
    opened on first use; while stages run, an MLflow error is a warning, never a failed stage."""

    def __init__(self, run_dir: Path, experiment: str, key: str, name: str, params: dict[str, Any],
                 stages: list[Stage]) -> None:
        self._args = (run_dir, experiment, key, name, params)
        self.by_id = {s.id: s for s in stages}
        self.runs: dict[str, str] = {}
        """Model stage id -> its child run id, once found or made."""
        self._tracker: Tracker | None = None

    @classmethod
    def of(cls, cfg: PipelineConfig, stages: list[Stage]) -> LiveTracking:
        return cls(cfg.run_dir, cfg.mlflow_experiment, cfg.key(), cfg.name, cfg.to_dict(), stages)

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(*self._args)
        return self._tracker

    def env(self) -> dict[str, str]:
        """Environment variables every remote stage gets (``tracking_env``)."""
        return tracking_env()

    def model_of(self, stage: Stage) -> Stage | None:
        """The training whose run a stage logs to: itself, or the fine-tuning an evaluation or profile measures."""
        if stage.kind in ("finetune", "pretrain"):
            return stage
        if stage.kind in ("evaluate", "profile"):
            return next((self.by_id[d] for d in stage.deps if d in self.by_id and self.by_id[d].kind == "finetune"),
                        None)
        return None

    def _run_id(self, model: Stage, fresh: bool = False) -> str:
        """The model's child run: found (or made) once; ``fresh``: a new one, superseding the previous."""
        if model.id in self.runs and not fresh:
            return self.runs[model.id]
        tracker = self.tracker
        existing = tracker.find_child(model.out.name)
        if existing is not None and not fresh:
            self.runs[model.id] = existing.info.run_id
            return self.runs[model.id]
        meta = model.meta
        name = f"{meta['task']}/{meta['name']}" if model.kind == "finetune" else model.id
        run_id = tracker.new_child(model.out.name, name, {"model": meta, "finetune": model.config.to_dict()})
        if existing is not None:
            tracker.supersede(existing.info.run_id, run_id)
            LOG.info(f"[pipeline] {model.id}: recomputed, MLflow run {run_id} replaces {existing.info.run_id} "
                     f"(tagged {SUPERSEDED_TAG} and deleted)")
        self.runs[model.id] = run_id
        return run_id

    def submit(self, stage: Stage) -> LiveRun | None:
        """Before ``stage`` is submitted: a training gets its model's run (a fresh one unless it resumes a
        checkpoint), marked RUNNING, and the ``LiveRun`` its rank 0 logs to; other stages: None."""
        if stage.kind not in ("finetune", "pretrain"):
            return None
        try:
            run_id = self._run_id(stage, fresh=not resumes(stage))
            self.tracker.client.update_run(run_id, status="RUNNING")
            return LiveRun(self.tracker.uri, run_id)
        except Exception as err:  # no live curves; the report backfills them
            LOG.warning(f"[pipeline] {stage.id}: MLflow: {type(err).__name__}: {err} (training without live tracking)",
                        exc_info=LOG.isEnabledFor(logging.DEBUG))
            return None

    def done(self, stage: Stage, marker: dict[str, Any]) -> None:
        """A stage finished: its summary metrics and files into its model's run, which is then FINISHED."""
        model = self.model_of(stage)
        if model is None:
            return
        try:
            run_id = self._run_id(model)
            self.tracker.log_stage(run_id, stage, marker)
            self.tracker.client.set_terminated(run_id, "FINISHED")
        except Exception as err:
            LOG.warning(f"[pipeline] {stage.id}: MLflow: {type(err).__name__}: {err} (the report logs it afterwards)",
                        exc_info=LOG.isEnabledFor(logging.DEBUG))

    def failed(self, stage: Stage) -> None:
        """A stage failed: its model's run (when it has one) is marked FAILED."""
        model = self.model_of(stage)
        if model is None or model.id not in self.runs:
            return
        try:
            self.tracker.client.set_terminated(self.runs[model.id], "FAILED")
        except Exception as err:
            LOG.warning(f"[pipeline] {stage.id}: MLflow: {type(err).__name__}: {err}")

    def summarize(self, model: Stage, markers: dict[str, dict[str, Any]], extra: Mapping[str, float]) -> str:
        """The report's part for one model: every finished stage of it logged (those the store has not seen),
        its summary metrics plus ``extra`` where they differ from the run's latest, the run FINISHED. Errors
        propagate (the report names the tracking URI it writes to)."""
        tracker = self.tracker
        run_id = self._run_id(model)
        mine = [model] + [s for s in self.by_id.values() if self.model_of(s) is model and s is not model]
        run = tracker.client.get_run(run_id)
        metrics: dict[str, float] = {}
        for stage in mine:
            if stage.id not in markers:
                continue
            if run.data.tags.get(LOGGED_TAG + folder(stage)) != marker_digest(markers[stage.id]):
                tracker.log_stage(run_id, stage, markers[stage.id])
            metrics.update(stage_metrics(stage, markers[stage.id]))
        tracker.log_changed(run_id, {**metrics, **{k: float(v) for k, v in extra.items() if v is not None}})
        if run.info.status != "FINISHED":
            tracker.client.set_terminated(run_id, "FINISHED")
        return run_id


__all__ = ["CHILD_TAG", "GIT_COMMIT_ENV", "GIT_DIRTY_ENV", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "GIT_COMMIT_TAG",
           "GIT_DIRTY_TAG", "LOGGED_TAG", "PARENT_TAG", "SUPERSEDED_TAG", "LiveRun", "LiveTracking", "Tracker",
           "curve_name", "flatten", "git_tags", "marker_digest", "stage_files", "stage_metrics", "tracking_env",
           "tracking_uri"]
