"""Run a stage graph on Ray: plain ``@ray.remote`` tasks wired by ObjectRefs.

A stage whose marker exists is cached and not submitted. The others become tasks whose arguments include
their dependencies' refs, so Ray starts each as soon as its inputs are done and resources allow:
independent branches (SmartTrim targets, ablations, evaluations) run in parallel as far as the cluster fits.
Fine-tuning tasks reserve no CPU themselves (their Ray Train workers do); profiling reserves
``profile.cpus`` so latency is measured undisturbed; evaluation and profiling reserve a GPU when their
``device`` is ``cuda`` (or ``auto`` on a cluster with GPUs).

The driver logs each stage's state (``pipeline.logs``): cached; done, with the stage's own run time (its marker's
``seconds``) and the time it waited before that (for its inputs and resources); or failed. The stages print their
progress (training steps with an ETA, evaluation batches), named by model; Ray forwards it.

With ``tracking`` (``pipeline.tracking.LiveTracking``), a training's MLflow run is made (or found, when it resumes)
before the stage is submitted and handed to its task as an argument beside the stage (not in its config, whose
content key stays as it is), its rank 0 logs the curves as they come, and each finished stage's metrics and files go
to its model's run; every task gets the driver's ``MLFLOW_*`` variables in its ``runtime_env``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.plan import Stage
from smarttrim.atomic import atomic_write

if TYPE_CHECKING:
    from pipeline.tracking import LiveTracking
    from stages.progress import MetricsSink

LOG = logging.getLogger("pipeline")


def stage_label(stage: Stage) -> str:
    """What a stage's progress lines call what it works on: its id without the kind (``shapes-vqa/smarttrim-2x``)."""
    return stage.id.partition("/")[2] or stage.id


def run_stage(stage: Stage, sink: MetricsSink | None = None) -> dict[str, Any]:
    """Run one stage in this process and write its marker; returns the marker's content. ``sink``: where a
    training logs its curves live (``stages.progress.MetricsSink``)."""
    from pipeline.logs import task_logging
    from stages import evaluate, finetune, pretrain, profile, shard

    task_logging()
    start = time.perf_counter()
    LOG.info(f"[pipeline] {stage.id}: running")
    if stage.mirror is not None:  # a staged run: this node's copies of the inputs are made the stored ones
        for path in stage.inputs:
            stage.mirror.pull(path)
    label = stage_label(stage)
    runner: dict[str, Callable[[Any], Any]] = {
        "shard": lambda c: shard.run(c, label), "finetune": lambda c: finetune.run(c, label, sink),
        "evaluate": lambda c: evaluate.run(c, label), "profile": lambda c: profile.run(c, label),
        "pretrain": lambda c: pretrain.run(c, c.val_split or "val", label, sink)}
    result = runner[stage.kind](stage.config)
    metrics = result.manifest if stage.kind == "shard" else result.metrics
    marker = {"id": stage.id, "out": str(stage.out), "seconds": time.perf_counter() - start, "node": _node(),
              "metrics": _summary(stage.kind, metrics)}
    text = json.dumps(marker, indent=2) + "\n"
    atomic_write(stage.marker, lambda tmp: Path(tmp).write_text(text))
    if stage.mirror is not None:
        stage.mirror.publish(stage.out, text)
    return marker


def _node() -> str | None:
    """The Ray node this process runs on (None outside Ray), recorded in each marker: where a stage ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _summary(kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the report needs from a stage's metrics (the full files stay in its output directory)."""
    if kind == "shard":
        return {"task": metrics["task"], "majority_baseline": metrics.get("majority_baseline"),
                "text_only_baseline": metrics.get("text_only_baseline"),
                "samples": {s: v["samples"] for s, v in metrics["splits"].items()}}
    if kind in ("finetune", "pretrain"):
        keys = ("steps", "samples", "train_seconds", "samples_per_s", "final", "resumes", "evaluation")
        return {k: metrics[k] for k in keys if k in metrics}
    if kind == "evaluate":
        return {k: v for k, v in metrics.items() if k not in ("config",)}
    return {k: v for k, v in metrics.items() if k in ("flops", "latency_ms_bs1", "throughput", "device", "threads",
                                                      "instances", "speedup", "backbone_latency_ms_bs1",
                                                      "backbone_throughput")}


