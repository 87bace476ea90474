"""What a fine-tuning run is: ``FinetuneConfig``, its DeepSpeed JSON, the epoch schedule and the initial model.

Shared by the driver (``stages.finetune``) and the worker (``stages.train_loop``); imports neither Ray nor
DeepSpeed, so configs validate anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smarttrim.config import PRESETS, TASK_NUM_LABELS, ModelConfig, TrimConfig, model_config
from smarttrim.training import TrainConfig

if TYPE_CHECKING:  # torch loads when a model or loader is built, not with the config (the CLIs' --help is instant)
    from smarttrim.data.loader import EpochPlan, LoaderConfig
    from smarttrim.model import SmartTrimModel
    from smarttrim.pretraining import PretrainModel

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "cluster" / "deepspeed"
"""Named DeepSpeed configs (``zero0``, ``zero1``, ``zero2``): JSON files whose batch, accumulation, clipping
and precision fields are ``"auto"`` and filled from the ``TrainConfig``."""

TRAINING_FIELDS = ("shards", "train_split", "preset", "init", "pretrained", "dropout", "image_size", "trim", "train",
                   "num_workers", "deepspeed", "tokenizer", "objective", "false_texts")
"""The fields that decide what is trained: a checkpoint resumes only a run with the same values."""


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: data, model, SmartTrim config, training recipe, and how Ray runs it."""

    shards: str
    """Shard location written by ``stages.shard`` (the task and labels come from its manifest)."""
    out: str
    """Output directory: ``model/`` (export), ``metrics.json``, ``history.jsonl``, ``curves.png``."""
    preset: str = "meter-tiny"
    """Model preset when starting from scratch (ignored with ``init``)."""
    init: str | None = None
    """An exported model of the same task to continue from: its backbone and head weights are loaded, trimmers
    start at stable init (e.g. SmartTrim from the fine-tuned backbone instead of the pretrained model)."""
    pretrained: str | None = None
    """A pre-trained starting point, not with ``init``: a model directory of ours (``stages.pretrain``'s
    export: its architecture, its backbone weights, a new task head; ``load_pretrained``) or an official
    METER checkpoint (``.ckpt``, loaded into the preset model by ``load_meter_checkpoint``). The paper's
    recipe: the backbone and SmartTrim are both fine-tuned once from the pre-trained model."""
    objective: str = "task"
    """``task``: fine-tune on the shards' task; ``pretrain``: METER's MLM + ITM on image-caption shards
    (``stages.pretrain``; the model is the retrieval model plus an MLM head)."""
    vision_weight: float = 0.0
    """``pretrain`` only: weight of the supervised visual objective on the built-in scenes' object labels
    (``smarttrim.pretraining``); 0 = METER's MLM + ITM only."""
    false_texts: int = 15
    """Retrieval shards: false texts per image of METER's rank loss (``compute_irtr``; its ``draw_false_text`` is
    15): every training image is scored with its true caption and these, drawn from the batch's other images'
    captions (``LoaderConfig.false_texts``); the periodic validation ranks the same groups. Other tasks ignore it."""
    dropout: float | None = None
    """Override of the model's dropout (None = the preset's, or the init model's)."""
    image_size: int | None = None
    """Override of the preset's input resolution (None = the preset's; with ``init``, the init model's)."""
    trim: TrimConfig | None = None
    """SmartTrim's config; None trains the plain backbone."""
    train: TrainConfig = field(default_factory=TrainConfig)
    train_split: str = "train"
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    cpus_per_worker: int = 1
    threads: int = 1
    """torch CPU threads per worker."""
    loader_workers: int = 0
    """DataLoader worker processes per training worker."""
    deepspeed: str = "zero0"
    """A config name in ``cluster/deepspeed/`` (``zero0``, ``zero1``, ``zero2``) or a JSON file path."""
    checkpoint_every: int = 50
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in run storage (the latest ones)."""
    max_failures: int = 2
    """Worker-group failures to recover from (each resumes from the latest checkpoint)."""
    storage: str | None = None
    """Ray Train run storage root (a shared path or a URI Ray Train and pyarrow reach: ``s3://bucket/prefix``,
    ``gs://...``, ``file:///...``); the run's checkpoints go to ``<storage>/<name>``. None = ``<out>.ray``."""
    run_name: str | None = None
    """Ray Train run name; None = the output directory's name. A restarted driver with the same storage and
    run name resumes from the run's latest checkpoint."""
    tokenizer: str | None = None
    """Tokenizer directory; None = the shards' tokenizer."""
    val_split: str | None = "val"
    """Split of the periodic validation (None: none); a split the shards lack is skipped with a note."""
    val_every: int | None = None
    """Steps between validations of a fixed subset (the curves' task metric); None = at every checkpoint."""
    val_samples: int = 256
    """Size of that subset (the split's first samples)."""
    stop_at: int | None = None
    """Pause after this step: checkpoint and export there; a later run of the same config with a larger
    ``stop_at`` (or None: to the end) continues from it. The schedule is the full run's either way (not part
    of the fingerprint); Tune's ASHA trains trials this way, rung by rung."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:  # here, not in a Ray Train worker (which would retry it max_failures times)
            raise ValueError(f"preset={self.preset!r}: unknown; known presets are {sorted(PRESETS)}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train={self.train!r}: must be a TrainConfig")
        for name in ("num_workers", "cpus_per_worker", "threads", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at={self.stop_at!r}: must be >= 1 or None")
        for name in ("loader_workers", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.checkpoint_every % self.train.log_every:
            raise ValueError(f"checkpoint_every={self.checkpoint_every!r}: must be a multiple of train.log_every="
                             f"{self.train.log_every} (a resumed run's curve then lines up with its checkpoint)")
        if self.init is not None and self.pretrained is not None:
            raise ValueError(f"init={self.init!r} and pretrained={self.pretrained!r}: give one starting point")
        from smarttrim.data.loader import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: must be one of {OBJECTIVES}")
        if self.objective == "pretrain" and self.trim is not None:
            raise ValueError("objective='pretrain' trains the backbone: trim must be None")
        if not self.vision_weight >= 0.0 or (self.vision_weight and self.objective != "pretrain"):
            raise ValueError(f"vision_weight={self.vision_weight!r}: must be >= 0, and 0 unless objective='pretrain'")
        if self.val_every is not None and self.val_every < 1:
            raise ValueError(f"val_every={self.val_every!r}: must be >= 1 or None")
        if self.val_samples < 1:
            raise ValueError(f"val_samples={self.val_samples!r}: must be >= 1")
        if self.false_texts < 1:
            raise ValueError(f"false_texts={self.false_texts!r}: must be >= 1 (the rank loss needs a false text)")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1) or None")
        if self.trim is not None and not isinstance(self.trim, TrimConfig):
            raise ValueError(f"trim={self.trim!r}: must be a TrimConfig or None")
        stage = deepspeed_config(self)["zero_optimization"]["stage"]
        if self.train.precision == "bf16" and stage < 1:
            raise ValueError(f"deepspeed={self.deepspeed!r}: bf16 needs ZeRO stage >= 1 (fp32 master weights "
                             f"for the export); use zero1 or zero2")

    @property
    def storage_path(self) -> str:
        if self.storage is not None:
            return self.storage
        out = Path(self.out).resolve()
        return str(out.with_name(out.name + ".ray"))

    @property
    def run_storage(self) -> str:
        """This run's Ray Train directory: ``<storage_path>/<name>`` (a local path or a URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def name(self) -> str:
        return self.run_name or Path(self.out).resolve().name

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trim"] = None if self.trim is None else self.trim.to_dict()
        data["train"] = self.train.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"FinetuneConfig: unknown fields {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("trim"), dict):
            data["trim"] = TrimConfig.from_dict(data["trim"])
        if isinstance(data.get("train"), dict):
            data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)

    def fingerprint(self) -> str:
        """sha256 of the fields that decide what is trained (``TRAINING_FIELDS``)."""
        data = self.to_dict()
        data["deepspeed"] = deepspeed_config(self)
        blob = json.dumps({k: data[k] for k in TRAINING_FIELDS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def load_deepspeed_json(name: str) -> dict[str, Any]:
    """A named config of ``cluster/deepspeed/`` or a JSON file."""
    path = DEEPSPEED_DIR / f"{name}.json" if "/" not in name and not name.endswith(".json") else Path(name)
    if not path.is_file():
        known = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
        raise ValueError(f"deepspeed={name!r}: no such file {path} (named configs: {known})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def deepspeed_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The DeepSpeed config of a run: the JSON file with its ``"auto"`` fields filled from ``cfg.train``.
    A field set in the file to a value other than the training config's is an error."""
    ds = load_deepspeed_json(cfg.deepspeed)
    t = cfg.train
    fill = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": 0.0 if t.max_grad_norm is None else t.max_grad_norm}
    for key, value in fill.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f"deepspeed={cfg.deepspeed!r}: {key}={ds[key]!r} contradicts the training config "
                             f"({value!r}); set it to \"auto\"")
        ds[key] = value
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x world size
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") not in ("auto", t.precision == "bf16"):
        raise ValueError(f"deepspeed={cfg.deepspeed!r}: bf16.enabled={bf16['enabled']!r} contradicts "
                         f"precision={t.precision!r}")
    bf16["enabled"] = t.precision == "bf16"
    autocast = ds.setdefault("torch_autocast", {"enabled": "auto"})
    if autocast.get("enabled", "auto") not in ("auto", t.precision == "bf16-mixed"):
        raise ValueError(f"deepspeed={cfg.deepspeed!r}: torch_autocast.enabled={autocast['enabled']!r} contradicts "
                         f"precision={t.precision!r}")
    autocast["enabled"] = t.precision == "bf16-mixed"
    if autocast["enabled"]:
        autocast.setdefault("dtype", "bfloat16")
    ds.setdefault("zero_optimization", {"stage": 0})
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"deepspeed={cfg.deepspeed!r}: ZeRO stage {stage!r} is not supported (0, 1 or 2: stage 3 "
                         "partitions the weights the pruning path slices per instance)")
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"deepspeed={cfg.deepspeed!r}: optimizer and scheduler come from the training config "
                         "(METER's parameter groups); remove them from the JSON")
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW with parameter groups
    return ds


