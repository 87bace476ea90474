"""``python -m pipeline.run`` end to end at tiny settings: the DAG, the report, MLflow (logged live), the progress
lines and ``pipeline.log``, caching, resume after a kill, and a small Ray Tune sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_PIPELINE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = TINY_PIPELINE


def _pipeline(runs: Path, *extra: str, command: str = "all", timeout: float = 900) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline.run", command, "--config", "pipeline/configs/quickstart.yaml",
            f"runs_dir={runs}", *TINY, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _mlflow_runs(run_dir: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smarttrim")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``all`` at tiny settings, shared by the tests below (the first reruns it cached and forces a stage)."""
    runs = tmp_path_factory.mktemp("runs")
    done = _pipeline(runs)
    assert done.returncode == 0, done.stderr[-4000:]
    return runs, done


def test_all_produces_the_report_and_mlflow_runs_and_a_rerun_is_cached(
        tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp_path, _ = tiny_run
    run_dir = tmp_path / "quickstart"
    report = json.loads((run_dir / "results.json").read_text())
    entries = {e["name"]: e for e in report["results"]}
    models = {"shapes-vqa/backbone", "shapes-vqa/smarttrim-2x", "shapes-vqa/smarttrim-1.5x", "shapes-vqa/local-2x",
              "shapes-vqa/no_self_distill-2x"}
    assert set(entries) == models | {"shapes-vqa/majority", "shapes-vqa/text_only"}
    assert report["majority_baseline"]["shapes-vqa"] == entries["shapes-vqa/majority"]["metric"] > 0
    assert report["text_only_baseline"]["shapes-vqa"] == entries["shapes-vqa/text_only"]["metric"] > 0
    fields = {"name", "kind", "task", "metric_name", "metric", "mmacs_mean", "gflops_mean", "flops_ratio",
              "latency_ms_bs1",
              "throughput", "keep", "model_dir", "mlflow_run_id", "speedup", "permuted_metric", "permuted_changed",
              "focus", "start", "by_kind"}
    for name, e in entries.items():
        assert fields <= set(e), name
        if e["kind"] == "prior":
            continue
        assert e["metric_name"] == "vqa_score" and 0 <= e["metric"] <= 1 and e["gflops_mean"] > 0
        assert e["latency_ms_bs1"] > 0 and e["throughput"] > 0 and Path(e["model_dir"], "config.json").is_file()
        assert e["speedup"]["flops"] == pytest.approx(1 / e["flops_ratio"]) and e["speedup"]["latency_bs1"] > 0
        assert 0 <= e["permuted_changed"] <= 1 and 0 <= e["permuted_metric"] <= 1
        assert e["focus"]["chance"] > 0 and e["start"] == "scratch", name  # meter-tiny without a checkpoint
        assert {"attribute/color", "exists"} <= set(e["by_kind"]), name
        assert all(k["text_only_baseline"] is not None and "permuted_metric" in k for k in e["by_kind"].values())
    assert entries["shapes-vqa/backbone"]["flops_ratio"] == 1.0 and entries["shapes-vqa/backbone"]["keep"] == {}
    assert entries["shapes-vqa/backbone"]["focus"]["lift"] == pytest.approx(1.0)
    for name in ("smarttrim-2x", "smarttrim-1.5x", "no_self_distill-2x", "local-2x"):
        e = entries[f"shapes-vqa/{name}"]
        assert set(e["keep"]) == {"vision_tokens", "text_tokens", "heads"}, name
        # 16 tiny steps move the cross-modal trimmers off stable init; the local one may still keep all (and then
        # costs its own score networks' MACs on top of the backbone's)
        assert e["flops_ratio"] < (1.0 if name != "local-2x" else 1.05), name
    assert entries["shapes-vqa/smarttrim-2x"]["kind"] == "smarttrim"
    assert entries["shapes-vqa/no_self_distill-2x"]["kind"] == "ablation"
    assert entries["shapes-vqa/local-2x"]["kind"] == "baseline"
    md = (run_dir / "report.md").read_text()
    assert "main results" in md and "ablations at target 2x" in md and "| smarttrim-2x |" in md
    assert "text-only (best answer per question text)" in md and "does the text guide the trimming?" in md
    assert "vqa_score per question kind" in md and "| attribute/color |" in md
    assert "Start: every model is fine-tuned once from scratch" in md
    assert (run_dir / "pareto.png").stat().st_size > 10_000
    assert not (ROOT / "mlruns").exists(), "MLflow artifacts stay in the run directory"
    assert len(list((run_dir / "mlflow-artifacts").rglob("curves.png"))) == 5
    history = [json.loads(line) for line in next((run_dir / "finetune").glob("*backbone*/history.jsonl"))
               .read_text().splitlines()]
    assert any("val/metric" in row for row in history), "the curves show the validation metric"

    runs = _mlflow_runs(run_dir)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 5 and len(runs) == 6
    by_id = {r.info.run_id: r for r in runs}
    for e in entries.values():
        if e["kind"] != "prior":
            child = by_id[e["mlflow_run_id"]]
            assert child.data.metrics["vqa_score"] == pytest.approx(e["metric"])
            assert child.data.metrics["mmacs"] == pytest.approx(e["mmacs_mean"]) == e["gflops_mean"] * 1000
            assert child.data.metrics["flops_ratio"] == pytest.approx(e["flops_ratio"])
            assert child.data.metrics["speedup_latency_bs1"] == pytest.approx(e["speedup"]["latency_bs1"])
            assert child.data.metrics["kind/exists/metric"] == pytest.approx(e["by_kind"]["exists"]["metric"])
            assert "finetune.train.lr" in child.data.params

    markers = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.done.json")}
    assert len(markers) == 1 + 5 + 5 * 2
    start = time.monotonic()
    again = _pipeline(tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert time.monotonic() - start < 60
    assert again.stdout.count(": cached") == len(markers) and ": running" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.done.json")} == markers
    rerun = _mlflow_runs(run_dir)
    assert len(rerun) == 6, "a cached rerun logs nothing twice"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    child = entries["shapes-vqa/smarttrim-2x"]["mlflow_run_id"]
    assert len(client.get_metric_history(child, "flops_ratio")) == 1
    forced = _pipeline(tmp_path, "--force", "profile/shapes-vqa/backbone")
    assert forced.returncode == 0 and forced.stdout.count(": cached") == len(markers) - 1


def test_mlflow_runs_are_logged_live_with_the_commit_the_kind_and_a_folder_per_stage(
        tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    import mlflow

    run_dir = tiny_run[0] / "quickstart"
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smarttrim")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "the model-training view, not GenAI"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if "smarttrim.pipeline_key" in r.data.tags)
    commit = parent.data.tags["mlflow.source.git.commit"]
    kind = subprocess.run(["git", "cat-file", "-t", commit], cwd=ROOT, capture_output=True, text=True).stdout
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and kind.strip() == "commit", commit
    assert parent.data.tags["smarttrim.git_dirty"] in ("true", "false")
    assert parent.data.params["name"] == "quickstart" and "targets" in parent.data.params  # the config
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5
    for child in children:
        name, run_id = child.info.run_name, child.info.run_id
        assert child.data.tags["mlflow.source.git.commit"] == commit, name
        marker = json.loads(next((run_dir / "finetune").glob(f"{child.data.tags['smarttrim.model_key']}.done.json"))
                            .read_text())
        loss = client.get_metric_history(run_id, "train/loss")
        steps, stamps = [m.step for m in loss], [m.timestamp for m in loss]
        assert steps == sorted(set(steps)) and steps[-1] == marker["metrics"]["steps"] and len(steps) >= 4, name
        # logged as measured: a time per row, spread over the training, before the evaluation and the report
        assert len(set(stamps)) == len(stamps) and stamps == sorted(stamps), (name, stamps)
        assert (stamps[-1] - stamps[0]) / 1000 > 0.25 * marker["metrics"]["train_seconds"], (name, stamps)
        val = client.get_metric_history(run_id, "val/metric")
        assert [m.step for m in val][-1] == steps[-1], name
        evaluated = client.get_metric_history(run_id, "vqa_score")[0].timestamp
        reported = client.get_metric_history(run_id, "flops_ratio")[0].timestamp
        assert stamps[-1] <= evaluated <= reported, name
        folders = {a.path for a in client.list_artifacts(run_id)}
        assert folders == {"finetune", "evaluate", "profile"}, (name, folders)
        assert {a.path for a in client.list_artifacts(run_id, "finetune")} >= {
            "finetune/metrics.json", "finetune/curves.png", "finetune/history.jsonl"}
        assert [a.path for a in client.list_artifacts(run_id, "evaluate")] == ["evaluate/metrics.json"]
        assert {a.path for a in client.list_artifacts(run_id, "profile")} == {"profile/profile.json",
                                                                              "profile/flops_hist.png"}


def test_pipeline_log_reports_each_stage_with_its_own_run_time(
        tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir = tiny_run[0] / "quickstart"
    lines = (run_dir / "pipeline.log").read_text().splitlines()
    record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*")
    assert lines and all(record.fullmatch(line) for line in lines), [x for x in lines if not record.fullmatch(x)]
    markers = [json.loads(p.read_text()) for p in run_dir.rglob("*.done.json")]
    assert len(markers) == 16
    for marker in markers:  # the last "done" line of each stage (a forced rerun appends one) is its marker's time
        done = [line for line in lines if f"[pipeline] {marker['id']}: done in " in line]
        assert done, marker["id"]
        seconds = float(re.search(r": done in ([\d.]+) s \(waited [\d.]+ s", done[-1]).group(1))
        assert seconds == round(marker["seconds"], 1), (marker["id"], done[-1], marker["seconds"])
    assert any(": cached" in line for line in lines), "the reruns' cached stages are in the log too"


def test_progress_lines_name_the_model_and_checkpoints_stay_quiet(
        tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out = tiny_run[1].stdout + tiny_run[1].stderr
    steps = re.findall(r"\[finetune ([\w./-]+)\] step (\d+)/(\d+) epoch .* samples/s, ETA (\d+[smh]\S*)", out)
    models = {"backbone", "smarttrim-2x", "smarttrim-1.5x", "local-2x", "no_self_distill-2x"}
    assert {name for name, *_ in steps} == {f"shapes-vqa/{m}" for m in models}
    for name in models:  # every logged row of every model is shown (none folded by Ray's deduplication)
        total, every = (40, 8) if name == "backbone" else (16, 4)  # max_steps, log_every of TINY
        shown = sorted(int(s) for n, s, t, _ in steps if n == f"shapes-vqa/{name}" and int(t) == total)
        assert shown == list(range(every, total + 1, every)), (name, shown)
        assert f"[finetune shapes-vqa/{name}] step {total} validation" in out
        assert f"[evaluate shapes-vqa/{name}] val: 40 instances in " in out
        assert f"[profile shapes-vqa/{name}] val: MACs of 4 instances in " in out
    assert "[shard shapes-vqa] train: 320 samples in " in out
    assert "TrainingReport(" not in out and "Checkpoint successfully created" not in out


def test_killed_pipeline_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    run_dir = tmp_path / "quickstart"
    args = [sys.executable, "-m", "pipeline.run", "finetune", "--config", "pipeline/configs/quickstart.yaml",
            f"runs_dir={tmp_path}", *TINY, "tasks.0.smarttrim.max_steps=48", "smarttrim_start=backbone"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:  # wait until the backbone is done and a SmartTrim fine-tuning has a registered checkpoint
        while time.monotonic() < deadline:
            snapshots = list((run_dir / "finetune").glob("*smarttrim*.ray/*/checkpoint_manager_snapshot.json"))
            if snapshots and any(json.loads(s.read_text())["checkpoint_results"] for s in snapshots):
                break
            assert proc.poll() is None, "the pipeline ended before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError("no SmartTrim checkpoint within 10 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.done.json")}
    assert any("backbone" in p.name for p in finished) and not any("smarttrim" in p.name for p in finished)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "finished stages are not redone"
    resumed = [json.loads(m.read_text()) for m in run_dir.glob("finetune/*smarttrim*.done.json")]
    assert len(resumed) == 2 and any(r["metrics"]["resumes"] for r in resumed), "a fine-tuning resumed"
    assert all(r["metrics"]["steps"] == 48 for r in resumed)


def test_sweep_yields_a_pareto_front_and_mlflow_children(tmp_path: Path) -> None:
    done = _pipeline(tmp_path, "sweep.space={token_target_vision: {grid: [0.2, 0.6]}}", "sweep.asha=true",
                     "sweep.rungs=2", command="sweep")
    assert done.returncode == 0, done.stderr[-4000:]
    (front_file,) = (tmp_path / "quickstart" / "sweep").glob("*/pareto.json")
    result = json.loads(front_file.read_text())
    assert len(result["trials"]) == 2 and 1 <= len(result["pareto_front"]) <= 2
    assert {t["params"]["token_target_vision"] for t in result["trials"]} == {0.2, 0.6}
    assert all(t["gflops"] > 0 and 0 <= t["metric"] <= 1 for t in result["trials"])
    cheap = min(result["trials"], key=lambda t: t["gflops"])
    assert cheap["params"]["token_target_vision"] == 0.2, "a lower vision target costs fewer FLOPs"
    assert (front_file.parent / "pareto.png").stat().st_size > 5_000
    runs = _mlflow_runs(tmp_path / "quickstart")
    parent = next(r for r in runs if r.data.tags.get("smarttrim.pipeline_key", "").startswith("sweep-"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("metric" in c.data.metrics for c in children)
