"""Pipeline configuration: YAML files of typed, validated, frozen dataclasses.

Loading is strict: an unknown key anywhere is an error naming its dotted path (``tasks[0].backbone.lrr``),
a value of the wrong type or out of range is an error naming the field, all before any work starts.
``key=value`` overrides (dotted paths, values parsed as YAML) apply before validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.storage import Mirror, is_staged, mirror_for, resolve_runs_dir, runs_dir_problem
from smarttrim.config import PRESETS, TrimConfig
from smarttrim.data.shapes import SHAPES_SPLITS
from smarttrim.training import TrainConfig
from stages.common import apply_overrides, load_yaml

ABLATIONS: dict[str, dict[str, Any]] = {
    "no_stable_init": {"stable_init": False},
    "no_curriculum": {"curriculum": 0.0},
    "no_self_distill": {"self_distill": False},
}
"""The ablations of the paper's Table 6: each switches one part of SmartTrim's training off."""
BASELINES: dict[str, dict[str, Any]] = {
    "local": {"token_trimmer": "local"},
    "random": {"token_trimmer": "random"},
}
"""Token-pruning baselines of the paper's Fig. 4a, trained like SmartTrim at a target's keep ratios: ``local``
scores tokens from their own representation only (no cross-modal global term), ``random`` keeps tokens at
random."""
SMARTTRIM_STARTS: tuple[str, ...] = ("pretrained", "backbone")
DEFAULT_SPLITS: dict[str, tuple[str | None, str, str | None]] = {
    "shapes": ("train", "val", None),
    "vqa_v2": ("train2014", "val2014", None),
    "nlvr2": ("train", "dev", "test1"),
    "snli_ve": ("train", "dev", "test"),
    "karpathy_flickr30k": ("train", "val", "test"),
    "karpathy_coco": ("train", "val", "test"),
    "nocaps": (None, "val", None),
}
"""Per data source, the (train, eval, test) splits a task uses unless it names its own, as the official files name
them: VQA v2 trains on ``train2014`` and evaluates on ``val2014`` (its test splits' answers are hidden: name
``test_split: test-dev2015`` to predict them); NLVR2 ``train`` / ``dev`` / ``test1``; SNLI-VE ``train`` / ``dev`` /
``test``; the Karpathy splits ``train`` / ``val`` / ``test``; NoCaps has only ``val`` (zero-shot, no training);
``shapes`` ``train`` / ``val`` (its ``test`` split is there to name). A test split gets its own evaluation of
every model (``test/<task>/<model>``; predictions only where the answers are hidden)."""


@dataclass(frozen=True)
class DataConfig:
    """A task's data: what ``stages.shard`` reads and how it shards it."""

    source: str = "shapes"
    """``shapes`` (built in) or an official format: vqa_v2, nlvr2, snli_ve, karpathy_flickr30k, karpathy_coco."""
    task: str = "vqa"
    root: str | None = None
    """Data root of an official dataset (unused for ``shapes``)."""
    shapes_sizes: tuple[int, int, int] | None = None
    """``shapes``: samples of train / val / test (None = the generator's defaults)."""
    shard_size: int = 500
    on_error: str = "fail"
    tokenizer: str | None = None
    """A tokenizer directory (e.g. roberta-base's vocab.json + merges.txt); None = the pre-trained model's
    (``model.pretrained``: a model directory of ours carries its tokenizer), else, for ``shapes``, the built-in
    shapes tokenizer."""
    shapes_image_size: int | None = None
    """``shapes``: side of the rendered images; None = the model's input size (no resizing)."""

    def __post_init__(self) -> None:
        if self.source != "shapes" and self.root is None:
            raise ValueError(f"data.root: required for source {self.source!r}")
        if self.shard_size < 1:
            raise ValueError(f"data.shard_size={self.shard_size!r}: must be >= 1")


@dataclass(frozen=True)
class TargetConfig:
    """One SmartTrim operating point: keep-ratio targets per trimmer group."""

    name: str
    """Label, e.g. ``2x`` (the FLOPs reduction the targets aim at)."""
    token_target_vision: float
    token_target_text: float
    head_target: float

    def __post_init__(self) -> None:
        for f in ("token_target_vision", "token_target_text", "head_target"):
            if not 0.0 < getattr(self, f) <= 1.0:
                raise ValueError(f"targets.{self.name}.{f}={getattr(self, f)!r}: must be a keep ratio in (0, 1]")


