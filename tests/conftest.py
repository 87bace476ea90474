"""Shared helpers: tiny models (dropout off, so paths can be compared exactly) and trimmer controls."""

from __future__ import annotations

import pytest
import torch

import smarttrim
from smarttrim.model import SmartTrimModel

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
        for name, module in model.trimmers.named_modules():
            if hasattr(module, "local"):  # TokenTrimmer
                last = module.local[-1]
                if token_bias is not None:
                    last.bias.fill_(token_bias)
                    if zero_weights:
                        last.weight.zero_()
                        if hasattr(module, "w_k"):
                            module.w_k.weight.zero_()
            elif hasattr(module, "mlp") and name:  # HeadTrimmer
                last = module.mlp[-1]
                if head_bias is not None:
                    last.bias.fill_(head_bias)
                    if zero_weights:
                        last.weight.zero_()


def instance(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Instance i of a batch as a batch of one, text padding removed."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    return smarttrim.flops.strip_padding(one)
