"""The profile stage on an exported model and shapes shards: FLOPs distribution, latency, JSON + PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize_trimmers, tiny

import smarttrim
from stages.profile import ProfileConfig, main, run
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "vqa"
    shard(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(8, 24, 4), shard_size=10))
    return out


def _export(path: Path, trim: smarttrim.TrimConfig | None, num_labels: int) -> Path:
    model = tiny("vqa", trim=trim, num_labels=num_labels)
    if trim is not None:
        randomize_trimmers(model, seed=0, std=0.3)
    model.save_pretrained(path)
    return path


def test_profile_trimmed_model(tmp_path: Path, shards: Path) -> None:
    labels = len(json.loads((shards / "manifest.json").read_text())["labels"])
    model = _export(tmp_path / "model", smarttrim.TrimConfig(), labels)
    result = run(ProfileConfig(model=str(model), shards=str(shards), out=str(tmp_path / "prof"), instances=12,
                               batch_size=8, warmup=1, threads=1))
    m = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert m == json.loads(json.dumps(result.metrics))
    f = m["flops"]
    assert m["instances"] == 12 and len(f["per_instance"]) == 12
    assert f["min"] <= f["median"] <= f["max"] and f["mean"] < f["backbone_mean"]
    assert f["ratio_to_backbone"] == pytest.approx(f["mean"] / f["backbone_mean"]) and f["ratio_to_backbone"] < 1
    assert len(set(f["per_instance"].values())) > 1, "per-instance FLOPs differ (adaptive)"
    assert m["latency_ms_bs1"]["median"] > 0 and m["latency_ms_bs1"]["p90"] >= m["latency_ms_bs1"]["median"]
    assert m["throughput"]["instances_per_s"] > 0 and m["throughput"]["batch_size"] == 8
    assert m["device"] == "cpu" and m["threads"] == 1
    assert (tmp_path / "prof" / "flops_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_backbone_is_its_own_reference(tmp_path: Path, shards: Path) -> None:
    labels = len(json.loads((shards / "manifest.json").read_text())["labels"])
    model = _export(tmp_path / "model", None, labels)
    code = main(["--model", str(model), "--shards", str(shards), "--out", str(tmp_path / "prof"),
                 "--instances", "5", "--batch-size", "4", "--threads", "1", "--warmup", "0"])
    m = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert code == 0 and m["flops"]["ratio_to_backbone"] == 1.0 and m["trim"] is None


def test_profile_errors(tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "none"), "--shards", str(shards), "--out", str(tmp_path / "p")]) == 1
    assert "none" in capsys.readouterr().err and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="instances"):
        ProfileConfig(model="m", shards="s", out="o", instances=0)


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "stages.profile", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--model" in out and "--shards" in out and "flops_hist.png" in out
