"""Our own format: save_pretrained / load_model round trips and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_trimmers, tiny

import smarttrim


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
@pytest.mark.parametrize("with_trim", [False, True])
def test_round_trip(tmp_path: Path, task: str, with_trim: bool) -> None:
    trim = smarttrim.TrimConfig(token_trimmer="local", vision_token_layers=(1, 2)) if with_trim else None
    model = tiny(task, trim=trim).eval()
    if with_trim:
        randomize_trimmers(model, seed=0)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = smarttrim.load_model(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.trim_config == model.trim_config
    batch = model.dummy_batch(3, seed=1)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    assert all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)
    model.save_pretrained(tmp_path / "m")  # overwriting in place leaves no temporary files behind
    assert len(list((tmp_path / "m").iterdir())) == 2


def test_backbone_weights_load_across_trim_settings(tmp_path: Path) -> None:
    trimmed = tiny(trim=smarttrim.TrimConfig())
    backbone = tiny()
    backbone.load_backbone_state_dict(trimmed.backbone_state_dict())
    trimmed.load_backbone_state_dict(backbone.state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        backbone.load_backbone_state_dict(trimmed.state_dict())


def test_errors_name_the_path_and_keys(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        smarttrim.load_model(tmp_path / "nowhere")
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    meta = json.loads(cfg.read_text())
    # a config whose model is larger than the weights: the shape mismatch names the key
    bad = {**meta, "model": {**meta["model"], "hidden_size": 32, "cross_heads": 4}}
    cfg.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"model\.safetensors.*shape mismatches.*cross_modal"):
        smarttrim.load_model(tmp_path / "m")
    cfg.write_text(json.dumps({**meta, "model": {**meta["model"], "colour": 1}}))
    with pytest.raises(ValueError, match=r"config\.json.*unknown keys \['colour'\]"):
        smarttrim.load_model(tmp_path / "m")
    cfg.write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="field 'format'"):
        smarttrim.load_model(tmp_path / "m")
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        smarttrim.load_model(tmp_path / "m")
    cfg.write_text(json.dumps(meta))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        smarttrim.load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        smarttrim.load_model(tmp_path / "m")
    trimmed = tiny(trim=smarttrim.TrimConfig())
    with pytest.raises(ValueError, match=r"missing keys \['trimmers\."):
        smarttrim.io.load_state_dict_checked(trimmed, tiny().state_dict(), "somefile")