@dataclass(frozen=True)
class TaskConfig:
    """One task of the experiment: its data and the recipes of the backbone and of SmartTrim."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    backbone: TrainConfig = field(default_factory=TrainConfig)
    """Recipe of the backbone fine-tuning (from the pre-trained model, or from scratch without one)."""
    smarttrim: TrainConfig = field(default_factory=TrainConfig)
    """Recipe of SmartTrim's fine-tuning (every target, ablation and baseline), from ``smarttrim_start``."""
    train_split: str | None = None
    """The split every fine-tuning of the task trains on (None = the source's, ``DEFAULT_SPLITS``)."""
    eval_split: str | None = None
    """The split models are validated, evaluated and profiled on (None = the source's)."""
    test_split: str | None = None
    """An optional held-out split every model is also evaluated on, once, after training (None = the source's)."""
    false_texts: int = 15
    """Retrieval: false captions per image in training (METER's ``draw_false_text``), the rank loss's negatives."""

    def __post_init__(self) -> None:
        train, evaluation, test = DEFAULT_SPLITS.get(self.data.source, ("train", "val", None))
        for name, default in (("train_split", train), ("eval_split", evaluation), ("test_split", test)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)  # frozen: resolved once, at construction
        if self.false_texts < 1:
            raise ValueError(f"false_texts={self.false_texts!r}: must be >= 1")
        if self.train_split is None:
            raise ValueError(f"train_split: source {self.data.source!r} has no training split "
                             f"(its splits serve zero-shot evaluation); name one or use another source")
        if self.data.source == "shapes":
            for name in ("train_split", "eval_split", "test_split"):
                value = getattr(self, name)
                if value is not None and value not in SHAPES_SPLITS:
                    raise ValueError(f"{name}={value!r}: the shapes source has splits {list(SHAPES_SPLITS)}")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "meter-tiny"
    pretrained: str | None = None
    """The pre-trained model the backbone and SmartTrim start from: a model directory of ours (a pre-training
    export, e.g. the shipped ``pretrained/meter-small-shapes``) or an official METER ``.ckpt``. None: this
    config's own ``pretrain`` stage when it has one, else from scratch."""
    dropout: float | None = None
    image_size: int | None = None
    """Input resolution (None = the preset's: 288 for meter-base as in the paper, 32 for meter-tiny)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: unknown; known presets are {sorted(PRESETS)}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r}: must be >= 1 or None")


@dataclass(frozen=True)
class ComputeConfig:
    """How each fine-tuning runs on the cluster (see ``stages.finetune_config.FinetuneConfig``)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads: int = 1
    deepspeed: str = "zero0"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 2
    """Worker-group failures a fine-tuning recovers from (a lost node, a killed worker), each from its latest
    checkpoint; errors of the inputs are refused before Ray Train starts (``stages.finetune``)."""
    storage: str | None = None
    """Ray Train's checkpoint storage for every fine-tuning: a path every node mounts or a URI (``s3://bucket/prefix``,
    ``gs://...``, ``file:///...``), each run under ``<storage>/<run name>``; None = ``<out>.ray`` in the run
    directory (on a cluster: on its shared mount)."""

    def __post_init__(self) -> None:
        if self.storage is not None and "://" in self.storage:
            scheme = self.storage.split("://", 1)[0]
            if not scheme.isalnum():
                raise ValueError(f"compute.storage={self.storage!r}: not a URI (scheme://path)")


DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")


def _check_device(section: str, device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"{section}.device={device!r}: must be one of {DEVICES}")


@dataclass(frozen=True)
class EvaluateSection:
    batch_size: int = 64
    rerank_k: int | None = None
    threads: int = 1
    device: str = "cpu"
    """``cpu``, ``cuda`` (the task reserves one GPU of the cluster) or ``auto`` (a GPU when the cluster has one)."""

    def __post_init__(self) -> None:
        _check_device("evaluate", self.device)


