"""Fine-tuning recipe pieces shared by every training loop (pure PyTorch; the Ray/DeepSpeed loop lives in
``stages.finetune``): the training config, METER's parameter groups and learning-rate multipliers, and the
warmup + decay schedule.

METER fine-tunes with AdamW (betas 0.9/0.98, weight decay 0.01 except biases and norms), a base learning
rate for the uni-modal encoders, x ``lr_mult_cross_modal`` for every ``cross_modal_*`` module and
x ``lr_mult_head`` for the task head, warmup over 10% of the steps, then linear decay to 0. SmartTrim's
trimmers are new modules like the head; they get ``lr_mult_trimmer`` (decisive scores |π| >> 1 make the
deterministic eval decisions keep what the sampled training decisions kept: with scores near 0 the sampled
masks are coin flips and the eval decisions, thresholds of the same scores, keep something else).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the model, not with the configs
    from torch import nn

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
PARAM_KINDS = ("encoder", "cross_modal", "head", "trimmer")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune: budget, batch, optimizer, schedule, precision. Batch sizes are per worker."""

    epochs: int = 1
    """Passes over the training split (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps; when set, epochs repeat (reshuffled) until this many steps."""
    batch_size: int = 32
    """Micro-batch per worker; an optimizer step sees batch_size x grad_accum x workers examples."""
    grad_accum: int = 1
    lr: float = 1e-4
    """Peak learning rate of the uni-modal encoders (and token-type embeddings)."""
    lr_mult_cross_modal: float = 5.0
    lr_mult_head: float = 10.0
    lr_mult_trimmer: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1
    """Fraction of the steps with linear warmup from 0."""
    schedule: str = "linear"
    """After warmup: ``linear`` or ``cosine`` decay to ``end_lr_ratio`` x peak, or ``constant``."""
    end_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    """Gradient clipping (None = off)."""
    precision: str = "fp32"
    """``fp32``; ``bf16`` (DeepSpeed bf16: bf16 weights and activations, fp32 master weights, ZeRO >= 1);
    ``bf16-mixed`` (fp32 weights, matmuls and convolutions in bf16 under ``torch.autocast``, DeepSpeed's
    ``torch_autocast``; any ZeRO stage: 2x the fp32 matmul rate on CPUs with AVX512-BF16 or AMX)."""
    seed: int = 0
    log_every: int = 10
    """Steps per logged point of the training curves (means over those steps)."""

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "lr", "eps", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r}: must be >= 1 or None")
        for name in ("lr_mult_cross_modal", "lr_mult_head", "lr_mult_trimmer", "weight_decay", "end_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup!r}: must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r}: must be two values in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: must be one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}: must be > 0 or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}")
        if "betas" in data:
            data = {**data, "betas": tuple(data["betas"])}
        return cls(**data)


def param_kind(name: str) -> str:
    """Which learning-rate group a parameter of ``SmartTrimModel`` belongs to (METER's name rules). The retrieval
    score ``rank_output`` is not among METER's head names (``set_schedule``): it learns at the base rate."""
    if name.startswith("trimmers."):
        return "trimmer"
    if name.startswith("rank_output."):
        return "encoder"
    if name.startswith("head."):
        return "head"
    if "cross_modal" in name:
        return "cross_modal"
    return "encoder"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (kind, decay), with the kind's peak learning rate.

    Biases and every 1-d parameter (norm weights) get no weight decay, as in METER. Each group carries
    ``name`` (e.g. ``cross_modal/decay``) and ``peak_lr`` (the schedule scales ``lr`` from it)."""
    mult = {"encoder": 1.0, "cross_modal": cfg.lr_mult_cross_modal, "head": cfg.lr_mult_head,
            "trimmer": cfg.lr_mult_trimmer}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim > 1 and not name.endswith(".bias")
            groups.setdefault((param_kind(name), decay), []).append(p)
    out = []
    for kind in PARAM_KINDS:
        for decay in (True, False):
            if (kind, decay) in groups:
                lr = cfg.lr * mult[kind]
                out.append({"params": groups[(kind, decay)], "name": f"{kind}/{'decay' if decay else 'no_decay'}",
                            "lr": lr, "peak_lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
    return out


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Step -> factor of the peak learning rate: linear warmup over ``cfg.warmup`` x ``total_steps`` steps
    (factor (step+1)/warmup_steps, so the first step already learns), then ``cfg.schedule`` decay reaching
    ``cfg.end_lr_ratio`` at ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be >= 1")
    warmup = round(cfg.warmup * total_steps)
    end = cfg.end_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - end) * done
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


__all__ = ["PARAM_KINDS", "PRECISIONS", "SCHEDULES", "TrainConfig", "lr_lambda", "param_groups", "param_kind"]
