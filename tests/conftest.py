"""Shared helpers: tiny models (dropout off, so paths can be compared exactly) and trimmer controls."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

import smarttrim
from smarttrim.model import SmartTrimModel
from smarttrim.trimmers import HeadTrimmer, TokenTrimmer

# one thread: tiny models gain nothing from two, and lose a lot when the two cores are shared
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(task: str = "vqa", trim: smarttrim.TrimConfig | None = None, num_labels: int | None = None,
         **overrides: object) -> SmartTrimModel:
    """A meter-tiny model with dropout 0 (train and eval forwards are then comparable)."""
    if num_labels is None and task == "vqa":
        num_labels = 13
    return smarttrim.build_model("meter-tiny", task=task, num_labels=num_labels, trim=trim,
                                 **{"dropout": 0.0, **overrides})


def randomize_trimmers(model: SmartTrimModel, seed: int = 0, std: float = 0.5) -> None:
    """Give every trimmer parameter random N(0, std) values: decisions become mixed (some kept, some not)."""
    assert model.trimmers is not None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trimmers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def set_trimmer_bias(model: SmartTrimModel, token_bias: float | None = None, head_bias: float | None = None,
                     zero_weights: bool = False) -> None:
    """Set the last-layer bias of every token (and/or head) score network; optionally zero the weights so
    the score is exactly that bias (all kept for bias > 0, all dropped for bias < 0)."""
    assert model.trimmers is not None
    with torch.no_grad():
        for module in model.trimmers.modules():
            bias = token_bias if isinstance(module, TokenTrimmer) else head_bias
            if not isinstance(module, TokenTrimmer | HeadTrimmer) or bias is None:
                continue
            module.output_layer.bias.fill_(bias)
            if zero_weights:
                module.output_layer.weight.zero_()
                if isinstance(module, TokenTrimmer) and module.kind == "cross_modal":
                    module.w_k.weight.zero_()


def score_layers(model: SmartTrimModel) -> list[torch.nn.Linear]:
    """The output layer of every learned trimmer's score network."""
    assert model.trimmers is not None
    return [m.output_layer for m in model.trimmers.modules() if isinstance(m, TokenTrimmer | HeadTrimmer)]


def instance(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Instance i of a batch as a batch of one, text padding removed."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    return smarttrim.flops.strip_padding(one)


# ``python -m pipeline.run`` at tiny settings (quickstart.yaml + these overrides): meter-tiny from scratch (no
# pre-trained checkpoint), 320 training questions, a 40-step backbone, SmartTrim at two targets, the local-trimmer
# baseline and one ablation, 16 steps each, 4 profiled instances
TINY_PIPELINE = [
    "model.preset=meter-tiny", "model.pretrained=null", "pretrain=null", "trim.vision_token_layers=null",
    "tasks.0.data.shapes_sizes=[320, 40, 8]", "tasks.0.data.shard_size=40",
    "tasks.0.backbone.max_steps=40", "tasks.0.backbone.batch_size=16", "tasks.0.backbone.log_every=8",
    "tasks.0.smarttrim.max_steps=16", "tasks.0.smarttrim.batch_size=16", "tasks.0.smarttrim.log_every=4",
    "compute.checkpoint_every=8", "profile.instances=4", "profile.batch_size=4", "profile.cpus=1",
    "ablations.target=2x", "ablations.variants=[no_self_distill]", "baselines.target=2x",
    "targets=[{name: 2x, token_target_vision: 0.3, token_target_text: 0.5, head_target: 0.4},"
    " {name: 1.5x, token_target_vision: 0.6, token_target_text: 0.7, head_target: 0.6}]"]


def bench_module(name: str) -> ModuleType:
    """A script of ``bench/`` imported as a module (``bench`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
