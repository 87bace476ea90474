"""Publishing a pre-trained model: the export of ``pipeline.run pretrain`` copied to a stable place (the
repository ships one, ``pretrained/meter-small-shapes``) with ``PRETRAINING.json``, the record that makes it
reproducible and checkable: the command and configuration that made it, the sha256 of every file, how long it
trained, and what it measures (ITM accuracy with hard negatives, MLM accuracy) on the whole validation split
and, exactly, on its first ``CHECK_SAMPLES`` samples (what ``tests/test_pretrained.py`` recomputes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.plan import Stage
from smarttrim.atomic import replace_dir, temp_dir_beside

RECORD = "PRETRAINING.json"
CHECK_SAMPLES = 128
"""Validation samples re-evaluated exactly by the shipped checkpoint's test."""


def sha256_files(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (relative POSIX paths, sorted), the record excluded."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != RECORD}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_state() -> dict[str, Any]:
    """The commit the code came from and whether tracked files differed from it (then the record describes the
    working tree, not the commit)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD") or None, "git_dirty": None if status is None else bool(status)}


def publish(cfg: PipelineConfig, shard: Stage, pre: Stage, dest: Path, command: str) -> Path:
    """Copy ``pre``'s exported model to ``dest`` (replaced atomically) and write its ``PRETRAINING.json``."""
    from stages.pretrain import evaluate_pretraining

    assert cfg.pretrain is not None
    export = pre.out / "model"
    metrics = json.loads((pre.out / "metrics.json").read_text())
    check = evaluate_pretraining(export, shard.config.out, cfg.pretrain.val_split, limit=CHECK_SAMPLES,
                                 batch_size=CHECK_SAMPLES)
    shards = json.loads((Path(shard.config.out) / "manifest.json").read_text())
    tmp = temp_dir_beside(dest)
    try:
        shutil.copytree(export, tmp, dirs_exist_ok=True)
        record: dict[str, Any] = {
            "what": "a backbone pre-trained with METER's objectives (MLM + ITM with hard negatives)"
                    + (f" and the supervised visual objective on the scenes' object labels (vision_weight="
                       f"{cfg.pretrain.vision_weight})" if cfg.pretrain.vision_weight else "")
                    + "; start fine-tunings from it with model.pretrained / FinetuneConfig.pretrained",
            "command": command, **_git_state(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
            "config": {"model": cfg.to_dict()["model"], "pretrain": cfg.to_dict()["pretrain"],
                       "compute": cfg.to_dict()["compute"]},
            "data": {"source": shards["source"], "task": shards["task"], "config": shards["config"],
                     "samples": {s: v["samples"] for s, v in shards["splits"].items()}},
            "training": {k: metrics[k] for k in ("steps", "samples", "train_seconds", "samples_per_s", "world_size",
                                                 "final") if k in metrics},
            "evaluation": metrics["evaluation"],
            "check": {**check, "batch_size": CHECK_SAMPLES,
                      "note": "recomputed exactly by tests/test_pretrained.py on the first samples of the split"},
            "sha256": sha256_files(tmp),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


__all__ = ["CHECK_SAMPLES", "RECORD", "publish", "sha256_files"]
