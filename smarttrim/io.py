"""Our own model format: a directory with ``model.safetensors`` + ``config.json`` (no Ray/DeepSpeed needed).

Writes are atomic per file (temp file in the same directory, then ``os.replace``); the config is
written last, so a directory with a ``config.json`` always holds a complete model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smarttrim.atomic import atomic_write
from smarttrim.config import ModelConfig, TrimConfig
from smarttrim.model import SmartTrimModel, rank_from_itm

FORMAT = "smarttrim"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model: SmartTrimModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Save weights and configs of ``model`` into directory ``path`` (created if needed)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
            "trim": None if model.trim_config is None else model.trim_config.to_dict(), **(extra or {})}

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    atomic_write(out / CONFIG, write_config)
    return out


def read_config(path: str | os.PathLike[str]) -> tuple[ModelConfig, TrimConfig | None, dict[str, Any]]:
    """The (model config, trim config, whole JSON) of a saved model directory."""
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such file (not a saved smarttrim model directory)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: invalid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: field 'format_version' is {meta.get('format_version')!r}, "
                         f"this library reads {FORMAT_VERSION}")
    try:
        model_cfg = ModelConfig.from_dict(meta["model"])
        trim = None if meta.get("trim") is None else TrimConfig.from_dict(meta["trim"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: bad config: {err}") from err
    return model_cfg, trim, meta


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> SmartTrimModel:
    """Load a model saved by ``save_pretrained`` (strict: every tensor must match by name and shape).

    One completion: a retrieval model saved with its ITM head but without ``rank_output`` (pre-training exports
    made before the model had one, e.g. the shipped ``pretrained/meter-small-shapes``) gets METER's
    initialization of it from the ITM head (``rank_from_itm``)."""
    model_cfg, trim, _ = read_config(path)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file")
    try:
        state = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: unreadable safetensors file ({err})") from err
    model = SmartTrimModel(model_cfg, trim)
    complete_rank_output(model_cfg, state)
    load_state_dict_checked(model, state, str(weights))
    return model


def complete_rank_output(config: ModelConfig, state: dict[str, torch.Tensor]) -> bool:
    """Add ``rank_output.*`` to the state dict of a retrieval model that has the ITM head (``head.0.*``) but no
    ``rank_output``, by METER's rule (``rank_from_itm``). Returns whether it did."""
    if config.task != "retrieval" or "rank_output.weight" in state or "head.0.weight" not in state:
        return False
    state["rank_output.weight"], state["rank_output.bias"] = rank_from_itm(state["head.0.weight"],
                                                                           state["head.0.bias"])
    return True


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                            allow_missing: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` with an error that names the file and the offending keys.

    Keys starting with one of ``allow_missing`` may be absent (e.g. ``"trimmers."``).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                parts.append(f"{label} {keys[:10]}{more}")
        raise ValueError(f"{source}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