@dataclass(frozen=True)
class ProfileSection:
    instances: int = 100
    batch_size: int = 32
    threads: int = 1
    cpus: int = 1
    """CPUs the profiling task reserves (all of a node's for undisturbed latency figures)."""
    device: str = "cpu"
    """``cpu``, ``cuda`` (one GPU reserved: latency on the accelerator, CUDA-synchronised) or ``auto``."""

    def __post_init__(self) -> None:
        _check_device("profile", self.device)


@dataclass(frozen=True)
class AblationSection:
    target: str | None = None
    """The target the ablations are trained at (None = no ablations)."""
    variants: tuple[str, ...] = ("no_stable_init", "no_curriculum", "no_self_distill")

    def __post_init__(self) -> None:
        for v in self.variants:
            if v not in ABLATIONS:
                raise ValueError(f"ablations.variants: {v!r} is not one of {sorted(ABLATIONS)}")


@dataclass(frozen=True)
class BaselineSection:
    target: str | None = None
    """The target whose keep ratios the baselines are trained at (None = no baselines)."""
    variants: tuple[str, ...] = ("local",)

    def __post_init__(self) -> None:
        for v in self.variants:
            if v not in BASELINES:
                raise ValueError(f"baselines.variants: {v!r} is not one of {sorted(BASELINES)}")


@dataclass(frozen=True)
class PretrainSection:
    """METER's pre-training (MLM + ITM with hard negatives) of the backbone on image-caption data
    (``stages.pretrain``): ``pipeline.run pretrain`` runs it; ``all`` runs it first when ``model.pretrained`` is
    not set."""

    data: DataConfig = field(default_factory=lambda: DataConfig(source="shapes", task="caption"))
    train: TrainConfig = field(default_factory=TrainConfig)
    val_split: str = "val"
    num_workers: int | None = None
    """Ray Train workers of the pre-training (None = ``compute.num_workers``)."""
    checkpoint_every: int | None = None
    """Steps between its checkpoints and validations (None = ``compute.checkpoint_every``)."""
    val_samples: int = 512
    """Validation pairs of its periodic ITM / MLM accuracy."""
    vision_weight: float = 0.0
    """Weight of the supervised visual objective on the built-in scenes' object labels (``smarttrim.pretraining``;
    0 = METER's MLM + ITM only; needs ``source: shapes``)."""
    publish: str | None = None
    """``pipeline.run pretrain`` copies the export here with ``PRETRAINING.json`` (the config, the command, the
    sha256 of the weights, the measured ITM / MLM accuracy): how the repository's shipped checkpoint is made."""

    def __post_init__(self) -> None:
        if self.data.task not in ("caption", "retrieval"):
            raise ValueError(f"pretrain.data.task={self.data.task!r}: pre-training reads image-caption data "
                             "(caption or retrieval)")
        if self.vision_weight and self.data.source != "shapes":
            raise ValueError(f"pretrain.vision_weight={self.vision_weight!r}: the object labels come from the "
                             f"built-in shapes scenes; source {self.data.source!r} has none (set it to 0)")


