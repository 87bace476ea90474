"""SmartTrim: adaptive token and attention-head pruning for vision-language models (METER backbone).

Public API::

    trim = smarttrim.TrimConfig(token_target_vision=0.5, token_target_text=0.7, head_target=0.6)
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=13, trim=trim)
    out = model(model.dummy_batch(batch_size=4, seed=0))
    smarttrim.count_flops(model.eval(), model.dummy_batch(batch_size=1))
    model.save_pretrained(path); smarttrim.load_model(path)
"""

from smarttrim.config import PRESETS, ModelConfig, TrimConfig, model_config
from smarttrim.flops import analytic_macs, count_flops
from smarttrim.io import load_model, save_pretrained
from smarttrim.model import SmartTrimModel, SmartTrimOutput, build_model

__all__ = ["PRESETS", "ModelConfig", "SmartTrimModel", "SmartTrimOutput", "TrimConfig", "analytic_macs",
           "build_model", "count_flops", "load_model", "model_config", "save_pretrained"]
