"""Typed, validated configs: the SmartTrim trimming config and the METER backbone presets.

Both are frozen dataclasses that validate in ``__post_init__`` (a ``ValueError`` names the field and
the bad value) and serialize to plain JSON dicts (``to_dict`` / ``from_dict``; unknown keys are errors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

TokenTrimmerKind = Literal["cross_modal", "local", "random"]
TOKEN_TRIMMERS: tuple[str, ...] = ("cross_modal", "local", "random")
TASKS: tuple[str, ...] = ("vqa", "nlvr2", "snli_ve", "retrieval")
PATCH_STEMS: tuple[str, ...] = ("linear", "conv", "conv_context")
TASK_NUM_LABELS: dict[str, int | None] = {"vqa": None, "nlvr2": 2, "snli_ve": 3, "retrieval": 2}


def _check(cond: bool, field_name: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}={value!r}: {why}")


def _from_dict(cls: type, data: dict[str, Any], tuple_fields: tuple[str, ...] = ()) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    data = {k: (tuple(v) if k in tuple_fields and v is not None else v) for k, v in data.items()}
    return cls(**data)


@dataclass(frozen=True)
class TrimConfig:
    """How SmartTrim trims a backbone (paper Section 4). ``trim=None`` in ``build_model`` = plain backbone.

    Targets are keep ratios γ (fraction of trimmable tokens/heads kept, averaged over the trimmers of a
    group): the cost loss (eqs. 9-10) pulls each group's measured ratio β towards γ. A target of 1.0
    means the group is not trimmed at all: no trimmers are built for it.
    """

    token_target_vision: float = 0.5
    """γ for visual tokens (visual-encoder and cross-modal image-stream token trimmers)."""
    token_target_text: float = 0.7
    """γ for textual tokens (cross-modal text-stream token trimmers)."""
    head_target: float = 0.6
    """γ for attention heads (every head trimmer: MSA and MCA of the cross-modal encoder)."""
    tau: float = 1.0
    """Gumbel-sigmoid temperature τ of eq. 8 (scales the straight-through gradient, not the decision)."""
    lambda_cost: float = 20.0
    """λ_cost of eq. 12."""
    lambda_sd: float = 1.0
    """λ_SD of eq. 12 (used when ``self_distill``)."""
    stable_init: bool = True
    """Stable initialization: score networks start at a constant, confident 'keep' (see ``init_keep_logit``)."""
    init_keep_logit: float = 5.0
    """Initial keep logit π under stable init: P(keep) = σ(π) = 0.993 per decision while training,
    and every decision is 'keep' on the deterministic (eval) path."""
    curriculum: float = 0.5
    """Linear curriculum: fraction of training over which each γ goes from 1.0 to its target; 0 = off."""
    self_distill: bool = True
    """Self-distillation (eq. 11): full-capacity task loss + KL(full || trimmed)."""
    token_trimmer: TokenTrimmerKind = "cross_modal"
    """``cross_modal`` (eqs. 3-6), ``local`` (no global term) or ``random`` (uniform keep at the target)."""
    vision_token_layers: tuple[int, ...] | None = None
    """Visual-encoder layers with a token trimmer (before the layer); None = every layer but the first."""
    cross_token_layers: tuple[int, ...] | None = None
    """Co-attention layers with token trimmers (both modalities); None = every co-attention layer."""
    cross_head_trim: bool = True
    """Head trimmers on every MSA and MCA of the cross-modal encoder."""
    vision_head_trim: bool = False
    """Head trimmers on the MSA of every visual-encoder layer."""
    trimmer_dim: int | None = None
    """D', the token trimmer's projection size; None = a quarter of the hidden size (at least 8)."""

    def __post_init__(self) -> None:
        for name in ("token_target_vision", "token_target_text", "head_target"):
            v = getattr(self, name)
            _check(isinstance(v, int | float) and 0.0 < v <= 1.0, name, v, "must be a keep ratio in (0, 1]")
        _check(self.tau > 0, "tau", self.tau, "must be > 0")
        _check(self.lambda_cost >= 0, "lambda_cost", self.lambda_cost, "must be >= 0")
        _check(self.lambda_sd >= 0, "lambda_sd", self.lambda_sd, "must be >= 0")
        _check(0.0 <= self.curriculum <= 1.0, "curriculum", self.curriculum, "must be a fraction in [0, 1]")
        _check(self.init_keep_logit > 0, "init_keep_logit", self.init_keep_logit, "must be > 0")
        _check(self.token_trimmer in TOKEN_TRIMMERS, "token_trimmer", self.token_trimmer,
               f"must be one of {TOKEN_TRIMMERS}")
        for name in ("vision_token_layers", "cross_token_layers"):
            v = getattr(self, name)
            if v is not None:
                _check(isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)
                       and len(set(v)) == len(v), name, v, "must be a tuple of distinct layer indices >= 0")
        if self.trimmer_dim is not None:
            _check(self.trimmer_dim >= 2, "trimmer_dim", self.trimmer_dim, "must be >= 2")

    @property
    def targets(self) -> dict[str, float]:
        """Target keep ratio per trimmer group (the keys of ``SmartTrimOutput.keep_groups``)."""
        return {"vision_tokens": self.token_target_vision, "text_tokens": self.token_target_text,
                "heads": self.head_target}

    def gamma(self, progress: float) -> dict[str, float]:
        """γ_p per group at training progress ``progress`` in [0, 1] (linear curriculum scheduler)."""
        ramp = 1.0 if self.curriculum == 0 else min(1.0, max(0.0, progress) / self.curriculum)
        return {g: 1.0 - (1.0 - t) * ramp for g, t in self.targets.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrimConfig:
        return _from_dict(cls, data, ("vision_token_layers", "cross_token_layers"))


@dataclass(frozen=True)
class ModelConfig:
    """A METER-style backbone: CLIP-ViT visual encoder, RoBERTa text encoder, co-attention fusion."""

    name: str = "custom"
    # visual encoder (timm VisionTransformer, CLIP layout: pre-norm, no patch bias, QuickGELU)
    image_size: int = 288
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_act: str = "quick_gelu"
    patch_stem: str = "linear"
    """How images become patch tokens: ``linear`` (CLIP's: one patch_size x patch_size convolution) or ``conv``
    (log2(patch_size) stride-2 3x3 convolutions with GELU, widths D/2^k: the "early convolutions" of Xiao et al.
    2021, which a ViT trained from scratch on little data needs to learn shapes; see the meter-small preset) or
    ``conv_context`` (``conv`` and one stride-1 3x3 convolution at the patch grid: a receptive field of ~4 patches
    instead of ~2, so one token sees a whole object; see ``model.conv_stem``)."""
    # text encoder (transformers RobertaModel)
    vocab_size: int = 50265
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_text_len: int = 50
    """Longest tokenized text (with [CLS]/[SEP]) the data pipeline produces; ``dummy_batch`` uses it."""
    text_max_positions: int = 514
    """RoBERTa's position table size (514 for roberta-base: positions start after the padding index)."""
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # cross-modal encoder (METER BertCrossLayer x N, per modality)
    hidden_size: int = 768
    cross_layers: int = 6
    cross_heads: int = 12
    cross_intermediate: int = 3072
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # task head
    task: str = "vqa"
    num_labels: int = 3129
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (e.g. tokenizer location, label vocabulary file); not used by the model."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vocab_size",
                     "text_hidden", "text_layers", "text_heads", "text_intermediate", "max_text_len",
                     "text_max_positions", "hidden_size", "cross_layers", "cross_heads", "cross_intermediate",
                     "num_labels"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, name, v, "must be a positive integer")
        _check(self.image_size % self.patch_size == 0, "image_size", self.image_size,
               f"must be a multiple of patch_size={self.patch_size}")
        _check(self.patch_stem in PATCH_STEMS, "patch_stem", self.patch_stem, f"must be one of {PATCH_STEMS}")
        if self.patch_stem != "linear":
            _check(self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0, "patch_size",
                   self.patch_size, f"must be a power of 2 >= 2 with patch_stem={self.patch_stem!r}")
        for width, heads in (("vision_width", "vision_heads"), ("text_hidden", "text_heads"),
                             ("hidden_size", "cross_heads")):
            _check(getattr(self, width) % getattr(self, heads) == 0, width, getattr(self, width),
                   f"must be divisible by {heads}={getattr(self, heads)}")
        _check(self.max_text_len + self.pad_token_id + 1 <= self.text_max_positions, "max_text_len",
               self.max_text_len, f"needs text_max_positions >= max_text_len + {self.pad_token_id + 1}")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.task in TASKS, "task", self.task, f"must be one of {TASKS}")
        fixed = TASK_NUM_LABELS[self.task]
        _check(fixed is None or self.num_labels == fixed, "num_labels", self.num_labels,
               f"task {self.task!r} has {fixed} labels")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