def num_labels(manifest: dict[str, Any]) -> int:
    task = manifest["task"]
    return TASK_NUM_LABELS[task] or len(manifest["labels"])


def model_task(cfg: FinetuneConfig, manifest: dict[str, Any]) -> tuple[str, int]:
    """(task, label count) of the model trained on these shards: pre-training builds the ITM (retrieval) model."""
    if cfg.objective == "pretrain":
        return "retrieval", 2
    return manifest["task"], num_labels(manifest)


def build_initial_model(cfg: FinetuneConfig, manifest: dict[str, Any]) -> SmartTrimModel | PretrainModel:
    """The model training starts from: ``cfg.init``'s backbone and head (+ fresh trimmers), or a new model of the
    preset or of the ``pretrained`` directory's architecture with the pre-trained weights loaded."""
    from smarttrim.checkpoints import load_meter_checkpoint, load_pretrained
    from smarttrim.io import load_model
    from smarttrim.model import SmartTrimModel
    from smarttrim.pretraining import PretrainModel

    task, labels = model_task(cfg, manifest)
    if cfg.objective == "pretrain":
        mcfg = _new_config(cfg, task, labels)
        model = PretrainModel(mcfg, vision_weight=cfg.vision_weight)
        if cfg.init is not None or cfg.pretrained is not None:  # continue pre-training a model of ours
            start = cfg.init or cfg.pretrained
            load_pretrained(model.vlm, start) if Path(start).is_dir() else load_meter_checkpoint(model.vlm, start)
        return model
    if cfg.init is not None:
        check_start(cfg, manifest)
        source = load_model(cfg.init)
        mcfg = source.config
        if cfg.dropout is not None:
            mcfg = replace(mcfg, dropout=cfg.dropout)
        model = SmartTrimModel(mcfg, cfg.trim)
        model.load_backbone_state_dict(source.backbone_state_dict())
        return model
    model = SmartTrimModel(_new_config(cfg, task, labels), cfg.trim)
    if cfg.pretrained is not None:
        if Path(cfg.pretrained).is_dir():
            load_pretrained(model, cfg.pretrained)
        else:
            load_meter_checkpoint(model, cfg.pretrained)
    return model