TRAINING_KINDS = ("finetune", "pretrain")
"""Stages that start a Ray Train run (their task reserves no CPU, their workers do)."""
WAIT_FOR_RESOURCES_S = "86400"
"""Ray Train's worker-group start timeout inside the pipeline: a fine-tuning queued behind others waits for
its CPUs/GPUs instead of failing after Ray's default 60 s."""


def stage_gpus(stage: Stage, cluster_gpus: float) -> int:
    """GPUs a measuring stage's task reserves: one for ``device: cuda``, one for ``auto`` when the cluster has GPUs
    (Ray then sets the task's ``CUDA_VISIBLE_DEVICES``), none on CPU. Fine-tunings reserve theirs per Ray Train
    worker (``compute.use_gpu``)."""
    device = getattr(stage.config, "device", "cpu") if stage.kind in ("evaluate", "profile") else "cpu"
    return int(device == "cuda" or (device == "auto" and cluster_gpus >= 1))


def _remote_options(stage: Stage, profile_cpus: int, cluster_gpus: float = 0.0) -> dict[str, Any]:
    cpus = {"shard": 1, "finetune": 0, "pretrain": 0, "evaluate": 1, "profile": profile_cpus}[stage.kind]
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": stage_gpus(stage, cluster_gpus), "max_retries": 0,
                               "name": stage.id}
    if stage.kind in TRAINING_KINDS:  # inherited by the Ray Train controller the task starts
        options["runtime_env"] = {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WAIT_FOR_RESOURCES_S}}
    return options


