"""The pipeline's stage graph: which stages a config needs, their configs, inputs and cached output dirs.

Every stage's output directory is named by a content hash of its kind and configuration, and the
configuration holds its inputs' output directories (themselves content-addressed), so a key changes when
anything upstream changes. A stage is done when its marker ``<out>.done.json`` exists (written last, after
the stage's own atomic write).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ABLATIONS, PipelineConfig, TargetConfig, TaskConfig
from stages.evaluate import EvaluateConfig
from stages.finetune_config import FinetuneConfig
from stages.profile import ProfileConfig
from stages.shard import ShardConfig

KINDS = ("shard", "finetune", "evaluate", "profile")


@dataclass(frozen=True)
class Stage:
    """One node of the graph."""

    id: str
    """Unique and readable, e.g. ``finetune/shapes-vqa/smarttrim-2x``."""
    kind: str
    config: Any
    """The stage's config dataclass (``ShardConfig``, ``FinetuneConfig``, ``EvaluateConfig``, ``ProfileConfig``)."""
    deps: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    """For the report: task, model name and kind (backbone | smarttrim | ablation), target."""

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def marker(self) -> Path:
        return self.out.with_name(self.out.name + ".done.json")

    def done(self) -> bool:
        return self.marker.is_file()


def _config_dict(cfg: Any) -> dict[str, Any]:
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return json.loads(json.dumps(data, default=str))


def stage_key(kind: str, cfg: Any) -> str:
    """Content hash of a stage: its kind and its whole config except the output path."""
    data = {k: v for k, v in _config_dict(cfg).items() if k != "out"}
    return hashlib.sha256(json.dumps({"kind": kind, "config": data}, sort_keys=True).encode()).hexdigest()[:12]


def _placed(kind: str, label: str, cfg: Any, root: Path) -> Any:
    """``cfg`` with its ``out`` set to ``<root>/<kind>/<label>-<key>``."""
    return dataclasses.replace(cfg, out=str(root / kind / f"{label}-{stage_key(kind, cfg)}"))


def smarttrim_trim(base: Any, target: TargetConfig, ablation: str | None = None) -> Any:
    trim = dataclasses.replace(base, token_target_vision=target.token_target_vision,
                               token_target_text=target.token_target_text, head_target=target.head_target)
    return dataclasses.replace(trim, **ABLATIONS[ablation]) if ablation else trim


def finetune_config(cfg: PipelineConfig, task: TaskConfig, shards: str, trim: Any, init: str | None) -> FinetuneConfig:
    c = cfg.compute
    return FinetuneConfig(
        shards=shards, out="", preset=cfg.model.preset, init=init,
        pretrained=cfg.model.pretrained if init is None else None, dropout=cfg.model.dropout,
        image_size=cfg.model.image_size, trim=trim,
        train=task.backbone if trim is None else task.smarttrim, num_workers=c.num_workers, use_gpu=c.use_gpu,
        cpus_per_worker=c.cpus_per_worker, threads=c.threads, deepspeed=c.deepspeed,
        checkpoint_every=c.checkpoint_every, keep_checkpoints=c.keep_checkpoints, max_failures=c.max_failures)


def build_plan(cfg: PipelineConfig, root: Path | None = None) -> list[Stage]:
    """Every stage of ``pipeline.run all``, dependencies before dependents."""
    root = (root or cfg.run_dir).resolve()
    stages: list[Stage] = []
    for task in cfg.tasks:
        d = task.data
        shard = Stage(f"shard/{task.name}", "shard", _placed("shard", task.name, ShardConfig(
            source=d.source, task=d.task, root=d.root, out="", shard_size=d.shard_size, on_error=d.on_error,
            shapes_sizes=d.shapes_sizes, tokenizer=d.tokenizer), root), meta={"task": task.name})
        stages.append(shard)
        shards = shard.config.out
        backbone = _finetune(cfg, task, shards, None, None, "backbone", "backbone", shard.id, root)
        models = [backbone]
        init = str(backbone.out / "model")
        for target in cfg.targets:
            models.append(_finetune(cfg, task, shards, smarttrim_trim(cfg.trim, target), init,
                                    f"smarttrim-{target.name}", "smarttrim", backbone.id, root, target.name))
        if cfg.ablations.target is not None:
            target = next(t for t in cfg.targets if t.name == cfg.ablations.target)
            for variant in cfg.ablations.variants:
                models.append(_finetune(cfg, task, shards, smarttrim_trim(cfg.trim, target, variant), init,
                                        f"{variant}-{target.name}", "ablation", backbone.id, root, target.name))
        stages += models
        for model in models:
            stages += measure_stages(cfg, task, shards, model, root)
    return stages


def _finetune(cfg: PipelineConfig, task: TaskConfig, shards: str, trim: Any, init: str | None, name: str,
              kind: str, dep: str, root: Path, target: str | None = None) -> Stage:
    ft = _placed("finetune", f"{task.name}-{name}", finetune_config(cfg, task, shards, trim, init), root)
    return Stage(f"finetune/{task.name}/{name}", "finetune", ft, (dep,),
                 {"task": task.name, "name": name, "kind": kind, "target": target})


def measure_stages(cfg: PipelineConfig, task: TaskConfig, shards: str, model: Stage, root: Path) -> list[Stage]:
    """Evaluate and profile stages of a trained model (``model``: its finetune stage)."""
    name, model_dir = model.meta["name"], str(model.out / "model")
    e, p = cfg.evaluate, cfg.profile
    ev = _placed("evaluate", f"{task.name}-{name}", EvaluateConfig(
        model=model_dir, shards=shards, out="", split=task.eval_split, threads=e.threads, batch_size=e.batch_size,
        rerank_k=e.rerank_k), root)
    pr = _placed("profile", f"{task.name}-{name}", ProfileConfig(
        model=model_dir, shards=shards, out="", split=task.eval_split, threads=p.threads, instances=p.instances,
        batch_size=p.batch_size), root)
    return [Stage(f"evaluate/{task.name}/{name}", "evaluate", ev, (model.id,), model.meta),
            Stage(f"profile/{task.name}/{name}", "profile", pr, (model.id,), model.meta)]


__all__ = ["KINDS", "Stage", "build_plan", "finetune_config", "measure_stages", "smarttrim_trim", "stage_key"]