def storage_fs(uri_or_path: str) -> tuple[Any, str]:
    """``(pyarrow file system, path in it)`` of a local path or a URI (``file://``, ``s3://``, ``gs://``): how Ray
    Train itself reaches run storage."""
    import pyarrow.fs

    if "://" in uri_or_path:
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(uri_or_path).resolve())


def storage_exists(uri_or_path: str) -> bool:
    import pyarrow.fs

    fs, path = storage_fs(uri_or_path)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def delete_run_storage(cfg: FinetuneConfig) -> None:
    """Forget this run's checkpoints (``--force``): its own directory in run storage (other runs may share the
    storage root), and the default ``<out>.ray`` root with it."""
    if storage_exists(cfg.run_storage):
        fs, path = storage_fs(cfg.run_storage)
        fs.delete_dir(path)
    if cfg.storage is None:
        shutil.rmtree(cfg.storage_path, ignore_errors=True)


def check_start(cfg: FinetuneConfig, manifest: dict[str, Any]) -> ModelConfig:
    """The starting model's config, with every check of ``build_initial_model`` that needs no weights (task and
    labels of an ``init`` model, image size, the ``pretrained`` architecture against the preset, the preset's own
    validation): run on the driver, before Ray Train starts workers, which would retry such an error
    ``max_failures`` times."""
    from smarttrim.io import read_config

    task, labels = model_task(cfg, manifest)
    if cfg.init is None or cfg.objective == "pretrain":
        return _new_config(cfg, task, labels)
    mcfg = read_config(cfg.init)[0]
    if mcfg.task != task or mcfg.num_labels != labels:
        raise ValueError(f"{cfg.init}: model is {mcfg.task} with {mcfg.num_labels} labels, the shards are "
                         f"{task} with {labels}; start from it with pretrained= (a new task head)")
    if cfg.image_size is not None and cfg.image_size != mcfg.image_size:
        raise ValueError(f"image_size={cfg.image_size}: the init model {cfg.init} was trained at {mcfg.image_size}")
    return mcfg