PRESETS: dict[str, dict[str, Any]] = {
    # METER-CLIP16-RoBERTa: ViT-B/16 at 288^2, RoBERTa-base, 6 co-attention layers of 768 / 12 heads.
    # METER's CLIP builds layers - 1 = 11 residual blocks (its checkpoints hold 11): so do we.
    "meter-base": dict(name="meter-base", vision_layers=11),
    # The quickstart's model: the layout of METER at a size where arithmetic, not per-op overhead, dominates a
    # forward on one CPU core (~281 M matmul MACs at batch size 1, 2.7 M parameters): 96^2 images in 8^2 patches
    # (a 12 x 12 grid: 144 visual tokens, so trimmed layers still hold enough tokens to run compute-bound),
    # 4 ViT layers, 2 RoBERTa layers, 2 co-attention layers, width 128 with 4 heads everywhere. Its ViT is
    # pre-trained here from scratch, not from CLIP's 400 M pairs, so its stem is convolutional. Measured with a
    # supervised shape probe on one-object images (400 steps of 32, AdamW 3e-4): CLIP's linear patchify 0.31
    # (after 800), the ``conv`` stem 0.49, ``conv_context`` (one more stride-1 3x3 convolution: each token sees
    # 31 px, a whole object) 0.998; colours are read at once by all three. No dropout: it trains on generated data.
    "meter-small": dict(
        name="meter-small", image_size=96, patch_size=8, patch_stem="conv_context", vision_width=128, vision_layers=4,
        vision_heads=4,
        vocab_size=512, text_hidden=128, text_layers=2, text_heads=4, text_intermediate=512, max_text_len=24,
        text_max_positions=40, hidden_size=128, cross_layers=2, cross_heads=4, cross_intermediate=512, dropout=0.0,
    ),
    # Test/CI size: every test of the suite runs on 2 CPU cores.
    "meter-tiny": dict(
        name="meter-tiny", image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
        vocab_size=512, text_hidden=64, text_layers=2, text_heads=4, text_intermediate=128, max_text_len=24,
        text_max_positions=40,
        hidden_size=64, cross_layers=2, cross_heads=4, cross_intermediate=128, dropout=0.1,
    ),
}


def model_config(preset: str, task: str = "vqa", num_labels: int | None = None, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a preset for a task, with field overrides (e.g. ``dropout=0.0``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: unknown; known presets are {sorted(PRESETS)}")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: must be one of {TASKS}")
    fixed = TASK_NUM_LABELS[task]
    if num_labels is None:
        if fixed is None:
            raise ValueError(f"num_labels=None: task {task!r} needs num_labels (the answer vocabulary size)")
        num_labels = fixed
    return ModelConfig(**{**PRESETS[preset], "task": task, "num_labels": num_labels, **overrides})