@dataclass(frozen=True)
class SweepSection:
    """Ray Tune search over SmartTrim's targets and loss weights (``pipeline.run sweep``)."""

    task: str | None = None
    """The task swept (None = the first)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Field -> ``{grid: [...]}``, ``{choice: [...]}`` or ``{uniform: [low, high]}``; fields are
    token_target_vision, token_target_text, head_target, lambda_cost, lambda_sd."""
    search: str = "grid"
    """``grid`` (every combination of the grids, repeated ``num_samples`` times) or ``random``."""
    num_samples: int = 1
    asha: bool = False
    """Stop weak trials early with ASHA on the task metric (trials train in ``rungs`` stages)."""
    rungs: int = 3
    max_concurrent: int | None = None
    """Trials at once (None = as many as the cluster's CPUs/GPUs fit)."""

    def __post_init__(self) -> None:
        allowed = {"token_target_vision", "token_target_text", "head_target", "lambda_cost", "lambda_sd"}
        for name, spec in self.space.items():
            if name not in allowed:
                raise ValueError(f"sweep.space.{name}: not searchable (one of {sorted(allowed)})")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("grid", "choice", "uniform"):
                raise ValueError(f"sweep.space.{name}: expected {{grid|choice|uniform: values}}, got {spec!r}")
        if self.search not in ("grid", "random"):
            raise ValueError(f"sweep.search={self.search!r}: must be grid or random")
        if self.num_samples < 1 or self.rungs < 1:
            raise ValueError("sweep.num_samples and sweep.rungs must be >= 1")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole experiment: tasks, targets, ablations, compute, measurement, sweep, tracking."""

    name: str
    tasks: tuple[TaskConfig, ...]
    targets: tuple[TargetConfig, ...]
    model: ModelSection = field(default_factory=ModelSection)
    trim: TrimConfig = field(default_factory=TrimConfig)
    """SmartTrim's base config; each target sets its keep ratios, each ablation switches one part off."""
    smarttrim_start: str = "pretrained"
    """Where SmartTrim's fine-tuning starts: ``pretrained`` (the paper's recipe: from the pre-trained model, like
    the backbone; self-distillation trains the full-capacity path on the task at the same time) or
    ``backbone`` (from the fine-tuned backbone)."""
    ablations: AblationSection = field(default_factory=AblationSection)
    baselines: BaselineSection = field(default_factory=BaselineSection)
    pretrain: PretrainSection | None = None
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    runs_dir: str = "runs"
    """Where results go: ``<runs_dir>/<name>/``. An absolute path or ``file://`` URI; a relative one is resolved
    on the driver under ``$SMARTTRIM_RUNS_ROOT`` (the cluster's shared mount) or the working directory; or an
    object-store URI (``s3://bucket/prefix``, ``gs://...``), staged through node-local copies (``pipeline.storage``).
    On a multi-node cluster a path must be storage every node mounts."""
    runs_dir_mode: str = "auto"
    """``auto`` (staged for an object-store URI, in place for a path), ``direct`` or ``staged`` (a path too: stages
    work in node-local copies and store their results there, e.g. on a network file system slow for many reads)."""
    mlflow_experiment: str = "smarttrim"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one task")
        if not self.targets:
            raise ValueError("targets: at least one SmartTrim target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: duplicate names {names}")
        for section in ("ablations", "baselines"):
            target = getattr(self, section).target
            if target is not None and target not in names:
                raise ValueError(f"{section}.target={target!r}: not a target name ({names})")
        if self.smarttrim_start not in SMARTTRIM_STARTS:
            raise ValueError(f"smarttrim_start={self.smarttrim_start!r}: must be one of {SMARTTRIM_STARTS}")
        tasks = [t.name for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: duplicate names {tasks}")
        problem = runs_dir_problem(self.runs_dir, self.runs_dir_mode)
        if problem:
            raise ValueError(f"runs_dir={self.runs_dir!r}: {problem}")
        if self.sweep.task is not None and self.sweep.task not in tasks:
            raise ValueError(f"sweep.task={self.sweep.task!r}: not a task name ({tasks})")

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<name>`` as an absolute path (``pipeline.storage.resolve_runs_dir``); for a staged
        ``runs_dir``, this node's copy of it (``mirror``)."""
        if self.mirror is not None:
            return Path(self.mirror.local)
        return resolve_runs_dir(self.runs_dir) / self.name

    @property
    def mirror(self) -> Mirror | None:
        """The stored run directory and its node-local copy when ``runs_dir`` is staged, else None."""
        return mirror_for(self.runs_dir, self.name) if is_staged(self.runs_dir, self.runs_dir_mode) else None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ loading
def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` (from YAML) as type ``tp``; errors name ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return build(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if tp in (int, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys and wrong types are errors)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    where = f"{path}." if path else ""
    if unknown:
        raise ValueError(f"{where}{unknown[0]}: unknown key (known: {sorted(names)})")
    values = {k: _convert(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{path or cls.__name__}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{path}: {err}" if path else str(err)) from err


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML file (with ``key=value`` overrides)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return build(PipelineConfig, apply_overrides(data, overrides or [], strict=False))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


__all__ = ["ABLATIONS", "BASELINES", "DEFAULT_SPLITS", "DEVICES", "SMARTTRIM_STARTS", "AblationSection",
           "BaselineSection", "ComputeConfig",
           "DataConfig", "EvaluateSection", "ModelSection", "PipelineConfig", "PretrainSection", "ProfileSection",
           "SweepSection", "TargetConfig", "TaskConfig", "build", "load_config"]