def finetune_slots(stage: Stage) -> int:
    """How many fine-tunings like ``stage`` the connected cluster runs at once (by CPUs, or GPUs)."""
    import ray

    c = stage.config
    total = ray.cluster_resources()
    if c.use_gpu:
        return max(1, int(total.get("GPU", 0)) // c.num_workers)
    return max(1, int(total.get("CPU", 1)) // (c.num_workers * c.cpus_per_worker))


def with_env(options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Ray task ``options`` whose ``runtime_env`` also sets ``env`` (the options' own variables win)."""
    if not env:
        return options
    runtime = dict(options.get("runtime_env") or {})
    runtime["env_vars"] = {**env, **(runtime.get("env_vars") or {})}
    return {**options, "runtime_env": runtime}


def execute(stages: list[Stage], profile_cpus: int = 1, force: tuple[str, ...] = (),
            on_done: Callable[[Stage, dict[str, Any]], None] | None = None,
            tracking: LiveTracking | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (dependencies first) on the connected Ray cluster; returns id -> marker for every
    stage that is done. ``force``: stage ids or kinds to recompute. Fine-tunings are submitted only as many
    at once as the cluster fits (the rest wait in the driver, not as idle Ray Train controllers). ``tracking``:
    the models' MLflow runs, logged while the stages run (see the module docstring). Raises ``PipelineError``
    listing the failed stages after the independent ones have finished."""
    for stage in stages:
        if stage.id in force or stage.kind in force:
            clear(stage)
    markers: dict[str, dict[str, Any]] = {}
    queue: list[Stage] = []
    for stage in stages:
        if stage.done():
            markers[stage.id] = stage.read_marker()
            LOG.info(f"[pipeline] {stage.id}: cached")
            if on_done:
                on_done(stage, markers[stage.id])
        else:
            queue.append(stage)
    if not queue:
        return markers
    import ray

    remote = ray.remote(_run_remote)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    refs: dict[str, Any] = {}
    pending: dict[Any, Stage] = {}
    started: dict[str, float] = {}
    failed: dict[str, str] = {}

    def submit_ready() -> None:
        running = sum(1 for s in pending.values() if s.kind in TRAINING_KINDS)
        for stage in list(queue):
            if any(d not in refs and d not in markers for d in stage.deps):
                continue  # an input is still queued
            if stage.kind in TRAINING_KINDS and running >= finetune_slots(stage):
                continue
            deps = [refs[d] for d in stage.deps if d in refs]
            sink = tracking.submit(stage) if tracking is not None else None
            env = {**(tracking.env() if tracking else {}), **stage_env(stage)}
            options = with_env(_remote_options(stage, profile_cpus, cluster_gpus), env)
            ref = remote.options(**options).remote(stage, *deps, sink=sink)
            LOG.debug(f"[pipeline] {stage.id}: submitted")
            refs[stage.id], pending[ref] = ref, stage
            started[stage.id] = time.perf_counter()
            running += stage.kind in TRAINING_KINDS
            queue.remove(stage)

    submit_ready()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        stage = pending.pop(ready[0])
        elapsed = time.perf_counter() - started[stage.id]
        try:
            markers[stage.id] = ray.get(ready[0])
        except Exception as err:  # a stage failed, or one it depends on
            failed[stage.id] = _root_cause(err)
            LOG.error(f"[pipeline] {stage.id}: failed after {elapsed:.1f} s: {failed[stage.id]}")
            if tracking is not None:
                tracking.failed(stage)
        else:
            LOG.info(f"[pipeline] {stage.id}: {timing(markers[stage.id]['seconds'], elapsed)}")
            fetch_summary(stage)
            if tracking is not None:
                tracking.done(stage, markers[stage.id])
            if on_done:
                on_done(stage, markers[stage.id])
        submit_ready()
    for stage in queue:  # never submitted: an input failed
        failed[stage.id] = "not run: an input stage failed"
    if failed:
        raise PipelineError(failed)
    return markers


def stage_env(stage: Stage) -> dict[str, str]:
    """Environment of a stage's Ray task: a staged run's mirror, for the processes the stage starts (Ray Train
    workers on other nodes fetch their inputs with ``pipeline.storage.localize``)."""
    from pipeline.storage import MIRROR_ENV

    return {MIRROR_ENV: stage.mirror.to_env()} if stage.mirror is not None else {}


def fetch_summary(stage: Stage) -> None:
    """On the driver of a staged run: fetch a finished stage's own files (metrics, curves; not its weights) into
    the local copy, for MLflow and the report. A no-op when ``runs_dir`` is read in place."""
    if stage.mirror is not None:
        stage.mirror.pull(stage.out, top_only=True)


def timing(seconds: float, elapsed: float) -> str:
    """``done in <run time> s (waited <rest> s for inputs and a worker)``: a stage's own run time is its marker's
    ``seconds``; the rest of the time since it was submitted it waited (for its inputs, which Ray resolves before
    it starts, for resources, for a worker process)."""
    return f"done in {seconds:.1f} s (waited {max(0.0, elapsed - seconds):.1f} s for inputs and a worker)"


def _run_remote(stage: Stage, *deps: Any, sink: MetricsSink | None = None) -> dict[str, Any]:
    return run_stage(stage, sink)


def _root_cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def clear(stage: Stage) -> None:
    """Forget a stage's result (``--force``): its marker, its output and, for training, its checkpoints."""
    if stage.mirror is not None:  # the stored marker first: an interrupted clear leaves the stage not done
        stage.mirror.delete(stage.marker)
        stage.mirror.delete(stage.out)
    stage.marker.unlink(missing_ok=True)
    shutil.rmtree(stage.out, ignore_errors=True)
    if stage.kind in TRAINING_KINDS:
        from stages.finetune_config import delete_run_storage

        delete_run_storage(stage.config)


class PipelineError(RuntimeError):
    """Some stages failed; the others finished (their results are cached for the rerun)."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        lines = "\n".join(f"  {sid}: {why}" for sid, why in failed.items())
        super().__init__(f"{len(failed)} stage(s) failed:\n{lines}")


__all__ = ["PipelineError", "clear", "execute", "fetch_summary", "run_stage", "stage_env", "stage_label", "timing",
           "with_env"]
