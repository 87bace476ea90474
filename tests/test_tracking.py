"""MLflow tracking and logging without Ray: a training's run made before it starts and filled live, kept when the
training resumes, replaced when it is recomputed; the report's part idempotent; what a store never saw backfilled;
an unreachable server a warning; ``pipeline.log`` one timestamped line per record; progress lines and ETAs."""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.dag import timing
from pipeline.plan import Stage
from pipeline.tracking import EXPERIMENT_KIND, SUPERSEDED_TAG, LiveRun, LiveTracking, Tracker, stage_metrics
from stages.evaluate import EvaluateConfig
from stages.finetune_config import FinetuneConfig
from stages.progress import Progress, eta

META = {"task": "t", "name": "m", "kind": "smarttrim", "target": "2x"}


def _stages(root: Path, name: str = "m") -> tuple[Stage, Stage]:
    ft = FinetuneConfig(shards=str(root / "shards"), out=str(root / "finetune" / f"t-{name}-abc"))
    ev = EvaluateConfig(model=str(Path(ft.out) / "model"), shards=ft.shards, out=str(root / "evaluate" / f"t-{name}"))
    meta = {**META, "name": name}
    return (Stage(f"finetune/t/{name}", "finetune", ft, (), meta),
            Stage(f"evaluate/t/{name}", "evaluate", ev, ("shard/t", f"finetune/t/{name}"), meta))


def _finish(stage: Stage, metrics: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The stage's output files and marker, as ``pipeline.dag.run_stage`` leaves them."""
    stage.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (stage.out / name).write_text(text)
    return {"id": stage.id, "out": str(stage.out), "seconds": 1.5, "metrics": metrics}


def _tracking(root: Path, stages: list[Stage]) -> LiveTracking:
    return LiveTracking(root, "exp", "pipeline-key", "run", {"name": "run", "tasks": [{"name": "t"}]}, stages)


def _count(client: Any, run_id: str, key: str) -> int:
    return len(client.get_metric_history(run_id, key))


def test_a_training_is_tracked_live_resumed_into_its_run_and_recomputed_into_a_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ft, ev = _stages(tmp_path)
    tracking = _tracking(tmp_path, [ft, ev])
    sink = pickle.loads(pickle.dumps(tracking.submit(ft)))  # as it travels to the Ray Train workers
    assert isinstance(sink, LiveRun) and tracking.submit(ev) is None
    for step in (2, 4, 6):  # rank 0's rows, as they are measured
        sink.log_metrics({"loss": 1.0 / step, "keep/heads": 0.9, "epoch": 0}, step)
        time.sleep(0.01)
    sink.log_metrics({"val/metric": 0.4}, 6)
    sink.close()
    client, run_a = tracking.tracker.client, sink.run_id
    loss = client.get_metric_history(run_a, "train/loss")
    assert [m.step for m in loss] == [2, 4, 6] and len({m.timestamp for m in loss}) == 3
    assert _count(client, run_a, "val/metric") == 1 and _count(client, run_a, "train/epoch") == 0
    assert client.get_experiment(tracking.tracker.experiment_id).tags["mlflow.experimentKind"] == EXPERIMENT_KIND

    history = "".join(json.dumps({"step": s, "epoch": 0, "loss": 1.0 / s}) + "\n" for s in (2, 4, 6))
    markers = {ft.id: _finish(ft, {"steps": 6, "train_seconds": 3.0, "samples_per_s": 10.0},
                              {"metrics.json": "{}", "history.jsonl": history, "curves.png": "png"}),
               ev.id: _finish(ev, {"metric": 0.5, "metric_name": "vqa_score", "keep": {"heads": 0.9},
                                   "permuted_images": {"metric": 0.2, "changed": 0.7}}, {"metrics.json": "{}"})}
    tracking.done(ft, markers[ft.id])
    tracking.done(ev, markers[ev.id])
    run = client.get_run(run_a)
    assert run.info.status == "FINISHED" and run.data.metrics["vqa_score"] == 0.5
    assert run.data.metrics["train_seconds"] == 3.0 and run.data.metrics["permuted_changed"] == 0.7
    assert _count(client, run_a, "train/loss") == 3, "curves logged live are not replayed"
    assert {a.path for a in client.list_artifacts(run_a, "finetune")} == {
        "finetune/metrics.json", "finetune/history.jsonl", "finetune/curves.png"}
    assert [a.path for a in client.list_artifacts(run_a, "evaluate")] == ["evaluate/metrics.json"]

    def report() -> str:  # a report (a new driver), twice: the second logs nothing
        return _tracking(tmp_path, [ft, ev]).summarize(ft, markers, {"flops_ratio": 0.5})

    assert report() == run_a
    before = [_count(client, run_a, k) for k in ("flops_ratio", "vqa_score", "train_seconds", "train/loss")]
    assert before == [1, 1, 1, 3]
    assert report() == run_a and [_count(client, run_a, k) for k in ("flops_ratio", "vqa_score", "train_seconds",
                                                                       "train/loss")] == before

    snapshot = Path(ft.config.storage_path) / ft.config.name / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text(json.dumps({"checkpoint_results": [{"metrics": {"step": 4}}]}))
    resumed = _tracking(tmp_path, [ft, ev]).submit(ft)  # a killed driver's rerun: the training resumes
    assert resumed is not None and resumed.run_id == run_a and client.get_run(run_a).info.status == "RUNNING"

    snapshot.unlink()  # --force: the checkpoints are cleared, the training starts over
    forced = _tracking(tmp_path, [ft, ev])
    fresh = forced.submit(ft)
    assert fresh is not None and fresh.run_id != run_a
    old = client.get_run(run_a)
    assert old.info.lifecycle_stage == "deleted" and old.data.tags[SUPERSEDED_TAG] == fresh.run_id
    forced.done(ev, markers[ev.id])  # the evaluation of the new model goes to the new run
    assert client.get_run(fresh.run_id).data.metrics["vqa_score"] == 0.5
    assert forced.tracker.child(ft.out.name) == fresh.run_id


def test_the_report_backfills_stages_the_store_never_saw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ft, ev = _stages(tmp_path, "old")
    history = "".join(json.dumps({"step": s, "epoch": 0, "loss": 1.0 / s, "val/metric": 0.1 * s}) + "\n"
                      for s in (1, 2))
    markers = {ft.id: _finish(ft, {"steps": 2, "train_seconds": 1.0}, {"history.jsonl": history}),
               ev.id: _finish(ev, {"metric": 0.25, "metric_name": "accuracy"}, {"metrics.json": "{}"})}
    run_id = _tracking(tmp_path, [ft, ev]).summarize(ft, markers, {"flops_ratio": 1.0})
    client = Tracker(tmp_path, "exp", "pipeline-key", "run", {}).client
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "val/metric")] == [0.1, 0.2]
    assert client.get_run(run_id).data.metrics["accuracy"] == 0.25
    assert [a.path for a in client.list_artifacts(run_id, "evaluate")] == ["evaluate/metrics.json"]


