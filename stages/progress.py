"""Progress lines of the stages, and where a training sends its curves while it runs.

A stage runs in a Ray task or a Ray Train worker whose stdout Ray forwards to the driver's console, so progress is
plain lines on stdout (``say``), each naming the stage and what it works on: ``[evaluate shapes-vqa/backbone] val:
320/600 instances, 41.2/s, ETA 8s``. ``Progress`` prints one every ``PROGRESS_EVERY_S`` seconds of a long loop (none
for a loop shorter than that) and a last one when it ends; ``eta`` formats the remaining time measured from the
work done so far.

Ray shapes what reaches the console: ``quiet_ray_logs`` (called by the pipeline's driver and the training stages'
command lines before Ray is imported) sets two of Ray's documented log-deduplication variables, read when Ray is
imported, unless the environment sets them already:

* ``RAY_DEDUP_LOGS_ALLOW_REGEX``: progress lines (``[finetune ...]``, ``[evaluate ...]``, ...) are never folded. Ray
  folds lines of different processes that differ only in words with digits into one ``[repeated 2x across
  cluster]``: the step lines of ``smarttrim-2x`` and ``smarttrim-1.5x`` would be.
* ``RAY_DEDUP_LOGS_SKIP_REGEX`` (unless verbose): drops the two lines Ray Train's workers log at every checkpoint,
  ``Reporting training result N: TrainingReport(checkpoint=..., metrics={...the whole row...})`` and ``Checkpoint
  successfully created at: ...``. Ray Train's verbosity setting (``RunConfig(logging_config=LoggingConfig(...))``)
  cannot: Ray 2.60 logs the first from a logger named by its file path (``logging.getLogger(__file__)`` in
  ``ray/train/v2/_internal/execution/context.py``), outside the ``ray.train`` names that setting filters. Only
  those INFO lines match; Ray Train's warnings and errors still show.

``MetricsSink`` is what ``stages.finetune`` accepts to log its curves live (the pipeline passes one writing to the
model's MLflow run, ``pipeline.tracking.LiveRun``); the stages themselves know nothing of MLflow, and without a
sink (a stage run on its own) nothing is tracked.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Protocol

PROGRESS_PATTERN = r"\[(pipeline|shard|pretrain|finetune|evaluate|profile|sweep)[ \]]"
"""Lines Ray's log deduplication must never fold (``RAY_DEDUP_LOGS_ALLOW_REGEX``)."""
CHECKPOINT_CHATTER = r"Reporting training result \d+: TrainingReport\(|Checkpoint successfully created at: "
"""Ray Train's per-checkpoint INFO lines (``RAY_DEDUP_LOGS_SKIP_REGEX`` unless verbose)."""
PROGRESS_EVERY_S = float(os.environ.get("SMARTTRIM_PROGRESS_EVERY_S", "10"))
"""Seconds between two progress lines of a loop (``SMARTTRIM_PROGRESS_EVERY_S`` overrides)."""


def say(line: str) -> None:
    """One progress line on stdout, flushed (Ray forwards it to the driver). Not ``print``: Ray Train patches it in
    its workers to go through its logger, and the driver then shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ray_log_settings(verbose: bool = False) -> dict[str, str]:
    """Ray's log-deduplication variables for progress without checkpoint chatter (``verbose``: with it)."""
    settings = {"RAY_DEDUP_LOGS_ALLOW_REGEX": PROGRESS_PATTERN}
    if not verbose:
        settings["RAY_DEDUP_LOGS_SKIP_REGEX"] = CHECKPOINT_CHATTER
    return settings


def quiet_ray_logs(verbose: bool = False) -> None:
    """Set ``ray_log_settings`` where the environment does not set them (before Ray is imported, which reads them)."""
    for key, value in ray_log_settings(verbose).items():
        os.environ.setdefault(key, value)


def eta(seconds: float) -> str:
    """A duration as people read it: ``8s``, ``1m20s``, ``2h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Periodic progress of a loop over ``total`` items (None: unknown, no ETA): ``update(done)`` after each chunk
    prints ``<prefix> <done>/<total> <unit>, <rate>/s, ETA <t>`` when ``every_s`` seconds have passed since the
    last line; ``finish()`` prints ``<prefix> <done> <unit> in <t>``."""

    def __init__(self, prefix: str, total: int | None, unit: str, every_s: float | None = None) -> None:
        self.prefix, self.total, self.unit = prefix, total, unit
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = done / (now - self.start) if now > self.start else 0.0
        line = f"{self.prefix} {done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}, {rate:.1f}/s"
        if self.total and rate > 0:
            line += f", ETA {eta((self.total - done) / rate)}"
        say(line)

    def finish(self, note: str = "") -> None:
        took = time.perf_counter() - self.start
        say(f"{self.prefix} {self.done} {self.unit} in {f'{took:.1f}s' if took < 60 else eta(took)}{note}")


class MetricsSink(Protocol):
    """Receives a training's curve points while it runs (rank 0 only). Implementations must not raise (a tracking
    problem must not fail a training) nor block for long, and must be picklable (they travel to Ray Train workers)."""

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """One curve point: ``values`` keyed as in ``history.jsonl`` (``loss``, ``keep/heads``, ``val/metric``)."""

    def close(self) -> None:
        """Send what is still buffered (called once, when the training loop ends)."""


__all__ = ["CHECKPOINT_CHATTER", "PROGRESS_EVERY_S", "PROGRESS_PATTERN", "MetricsSink", "Progress", "eta",
           "quiet_ray_logs", "ray_log_settings", "say"]