def _new_config(cfg: FinetuneConfig, task: str, labels: int) -> ModelConfig:
    """A new model's config: the ``pretrained`` directory's architecture, else the preset's; with the run's
    image size and dropout overrides."""
    from smarttrim.checkpoints import pretrained_config

    overrides: dict[str, Any] = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if cfg.image_size is not None:
        overrides["image_size"] = cfg.image_size
    if cfg.pretrained is not None and Path(cfg.pretrained).is_dir():
        mcfg = pretrained_config(cfg.pretrained, task, labels, **overrides)
        if mcfg.name != cfg.preset:
            raise ValueError(f"pretrained={cfg.pretrained!r} is a {mcfg.name!r} model, preset={cfg.preset!r}: "
                             f"set the preset to {mcfg.name!r}")
        return mcfg
    return model_config(cfg.preset, task=task, num_labels=labels, **overrides)


def epoch_schedule(cfg: FinetuneConfig, manifest: dict[str, Any], base: LoaderConfig,
                   world: int) -> tuple[list[EpochPlan], list[int], int]:
    """Per epoch: the loader plan and the optimizer steps (identical on every rank); and the total steps.

    ``train.max_steps`` set: epochs repeat until that many steps; else ``train.epochs`` epochs."""
    from smarttrim.data.loader import plan_epoch

    t = cfg.train
    plans: list[EpochPlan] = []
    steps: list[int] = []
    while (sum(steps) < t.max_steps) if t.max_steps is not None else (len(plans) < t.epochs):
        plan = plan_epoch(manifest, cfg.train_split, replace(base, epoch=len(plans)), world)
        n = plan.batches_per_rank // t.grad_accum
        if n == 0:
            raise ValueError(f"{cfg.shards}: an epoch gives each rank {plan.batches_per_rank} batches, fewer than "
                             f"grad_accum={t.grad_accum}")
        plans.append(plan)
        steps.append(n)
    total = t.max_steps if t.max_steps is not None else sum(steps)
    return plans, steps, total


__all__ = ["DEEPSPEED_DIR", "FinetuneConfig", "build_initial_model", "deepspeed_config", "epoch_schedule",
           "load_deepspeed_json", "model_task", "num_labels"]