def test_an_unreachable_tracking_server_is_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sink = LiveRun("http://127.0.0.1:9", "0123")  # nothing listens on port 9
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        sink.log_metrics({"loss": 1.0}, 1)
        sink.close()
    assert "could not log the curves" in caplog.text


def test_stage_metrics_read_mmacs_and_the_test_split() -> None:
    profile = Stage("profile/t/m", "profile", None, meta=META)
    marker = {"metrics": {"flops": {"mean": 3_012_345.0}, "latency_ms_bs1": {"median": 2.0},
                          "throughput": {"instances_per_s": 50.0}, "speedup": {"flops": 1.9, "method": "text"}}}
    assert stage_metrics(profile, marker) == {"mmacs": pytest.approx(3.012345), "latency_ms_bs1": 2.0,
                                              "throughput": 50.0, "speedup_flops": 1.9}
    test = Stage("test/t/m", "evaluate", None, meta=META)
    assert stage_metrics(test, {"metrics": {"metric": 0.3, "metric_name": "vqa_score"}}) == {"test_metric": 0.3}


@pytest.fixture
def restore_loggers(monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in ("RAY_DEDUP_LOGS_ALLOW_REGEX", "RAY_DEDUP_LOGS_SKIP_REGEX", "SMARTTRIM_LOG_LEVEL"):
        monkeypatch.delenv(key, raising=False)  # and removed again afterwards
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in ("pipeline", "stages", "smarttrim")}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for h in logger.handlers[:]:
            logger.removeHandler(h)
            h.close()
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_pipeline_log_has_one_timestamped_line_per_record(tmp_path: Path, restore_loggers: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from pipeline.logs import setup_logging

    path = setup_logging(tmp_path / "runs" / "x")
    assert not path.exists(), "no file before the first record"
    log = logging.getLogger("pipeline")
    log.debug("[pipeline] a: submitted")
    log.info("[pipeline] a: " + timing(0.6, 52.4))
    log.error("[pipeline] 2 stage(s) failed:\n  b: boom\n  c: not run")
    setup_logging(tmp_path / "runs" / "x")  # again (a second command): appends, no handler twice
    logging.getLogger("smarttrim.ray").warning("[pipeline] Ray: slow")
    lines = path.read_text().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pipeline: \[pipeline\] a: done in 0\.6 s "
                        r"\(waited 51\.8 s for inputs and a worker\)", lines[0]), lines[0]
    assert lines[1].endswith("ERROR pipeline: [pipeline] 2 stage(s) failed: |   b: boom |   c: not run")
    assert " WARNING smarttrim.ray: [pipeline] Ray: slow" in lines[2]
    out = capsys.readouterr()
    assert out.out == "[pipeline] a: done in 0.6 s (waited 51.8 s for inputs and a worker)\n"
    assert "ERROR [pipeline] 2 stage(s) failed:" in out.err and "WARNING [pipeline] Ray: slow" in out.err
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] and os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"]
    assert re.search(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"], "Reporting training result 3: TrainingReport(check")
    assert re.search(os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"], "[finetune shapes-vqa/smarttrim-2x] step 8/16")


def test_progress_lines_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    assert [eta(s) for s in (0.4, 12, 80, 3600 + 5 * 60 + 7)] == ["0s", "12s", "1m20s", "1h05m"]
    progress = Progress("[evaluate t/m] val:", 600, "instances", every_s=0.0)
    progress.start -= 10.0  # 10 s ago
    progress.update(300)
    progress.finish()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[evaluate t/m\] val: 300/600 instances, 30\.0/s, ETA 10s", lines[0]), lines[0]
    assert re.fullmatch(r"\[evaluate t/m\] val: 300 instances in 10\.0s", lines[1]), lines[1]
