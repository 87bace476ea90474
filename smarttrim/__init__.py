"""SmartTrim: adaptive token and attention-head pruning for vision-language models (METER backbone).

Public API::

    trim = smarttrim.TrimConfig(token_target_vision=0.5, token_target_text=0.7, head_target=0.6)
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=13, trim=trim)
    out = model(model.dummy_batch(batch_size=4, seed=0))
    smarttrim.count_flops(model.eval(), model.dummy_batch(batch_size=1))
    model.save_pretrained(path); smarttrim.load_model(path)

The names load on first use (PEP 562): ``import smarttrim.config`` or a CLI's ``--help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PRESETS": "smarttrim.config", "ModelConfig": "smarttrim.config", "TrimConfig": "smarttrim.config",
    "model_config": "smarttrim.config", "analytic_macs": "smarttrim.flops", "count_flops": "smarttrim.flops",
    "load_model": "smarttrim.io", "save_pretrained": "smarttrim.io", "SmartTrimModel": "smarttrim.model",
    "SmartTrimOutput": "smarttrim.model", "build_model": "smarttrim.model",
}

if TYPE_CHECKING:
    from smarttrim.config import PRESETS, ModelConfig, TrimConfig, model_config
    from smarttrim.flops import analytic_macs, count_flops
    from smarttrim.io import load_model, save_pretrained
    from smarttrim.model import SmartTrimModel, SmartTrimOutput, build_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:  # a submodule used as an attribute (``smarttrim.data.shapes`` after ``import smarttrim``)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from err
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["PRESETS", "ModelConfig", "SmartTrimModel", "SmartTrimOutput", "TrimConfig", "analytic_macs",
           "build_model", "count_flops", "load_model", "model_config", "save_pretrained"]
