"""Run a stage graph on Ray: plain ``@ray.remote`` tasks wired by ObjectRefs.

A stage whose marker exists is cached and not submitted. The others become tasks whose arguments include
their dependencies' refs, so Ray starts each as soon as its inputs are done and resources allow:
independent branches (SmartTrim targets, ablations, evaluations) run in parallel as far as the cluster fits.
Fine-tuning tasks reserve no CPU themselves (their Ray Train workers do); profiling reserves
``profile.cpus`` so latency is measured undisturbed. The driver prints each stage's state (cached / running /
done / failed) with its elapsed time; training progress (loss, keep ratios) comes from the workers' logs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.plan import Stage
from smarttrim.atomic import atomic_write


def run_stage(stage: Stage) -> dict[str, Any]:
    """Run one stage in this process and write its marker; returns the marker's content."""
    from stages import evaluate, finetune, pretrain, profile, shard

    start = time.perf_counter()
    print(f"[pipeline] {stage.id}: running", flush=True)
    runner: dict[str, Callable[[Any], Any]] = {
        "shard": shard.run, "finetune": finetune.run, "evaluate": evaluate.run, "profile": profile.run,
        "pretrain": lambda c: pretrain.run(c, c.val_split or "val")}
    result = runner[stage.kind](stage.config)
    metrics = result.manifest if stage.kind == "shard" else result.metrics
    marker = {"id": stage.id, "out": str(stage.out), "seconds": time.perf_counter() - start,
              "metrics": _summary(stage.kind, metrics)}
    atomic_write(stage.marker, lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=2) + "\n"))
    return marker


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


def _remote_options(stage: Stage, profile_cpus: int) -> dict[str, Any]:
    cpus = {"shard": 1, "finetune": 0, "pretrain": 0, "evaluate": 1, "profile": profile_cpus}[stage.kind]
    options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 0, "name": stage.id}
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


def execute(stages: list[Stage], profile_cpus: int = 1, force: tuple[str, ...] = (),
            on_done: Callable[[Stage, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (dependencies first) on the connected Ray cluster; returns id -> marker for every
    stage that is done. ``force``: stage ids or kinds to recompute. Fine-tunings are submitted only as many
    at once as the cluster fits (the rest wait in the driver, not as idle Ray Train controllers). Raises
    ``PipelineError`` listing the failed stages after the independent ones have finished."""
    for stage in stages:
        if stage.id in force or stage.kind in force:
            _clear(stage)
    markers: dict[str, dict[str, Any]] = {}
    queue: list[Stage] = []
    for stage in stages:
        if stage.done():
            markers[stage.id] = json.loads(stage.marker.read_text())
            print(f"[pipeline] {stage.id}: cached", flush=True)
            if on_done:
                on_done(stage, markers[stage.id])
        else:
            queue.append(stage)
    if not queue:
        return markers
    import ray

    remote = ray.remote(_run_remote)
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
            ref = remote.options(**_remote_options(stage, profile_cpus)).remote(stage, *deps)
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
            print(f"[pipeline] {stage.id}: failed after {elapsed:.1f} s: {failed[stage.id]}", flush=True)
        else:
            print(f"[pipeline] {stage.id}: done in {elapsed:.1f} s", flush=True)
            if on_done:
                on_done(stage, markers[stage.id])
        submit_ready()
    for stage in queue:  # never submitted: an input failed
        failed[stage.id] = "not run: an input stage failed"
    if failed:
        raise PipelineError(failed)
    return markers


def _run_remote(stage: Stage, *deps: Any) -> dict[str, Any]:
    return run_stage(stage)


def _root_cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def _clear(stage: Stage) -> None:
    """Forget a stage's result (``--force``): its marker, its output and, for training, its checkpoints."""
    stage.marker.unlink(missing_ok=True)
    shutil.rmtree(stage.out, ignore_errors=True)
    if stage.kind in TRAINING_KINDS:
        shutil.rmtree(stage.config.storage_path, ignore_errors=True)


class PipelineError(RuntimeError):
    """Some stages failed; the others finished (their results are cached for the rerun)."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        lines = "\n".join(f"  {sid}: {why}" for sid, why in failed.items())
        super().__init__(f"{len(failed)} stage(s) failed:\n{lines}")


__all__ = ["PipelineError", "execute", "run_stage"]
