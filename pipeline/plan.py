"""The pipeline's stage graph: which stages a config needs, their configs, inputs and cached output dirs.

Every stage's output directory is named by a content hash of its kind and configuration, and the
configuration holds its inputs' output directories (themselves content-addressed), so a key changes when
anything upstream changes; a pre-trained model given by path enters the key by its weights file's name, size
and modification time. A stage is done when its marker ``<out>.done.json`` exists (written last, after the
stage's own atomic write).

The graph, per task: shard -> fine-tune the backbone from the pre-trained model -> fine-tune SmartTrim at each
target, each ablation and each baseline (from the pre-trained model, the paper's recipe, or from the fine-tuned
backbone: ``smarttrim_start``) -> evaluate and profile each model. With a ``pretrain`` section and no
``model.pretrained``, the graph starts with sharding the caption data and pre-training, and every fine-tuning
starts from that export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ABLATIONS, BASELINES, DataConfig, PipelineConfig, TargetConfig, TaskConfig
from pipeline.storage import Mirror
from smarttrim.config import PRESETS, ModelConfig
from smarttrim.data import shapes
from stages.evaluate import EvaluateConfig
from stages.finetune_config import FinetuneConfig
from stages.profile import ProfileConfig
from stages.shard import ShardConfig

KINDS = ("shard", "pretrain", "finetune", "evaluate", "profile")
PRETRAIN_ID = "pretrain/model"
PRETRAIN_TRAIN_SPLIT = "train"
"""The split pre-training trains on (caption sources: shapes and the Karpathy files name it ``train``)."""


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
    """For the report: task, model name and kind (backbone | smarttrim | ablation | baseline), target, start."""
    inputs: tuple[str, ...] = ()
    """The output directories of ``deps`` (what a staged run fetches into the node's cache before the stage)."""
    mirror: Mirror | None = None
    """Where the run directory is stored when ``runs_dir`` is staged (``pipeline.storage``); markers are read there."""

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def marker(self) -> Path:
        return self.out.with_name(self.out.name + ".done.json")

    def done(self) -> bool:
        return self.mirror.is_file(self.marker) if self.mirror is not None else self.marker.is_file()

    def read_marker(self) -> dict[str, Any]:
        text = self.mirror.read_text(self.marker) if self.mirror is not None else self.marker.read_text()
        return dict(json.loads(text))


def _config_dict(cfg: Any) -> dict[str, Any]:
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return json.loads(json.dumps(data, default=str))


def stage_key(kind: str, cfg: Any, extra: dict[str, Any] | None = None, root: Path | None = None) -> str:
    """Content hash of a stage: its kind, its whole config except the output path, and ``extra`` (facts about
    its inputs that the config does not show, e.g. the identity of a pre-trained model's weights). Paths under
    ``root`` (the run directory: the inputs' output directories) enter relative to it, so a key does not depend on
    where the run directory is (a staged run's node-local copy, ``$SMARTTRIM_CACHE_DIR``, differs between
    machines)."""
    data = {k: v for k, v in _config_dict(cfg).items() if k != "out"}
    blob = {"kind": kind, "config": data, **({"inputs": extra} if extra else {})}
    text = json.dumps(blob, sort_keys=True)
    if root is not None:
        text = text.replace(json.dumps(str(root) + "/")[1:-1], "$RUN_DIR/")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _placed(kind: str, label: str, cfg: Any, root: Path, extra: dict[str, Any] | None = None) -> Any:
    """``cfg`` with its ``out`` set to ``<root>/<kind>/<label>-<key>``."""
    return dataclasses.replace(cfg, out=str(root / kind / f"{label}-{stage_key(kind, cfg, extra, root)}"))


def smarttrim_trim(base: Any, target: TargetConfig, ablation: str | None = None, baseline: str | None = None) -> Any:
    trim = dataclasses.replace(base, token_target_vision=target.token_target_vision,
                               token_target_text=target.token_target_text, head_target=target.head_target)
    if ablation:
        trim = dataclasses.replace(trim, **ABLATIONS[ablation])
    if baseline:
        trim = dataclasses.replace(trim, **BASELINES[baseline])
    return trim


def model_image_size(cfg: PipelineConfig) -> int:
    """The models' input resolution: ``model.image_size``, else the preset's."""
    if cfg.model.image_size is not None:
        return cfg.model.image_size
    preset = PRESETS.get(cfg.model.preset, {})
    return int(preset.get("image_size", ModelConfig.image_size))


def model_vocab_size(cfg: PipelineConfig) -> int:
    """The text vocabulary of the models' preset (a tokenizer trained for them has at most this many entries)."""
    return int(PRESETS.get(cfg.model.preset, {}).get("vocab_size", ModelConfig.vocab_size))


def pretrained_identity(path: str | None) -> dict[str, Any] | None:
    """What changes when a pre-trained model given by path changes: its weights file's name, size and mtime
    (a checkpoint that does not exist yet, e.g. this graph's own pre-training, adds nothing)."""
    if path is None:
        return None
    root = Path(path)
    file = root / "model.safetensors" if root.is_dir() else root
    if not file.is_file():
        return None
    st = file.stat()
    return {"pretrained": {"file": str(file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}}


def model_tokenizer(pretrained: str | None) -> str | None:
    """The tokenizer a pre-trained model directory of ours carries (``<dir>/tokenizer``), if any."""
    if pretrained is None:
        return None
    tok = Path(pretrained) / "tokenizer"
    return str(tok.resolve()) if tok.is_dir() or not Path(pretrained).exists() else None


def finetune_config(cfg: PipelineConfig, task: TaskConfig | None, shards: str, trim: Any, init: str | None,
                    pretrained: str | None, objective: str = "task") -> FinetuneConfig:
    c = cfg.compute
    workers, every, val_samples = c.num_workers, c.checkpoint_every, FinetuneConfig.val_samples
    vision, false_texts = 0.0, FinetuneConfig.false_texts
    if objective == "pretrain":
        assert cfg.pretrain is not None
        train, train_split, val_split = cfg.pretrain.train, PRETRAIN_TRAIN_SPLIT, cfg.pretrain.val_split
        workers, every = cfg.pretrain.num_workers or workers, cfg.pretrain.checkpoint_every or every
        val_samples, vision = cfg.pretrain.val_samples, cfg.pretrain.vision_weight
    else:
        assert task is not None
        train, train_split, val_split = (task.backbone if trim is None else task.smarttrim), task.train_split, \
            task.eval_split
        false_texts = task.false_texts
    return FinetuneConfig(
        shards=shards, out="", train_split=train_split, preset=cfg.model.preset, init=init, pretrained=pretrained,
        dropout=cfg.model.dropout,
        image_size=cfg.model.image_size, trim=trim, train=train, objective=objective, vision_weight=vision,
        val_split=val_split, false_texts=false_texts,
        val_samples=val_samples, num_workers=workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker,
        threads=c.threads, deepspeed=c.deepspeed, checkpoint_every=every, keep_checkpoints=c.keep_checkpoints,
        max_failures=c.max_failures, storage=c.storage or staged_storage(cfg))


def staged_storage(cfg: PipelineConfig) -> str | None:
    """Ray Train's storage when ``runs_dir`` is staged and ``compute.storage`` unset: ``<stored run dir>/checkpoints``
    (every node reaches it, as Ray Train needs; the node-local cache would not do for a multi-node run)."""
    mirror = cfg.mirror
    return f"{mirror.remote}/checkpoints" if mirror is not None else None


def linked(stages: list[Stage], mirror: Mirror | None) -> list[Stage]:
    """``stages`` with each one's ``inputs`` (its dependencies' output directories) and ``mirror`` filled in."""
    outs = {s.id: str(s.out) for s in stages}
    return [dataclasses.replace(s, inputs=tuple(outs[d] for d in s.deps if d in outs), mirror=mirror) for s in stages]


def _shard(cfg: PipelineConfig, data: DataConfig, sid: str, label: str, root: Path, tokenizer: str | None,
           deps: tuple[str, ...], meta: dict[str, Any], train_split: str) -> Stage:
    trains_tokenizer = data.source != "shapes" and not (data.tokenizer or tokenizer)
    shard = ShardConfig(
        source=data.source, task=data.task, root=data.root, out="", shard_size=data.shard_size,
        on_error=data.on_error, shapes_sizes=data.shapes_sizes, tokenizer=data.tokenizer or tokenizer,
        shapes_image_size=data.shapes_image_size or model_image_size(cfg),
        tokenizer_split=train_split if trains_tokenizer else None,
        tokenizer_vocab=model_vocab_size(cfg) if trains_tokenizer else None)
    extra = {"generator": shapes.GENERATOR_VERSION} if data.source == "shapes" else None  # new samples, new key
    return Stage(sid, "shard", _placed("shard", label, shard, root, extra), deps, meta)


def pretrain_stages(cfg: PipelineConfig, root: Path) -> list[Stage]:
    """Shard the pre-training captions, then pre-train (``cfg.pretrain``); the export is ``<out>/model``."""
    assert cfg.pretrain is not None
    shard = _shard(cfg, cfg.pretrain.data, "shard/pretrain", "pretrain", root, None, (), {"task": "pretrain"},
                   PRETRAIN_TRAIN_SPLIT)
    pre = finetune_config(cfg, None, shard.config.out, None, None, None, objective="pretrain")
    return linked([shard, Stage(PRETRAIN_ID, "pretrain", _placed("pretrain", "pretrain", pre, root), (shard.id,),
                                {"task": "pretrain", "name": "pretrain", "kind": "pretrain"})], _mirror(cfg, root))


def _mirror(cfg: PipelineConfig, root: Path) -> Mirror | None:
    """The run's mirror when ``root`` is its (staged) run directory."""
    mirror = cfg.mirror
    return mirror if mirror is not None and Path(mirror.local) == root else None


def build_plan(cfg: PipelineConfig, root: Path | None = None) -> list[Stage]:
    """Every stage of ``pipeline.run all``, dependencies before dependents."""
    root = (root or cfg.run_dir).resolve()
    stages: list[Stage] = []
    pretrained = str(Path(cfg.model.pretrained).resolve()) if cfg.model.pretrained else None
    start_deps: tuple[str, ...] = ()
    if pretrained is None and cfg.pretrain is not None:
        stages += pretrain_stages(cfg, root)
        pretrained, start_deps = str(stages[-1].out / "model"), (PRETRAIN_ID,)
    # a checkpoint given by path enters the keys by its identity; this graph's own pre-training by its key (its
    # export's mtime would change the keys once it exists, and a staged run's driver may not have the file)
    identity = pretrained_identity(pretrained) if cfg.model.pretrained else None
    for task in cfg.tasks:
        shard = _shard(cfg, task.data, f"shard/{task.name}", task.name, root, model_tokenizer(pretrained),
                       start_deps, {"task": task.name}, task.train_split)
        stages.append(shard)
        shards = shard.config.out
        backbone = _finetune(cfg, task, shards, None, None, pretrained, "backbone", "backbone",
                             (shard.id, *start_deps), root, identity)
        models = [backbone]
        if cfg.smarttrim_start == "backbone":
            init, start, deps, ident = str(backbone.out / "model"), None, (shard.id, backbone.id), None
        else:
            init, start, deps, ident = None, pretrained, (shard.id, *start_deps), identity
        for target in cfg.targets:
            models.append(_finetune(cfg, task, shards, smarttrim_trim(cfg.trim, target), init, start,
                                    f"smarttrim-{target.name}", "smarttrim", deps, root, ident, target.name))
        for section, kind in ((cfg.ablations, "ablation"), (cfg.baselines, "baseline")):
            if section.target is None:
                continue
            target = next(t for t in cfg.targets if t.name == section.target)
            for variant in section.variants:
                trim = smarttrim_trim(cfg.trim, target, **{kind: variant})
                models.append(_finetune(cfg, task, shards, trim, init, start, f"{variant}-{target.name}", kind,
                                        deps, root, ident, target.name))
        stages += models
        for model in models:
            stages += measure_stages(cfg, task, shard, model, root)
    return linked(stages, _mirror(cfg, root))


def _finetune(cfg: PipelineConfig, task: TaskConfig, shards: str, trim: Any, init: str | None,
              pretrained: str | None, name: str, kind: str, deps: tuple[str, ...], root: Path,
              identity: dict[str, Any] | None, target: str | None = None) -> Stage:
    ft = _placed("finetune", f"{task.name}-{name}", finetune_config(cfg, task, shards, trim, init, pretrained), root,
                 identity)
    start = "backbone" if init is not None else "pretrained" if pretrained is not None else "scratch"
    return Stage(f"finetune/{task.name}/{name}", "finetune", ft, deps,
                 {"task": task.name, "name": name, "kind": kind, "target": target, "start": start,
                  "start_from": init or pretrained})


def measure_stages(cfg: PipelineConfig, task: TaskConfig, shard: Stage, model: Stage, root: Path) -> list[Stage]:
    """Evaluate and profile stages of a trained model (``model``: its finetune stage) on the shards of ``shard``
    (the task's ``eval_split``), and an evaluation on its ``test_split`` when it has one (``test/<task>/<model>``).
    Both depend on the shard stage as well as the model: a recomputed (``--force``) shard stage replaces the
    directory they read, so they wait for it even when the fine-tuning is cached."""
    name, model_dir, shards = model.meta["name"], str(model.out / "model"), shard.config.out
    e, p = cfg.evaluate, cfg.profile
    ev = _placed("evaluate", f"{task.name}-{name}", EvaluateConfig(
        model=model_dir, shards=shards, out="", split=task.eval_split, threads=e.threads, batch_size=e.batch_size,
        rerank_k=e.rerank_k, device=e.device), root)
    pr = _placed("profile", f"{task.name}-{name}", ProfileConfig(
        model=model_dir, shards=shards, out="", split=task.eval_split, threads=p.threads, instances=p.instances,
        batch_size=p.batch_size, device=p.device), root)
    deps = (shard.id, model.id)
    stages = [Stage(f"evaluate/{task.name}/{name}", "evaluate", ev, deps, model.meta),
              Stage(f"profile/{task.name}/{name}", "profile", pr, deps, model.meta)]
    if task.test_split is not None and task.test_split != task.eval_split:  # the held-out split, once per model
        test = _placed("evaluate", f"{task.name}-{name}-{task.test_split}", dataclasses.replace(
            ev, split=task.test_split, out=""), root)
        stages.append(Stage(f"test/{task.name}/{name}", "evaluate", test, deps, model.meta))
    return stages


def downstream(stages: list[Stage], ids: set[str]) -> set[str]:
    """``ids`` and every stage that depends on one of them, directly or not."""
    out = set(ids)
    for stage in stages:  # dependencies come before dependents in a plan
        if any(d in out for d in stage.deps):
            out.add(stage.id)
    return out


def forced(stages: list[Stage], force: list[str] | tuple[str, ...]) -> set[str]:
    """The stages ``--force`` recomputes: each named stage (by id, or every stage of a kind) and everything
    downstream of it (an evaluation is older than weights retrained after it). An item that names no stage of
    ``stages`` is an error listing the kinds and ids."""
    ids = {s.id for s in stages}
    kinds = sorted({s.kind for s in stages} | {s.id.split("/", 1)[0] for s in stages})
    unknown = [f for f in force if f not in ids and f not in kinds]
    if unknown:
        listing = "\n  ".join(s.id for s in stages)
        raise ValueError(f"--force {unknown[0]!r}: not a stage kind ({', '.join(kinds)}) or id of this plan; the ids "
                         f"are:\n  {listing}")
    named = {s.id for s in stages if s.id in force or s.kind in force or s.id.split("/", 1)[0] in force}
    return downstream(stages, named)


__all__ = ["KINDS", "PRETRAIN_ID", "Stage", "build_plan", "downstream", "finetune_config", "forced", "linked",
           "measure_stages",
           "model_image_size", "model_tokenizer", "model_vocab_size", "pretrain_stages", "pretrained_identity",
           "smarttrim_trim", "staged_storage", "stage_key"]
